"""streammerge: merge fine-tuned checkpoints of one architecture without holding a model.

The package reads like the pipeline (DESIGN.md §1)::

    config      YAML -> frozen MergeConfig (key paths in every error)
      params    parameter settings: scalars, gradients, filter lists; per-tensor resolution
      slices    models:/slices:/modules: -> Slices (sources, layer ranges, per-slice method)
    header      the safetensors format: parse/validate, encode like save_file
    checkpoint  a model on disk -> {name: TensorRef}; read element ranges
      torchbin    PyTorch .bin files -> file ranges (torch.load(mmap=True) offsets)
      adapter     base+adapter: LoRA/PEFT tensors -> derived refs, checked against the base
      hub         a hub ID -> its local cache snapshot (never downloads)
      derive      inputs computed on read: F8 dequant, LoRA W + s*B@A, vocabulary row maps
    vocab       tokenizer:/tokenizer_source/chat_template -> output vocabulary, token rows
    plan        config + headers -> Plan(jobs, layout, estimate); never imports torch
      layers    layer stacks in tensor names; slices -> renumbered output tensors, t
      problems  input problems (architecture, layers, tensors, filters) grouped, all at once
    methods/    torch-free specs + pure torch kernels, one module per family
      fused     compiled (numba) CPU loops for the task-arithmetic family, bit-identical;
                torch-free (tensors: torch tensors as the loops take them)
      direct    linear/task_arithmetic jobs as one loop from the stored bytes: no torch
      parallel  a block's parts on every core (--threads), the same bits for any count
    execute     run a plan chunk by chunk within --max-memory (reader/compute/writer)
    write       OUT.partial/, pwrite at planned offsets, manifest, atomic rename
    integrity   verify: re-hash a finished merge against its manifest (and a config)
    journal     resume: finished-tensor journal, OUT.partial lock, input fingerprints
    digest      the per-tensor digest (xxh3-128) the journal, manifest and verify use
    shards      one output shard as a task: temp file, done-marker, plan files, finalize
    backends    where shard tasks run (inline, processes, ray) and the driver that retries
    batch       K merges over shared inputs in one read pass (sweeps expand into members)
      batch_pass  a group's read pass: shared reads, members side by side, their writes
    polite      --max-read-rate/--max-write-rate token buckets, --io-nice
    cli         click commands: parse -> one library call -> render (cli_many: batch,
                run-shard, finalize)
    demo        small deterministic Llama-shaped checkpoints and configs
      arch        demo specs for Mistral, Qwen2, Gemma, Phi-3, Mixtral (config.json as shipped)
      demo_formats  .bin copies, F8 copies, LoRA adapters, hub cache layouts (for tests)
    sweep       'models[1].parameters.weight=0.2,0.4' -> a grid of named config variants
    tune        merge every sweep point, score it with the user's command, keep the best
    errors      the one-line error family

Front door: ``merge(config, out, **options)``, ``plan(config)``, ``verify(out)``.
"""

__version__ = "0.1.0"

# Import the torch-free ``plan`` module before defining the ``plan`` function: the import
# system binds a submodule onto its package only on first import, so the function below
# keeps the name while ``import streammerge.plan`` still finds the module.
from . import plan as _plan_module  # noqa: E402


def plan(config, **options):
    """Plan a merge (see ``streammerge.plan.make_plan``); reads headers only."""
    return _plan_module.make_plan(config, **options)


def merge(config, out, **options):
    """Run a merge into directory ``out`` (see ``streammerge.execute.merge``)."""
    from .execute import merge as _merge

    return _merge(config, out, **options)


def verify(out, against=None):
    """Re-hash a finished merge against its manifest (see ``streammerge.integrity.verify``)."""
    from .integrity import verify as _verify

    return _verify(out, against)
