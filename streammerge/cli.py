"""The command line: each command parses, makes one library call, and renders.

Errors the user can fix (``StreamMergeError``, and click's usage errors) print one
``error:`` line and exit 2 (1 for damage found by ``verify`` and for write failures, 130
when interrupted); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys

import click

from .cli_params import SIZE, _friendly, _io, _polite

# OpenMP spinning collapses under competing load (reference/kernels.md §3); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class _OneLineUsage(click.Group):
    """Usage errors (a bad flag or value) as one ``error:`` line and exit 2, like the rest."""

    def main(self, args=None, prog_name=None, **extra):
        try:
            self._main(args, prog_name, **extra)
            code = 0
        except SystemExit as e:
            code = e.code
        if args is None:  # the program itself (tests pass args): leave without the teardown
            _leave(code)
        sys.exit(code)

    def _main(self, args, prog_name, **extra):
        try:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # plain `streammerge`: the help
                e.show()
                sys.exit(e.exit_code)
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)


def _leave(code) -> None:
    """Exit now with ``code`` (as ``sys.exit`` takes it), skipping the interpreter's teardown
    of torch, numba and every module (~0.5 s here, a tenth of a small merge): a command's
    files are closed and synced by the time it returns. Not when Ray or child processes
    were started: their exit hooks stop them."""
    if "ray" in sys.modules or ("multiprocessing" in sys.modules and _children()):
        return
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def _children() -> bool:
    import multiprocessing

    return bool(multiprocessing.active_children())


@click.group(
    cls=_OneLineUsage,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.version_option(package_name="streammerge")
def main() -> None:
    """Merge fine-tuned checkpoints of one architecture in bounded memory."""


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--max-memory",
    type=SIZE,
    default=None,
    help="Bytes of tensor buffers to use, e.g. 512MiB or 8GiB.  [default: half of"
    " available memory, at most 8GiB]",
)
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Torch threads for the math.  [default: all cores]",
)
@click.option(
    "--shard-size",
    "--out-shard-size",
    "shard_size",
    type=SIZE,
    default="5GB",
    help="Largest output shard, in bytes.",
)
@click.option("--seed", type=int, default=0, help="Seed for methods that sample.")
@click.option("--force", is_flag=True, help="Replace a non-empty OUT; discard OUT.partial.")
@click.option("--resume", is_flag=True, help="Continue the merge that OUT.partial holds.")
@click.option(
    "--copy-tokenizer/--no-copy-tokenizer",
    default=True,
    help="Copy tokenizer files from tokenizer_source (else the base).",
)
@click.option(
    "--allow-crimes", is_flag=True, hidden=True, help="Accepted for mergekit compatibility; no effect."
)
@click.option(
    "--lazy-unpickle",
    is_flag=True,
    hidden=True,
    help="Accepted for mergekit compatibility; .bin inputs are always read lazily.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--backend",
    type=click.Choice(["inline", "processes", "ray"]),
    default="inline",
    help="Where output shards are merged: this process, a local process pool, or Ray.",
)
@click.option("--address", default=None, help="Ray cluster to join (auto, ray://head:10001).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes (or local Ray CPUs).")
@_polite
@_friendly
def merge(
    config, out, max_memory, device, threads, shard_size, seed, force, resume, copy_tokenizer,
    allow_crimes, lazy_unpickle, no_progress, backend, address, workers, io_nice, max_read_rate,
    max_write_rate,
) -> None:  # fmt: skip
    """Merge the models in CONFIG (mergekit YAML) into the directory OUT.

    Example: streammerge merge configs/linear.yml merged --max-memory 2GiB
    """
    from .execute import merge as run_merge

    if lazy_unpickle:
        click.echo("note: --lazy-unpickle has no effect; .bin inputs are always read lazily", err=True)
    summary = run_merge(
        config,
        out,
        max_memory=max_memory or 0,
        shard_nbytes=shard_size,
        threads=threads,
        device=device,
        seed=seed,
        force=force,
        resume=resume,
        copy_tokenizer=copy_tokenizer,
        progress=not no_progress and sys.stderr.isatty(),
        io=_io(io_nice, max_read_rate, max_write_rate),
        backend=backend,
        address=address,
        workers=workers or 0,
    )
    click.echo(summary.line())


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False), required=False)
@click.option("--max-memory", type=SIZE, default=None, help="Budget to plan for (per shard task).")
@click.option("--shard-size", "--out-shard-size", "shard_size", type=SIZE, default="5GB")
@click.option("--seed", type=int, default=0, help="Seed for methods that sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option(
    "--save-plan",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a plan file for run-shard/finalize (needs OUT).",
)
@click.option("--force", is_flag=True, help="With --save-plan: finalize may replace a non-empty OUT.")
@_friendly
def plan(config, out, max_memory, shard_size, seed, as_json, save_plan, force) -> None:
    """Check CONFIG against the models' headers and show what a merge would do.

    Reads no tensor data. With OUT and --save-plan, prepare OUT.partial/ for
    `streammerge run-shard FILE --shard I` (one per shard) and `streammerge finalize FILE`.

    Example: streammerge plan configs/linear.yml --max-memory 1GiB
    """
    from .plan import make_plan

    if save_plan:
        from .shards import save_plan as save

        if out is None:
            raise click.UsageError("--save-plan needs OUT, the merge's output directory")
        p = save(
            config,
            out,
            save_plan,
            max_memory=max_memory or 0,
            shard_nbytes=shard_size,
            seed=seed,
            force=force,
        )
    else:
        p = make_plan(config, max_memory=max_memory or 0, shard_nbytes=shard_size, seed=seed)
    d = p.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    gib = 1 << 30
    click.echo(f"method        {d['merge_method']}  (plan {d['plan_hash']})")
    click.echo(f"models        {', '.join(d['models'])}")
    click.echo(f"base          {d['base_model'] or '-'}")
    click.echo(f"tensors       {d['tensors']} in {len(d['shards'])} shard(s)")
    click.echo(f"read / write  {d['read_nbytes'] / gib:.2f} GiB / {d['write_nbytes'] / gib:.2f} GiB")
    click.echo(
        f"memory        {d['estimated_peak_nbytes'] / (1 << 20):.0f} MiB of tensor buffers"
        f" (budget {d['max_memory'] / (1 << 20):.0f} MiB, chunks of {d['chunk_elems']:,} elements);"
        f" peak RSS ~{d['estimated_peak_rss_nbytes'] / (1 << 20):.0f} MiB with the runtime"
    )
    for s in d["shards"]:
        click.echo(f"  {s['file']}  {s['nbytes'] / gib:.2f} GiB  {s['tensors']} tensors")
    if save_plan:
        n = len(d["shards"])
        click.echo(f"saved plan    {save_plan}: run-shard --shard 0..{n - 1}, then finalize")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print every tensor as JSON.")
@_friendly
def inspect(model, as_json) -> None:
    """Show a model's tensors, dtypes, shapes, shards and architecture (headers only).

    Example: streammerge inspect demo-out/models/base
    """
    from collections import Counter

    from .checkpoint import open_checkpoint

    ck = open_checkpoint(model)
    cfg = ck.config or {}
    if as_json:
        doc = {
            "path": ck.path,
            "architectures": cfg.get("architectures"),
            "files": [{"path": f.path, "nbytes": f.nbytes} for f in ck.files],
            "tensors": {
                n: {"dtype": t.dtype, "shape": list(t.shape), "file": os.path.basename(t.path)}
                for n, t in ck.tensors.items()
            },
        }
        click.echo(json.dumps(doc, indent=2))
        return
    total = sum(t.nbytes for t in ck.tensors.values())
    params = sum(t.numel for t in ck.tensors.values())
    dtypes = Counter(t.dtype for t in ck.tensors.values())
    click.echo(f"model         {ck.path}")
    click.echo(
        f"architecture  {', '.join(cfg.get('architectures') or ['unknown'])}"
        f" ({cfg.get('num_hidden_layers', '?')} layers, hidden {cfg.get('hidden_size', '?')})"
    )
    click.echo(
        f"tensors       {len(ck.tensors)}, {params / 1e9:.3f} B parameters, {total / (1 << 30):.2f} GiB"
    )
    click.echo(f"dtypes        {', '.join(f'{d} x{n}' for d, n in dtypes.most_common())}")
    click.echo(f"files         {len(ck.files)}")
    for f in ck.files:
        click.echo(f"  {os.path.basename(f.path)}  {f.nbytes / (1 << 30):.2f} GiB")


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--against",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also check the manifest is this config's merge of the inputs as they are now.",
)
@_friendly
def verify(out, against) -> None:
    """Re-hash a finished merge against its streammerge.json; exit 1 naming the first
    damaged shard or tensor.

    Example: streammerge verify merged --against configs/linear.yml
    """
    from .integrity import verify as run_verify

    n = run_verify(out, against)
    click.echo(f"ok: {n} tensors in {out} match the manifest{f' and {against}' if against else ''}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--eval",
    "eval_command",
    required=True,
    help="Shell command scoring a merge; {out} becomes its directory; the last word printed is the score.",
)
@click.option("--sweep", "sweeps", multiple=True, help="KEY=V1,V2,... (repeat for a grid).")
@click.option("--out-root", type=click.Path(file_okay=False), default="tune-out")
@click.option("--minimize", is_flag=True, help="Lower scores are better.")
@click.option("--keep", is_flag=True, help="Keep every merged model, not only configs and scores.")
@click.option("--max-memory", type=SIZE, default=None, help="Bytes of tensor buffers per merge.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads for the math.")
@click.option("--seed", type=int, default=0, help="Seed for methods that sample.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out-root.")
@_friendly
def tune(config, eval_command, sweeps, out_root, minimize, keep, max_memory, threads, seed, force) -> None:
    """Merge CONFIG as written and at every point of the --sweep grid, score each merge with
    --eval, and write the best config to OUT_ROOT/best.yml (all scores: OUT_ROOT/tune.json).

    Example: streammerge tune merge.yml --eval 'python score.py {out}'
    --sweep 'models[*].parameters.weight=0.3,0.5' --sweep parameters.lambda=1,1.5
    """
    from .sweep import parse_sweep
    from .tune import tune as run_tune

    result = run_tune(
        config,
        eval_command,
        [parse_sweep(s) for s in sweeps],
        out_root,
        maximize=not minimize,
        keep=keep,
        force=force,
        report=lambda t: click.echo(f"{t.score:>12.6g}  {t.name}"),
        max_memory=max_memory or 0,
        threads=threads,
        seed=seed,
    )
    ref, best = result.reference, result.best
    click.echo(
        f"best: {best.name} scored {best.score:g} (as written: {ref.score:g}); config in {result.best_config}"
    )


@main.command()
@click.argument("out", type=click.Path(file_okay=False), default="demo-out")
@click.option("--max-memory", type=SIZE, default="64MiB")
@_friendly
def demo(out, max_memory) -> None:
    """Make three small Llama-shaped checkpoints in OUT/models, merge them (linear) into
    OUT/merged, verify the result and print a summary. Downloads nothing.

    Example: streammerge demo demo-out
    """
    from pathlib import Path

    from .demo import DEMO_CONFIG, make_demo_models
    from .execute import merge as run_merge
    from .integrity import verify as run_verify

    root = Path(out)
    models = make_demo_models(root)
    click.echo(f"checkpoints   {', '.join(str(p) for p in models.values())}")
    cfg = root / "merge.yml"
    cfg.write_text(DEMO_CONFIG.format(root=root))
    click.echo(f"config        {cfg}")
    summary = run_merge(cfg, root / "merged", max_memory=max_memory, force=True, progress=sys.stderr.isatty())
    click.echo(summary.line())
    n = run_verify(root / "merged")
    click.echo(f"verified      {n} tensors match {root / 'merged' / 'streammerge.json'}")
    click.echo(_demo_sample(models, root / "merged"))


def _demo_sample(models, merged) -> str:
    """One tensor's first values in each input and the output, checked by hand."""
    import numpy as np

    from .checkpoint import Reader, open_checkpoint

    name = "model.layers.0.self_attn.q_proj.weight"
    reader = Reader()
    vals = {}
    for label, path in [*models.items(), ("merged", merged)]:
        ref = open_checkpoint(path).tensors[name]
        buf = np.empty(4 * 2, np.uint8)
        reader.read(ref, 0, 4, memoryview(buf))
        vals[label] = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    reader.close()
    expect = 0.4 * vals["ft1"] + 0.4 * vals["ft2"] + 0.2 * vals["base"]
    rows = [f"{k:<7} {np.array2string(v, precision=5)}" for k, v in vals.items()]
    ok = np.allclose(vals["merged"], expect, rtol=1e-2)
    rows.append(
        f"check   0.4*ft1 + 0.4*ft2 + 0.2*base = {np.array2string(expect, precision=5)}"
        f" -> {'matches' if ok else 'MISMATCH'} (bf16)"
    )
    return f"sample        {name}[:4]\n  " + "\n  ".join(rows)


# batch, run-shard and finalize: many merges, many machines.
from .cli_many import batch, finalize, run_shard  # noqa: E402  (imports no cli: no cycle under -m)

for _command in (batch, finalize, run_shard):
    main.add_command(_command)

if __name__ == "__main__":
    main()
