"""Config + checkpoint headers -> ``Plan(jobs, layout, estimate)``, before any weight is read.

One ``Job`` per output tensor: its inputs in gather order, the method, the resolved
parameters and dtypes, and where its bytes go. The ``Layout`` fixes every shard's name,
header bytes and tensor offsets, so it is the same on every machine and every retry.
The ``Estimate`` is the exact size of the buffers the executor allocates.
Every name, shape and dtype error surfaces here. This module never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

from . import __version__
from .checkpoint import Checkpoint, TensorRef, open_checkpoint
from .config import MergeConfig, Scalar, load_config
from .derive import scratch_nbytes
from .errors import BudgetError, CheckpointError, ShapeError
from .header import FLOAT_DTYPES, ITEMSIZE, encode_header
from .methods import SPECS, Scope
from .vocab import TOKEN_TENSORS, VocabPlan, apply_tokenizer, resolve_template, tie_lm_head

DEFAULT_SHARD_NBYTES = 5_000_000_000  # mergekit's default --out-shard-size, in bytes
COPY = "copy"  # pseudo-method: non-float tensors are copied from the reference model
BLOCK_ELEMS = 1 << 20  # largest compute block: kernels run on blocks, not whole chunks
MIN_BLOCK_ELEMS = 1 << 16
# glibc keeps freed kernel temporaries as heap holes: measured, the heap plateaus at about
# 16 fp32 words per block element above the live temporaries (60 MiB at 1M-element blocks).
HEAP_SLACK_WORDS = 16
MIN_MAX_MEMORY = 8 << 20


@dataclass(frozen=True, slots=True)
class Job:
    """How to produce one output tensor."""

    name: str
    method: str  # a MethodSpec name, or COPY
    inputs: tuple[TensorRef, ...]  # gather order
    base_index: int | None  # position of the base model among ``inputs``
    input_params: tuple[dict[str, Scalar], ...]  # per input, per-model parameters
    shared_params: dict[str, Scalar]
    work_dtype: str  # the dtype D the math is done in (safetensors code)
    out_dtype: str
    shape: tuple[int, ...]
    shard: int  # index into Layout.shards
    offset: int  # absolute byte offset of the tensor's data in the shard file
    # How the executor streams it (set with the estimate): statistics passes before the
    # combine pass; elements per read chunk, per compute block, per statistics block.
    passes: int = 0
    chunk_elems: int = 0
    block_elems: int = 0
    stat_block_elems: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def resident(self) -> bool:
        """One read serves every pass: the whole tensor fits in one chunk."""
        return self.numel <= self.chunk_elems

    @property
    def out_nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.out_dtype]


@dataclass(frozen=True, slots=True)
class Shard:
    file_name: str
    header: bytes  # 8-byte length + JSON, as safetensors.torch.save_file writes it
    nbytes: int  # whole file
    tensors: tuple[str, ...]  # in file order


@dataclass(frozen=True, slots=True)
class Layout:
    shards: tuple[Shard, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


@dataclass(frozen=True, slots=True)
class Estimate:
    """The tensor memory the executor allocates: two read sets (one merging, one
    prefetching), two write buffers (one computing, one flushing) and compute scratch."""

    max_memory: int
    chunk_elems: int  # elements per input chunk
    block_elems: int  # elements per compute block
    read_set_nbytes: int
    write_buffer_nbytes: int
    scratch_nbytes: int
    read_nbytes: int  # input bytes read over the whole merge
    write_nbytes: int  # output bytes written
    derive_nbytes: int = 0  # reader-thread scratch for inputs computed on read (derive)

    @property
    def peak_nbytes(self) -> int:
        return (
            2 * self.read_set_nbytes + 2 * self.write_buffer_nbytes + self.scratch_nbytes + self.derive_nbytes
        )


@dataclass(frozen=True, slots=True)
class Plan:
    config: MergeConfig
    jobs: tuple[Job, ...]  # execution order: shard by shard, by offset
    layout: Layout
    estimate: Estimate
    donor: str  # model whose config.json (and, by default, tokenizer) the output gets
    tokenizer_from: str
    fingerprints: tuple  # FileFingerprint of every input file
    seed: int
    plan_hash: str
    shard_nbytes: int = DEFAULT_SHARD_NBYTES  # the --shard-size the layout was packed for
    vocab: VocabPlan | None = None  # the output vocabulary, when a tokenizer is configured
    chat_template: str | None = None  # resolved (``auto`` looked up)
    untied: bool = False  # an lm_head is written for inputs that tie it (tie_word_embeddings: false)

    def to_dict(self) -> dict:
        """A JSON-ready summary (``streammerge plan --json``)."""
        e = self.estimate
        return {
            "plan_hash": self.plan_hash,
            "merge_method": self.config.merge_method,
            "models": [m.model for m in self.config.models],
            "base_model": self.config.base_model,
            "tensors": len(self.jobs),
            "shards": [
                {"file": s.file_name, "nbytes": s.nbytes, "tensors": len(s.tensors)}
                for s in self.layout.shards
            ],
            "read_nbytes": e.read_nbytes,
            "write_nbytes": e.write_nbytes,
            "max_memory": e.max_memory,
            "estimated_peak_nbytes": e.peak_nbytes,
            "chunk_elems": e.chunk_elems,
            "donor": self.donor,
            "tokenizer_from": self.tokenizer_from,
        }


def make_plan(
    config: MergeConfig | str | os.PathLike,
    *,
    max_memory: int = 0,
    shard_nbytes: int = DEFAULT_SHARD_NBYTES,
    seed: int = 0,
) -> Plan:
    """Plan a merge from headers alone. ``max_memory`` 0 means the default budget."""
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    budget = max_memory or default_max_memory()
    if budget < MIN_MAX_MEMORY:
        raise BudgetError(f"--max-memory {budget} bytes is too small; use at least 8MiB")
    ckpts = []
    for m in cfg.models:
        try:
            ckpts.append(open_checkpoint(m.model))
        except CheckpointError as e:
            key = m.key if m.key == "base_model" else f"{m.key}.model"
            raise CheckpointError(f"{cfg.source}: {key}: {e}") from None
    ref_i = cfg.base_index if cfg.base_index is not None else 0
    ckpts, untied = tie_lm_head(ckpts)
    vocab = apply_tokenizer(cfg, ckpts, ref_i, _promote) if cfg.tokenizer is not None else None
    if vocab is not None:
        ckpts = vocab[0]
    ref = ckpts[ref_i]
    for m, c in zip(cfg.models, ckpts):
        extra = next((name for name in c.tensors if name not in ref.tensors), None)
        if extra is not None:
            ref_model = cfg.models[ref_i].model
            raise ShapeError(f"{ref_model}: tensor {extra} is missing (it is in {m.model})")
    unresolved = [_job_inputs(cfg, ckpts, ref_i, name) for name in ref.tensors]
    layout, placed = _layout(unresolved, shard_nbytes)
    jobs = tuple(
        sorted(
            (_replace_place(j, *placed[j.name]) for j in unresolved),
            key=lambda j: (j.shard, j.offset),
        )
    )
    estimate, jobs = _estimate(jobs, budget)
    donor = cfg.models[ref_i].model
    tok = cfg.tokenizer.source if cfg.tokenizer is not None else None
    tokenizer_from = donor if tok in (None, "base", "union") else tok
    template = resolve_template(cfg.chat_template, [c.directory for c in ckpts])
    fingerprints = tuple(f for c in ckpts for f in c.files)
    return Plan(
        cfg,
        jobs,
        layout,
        estimate,
        donor,
        tokenizer_from,
        fingerprints,
        seed,
        _plan_hash(cfg, jobs, layout, fingerprints, seed),
        shard_nbytes,
        vocab[1] if vocab is not None else None,
        template,
        untied,
    )


def default_max_memory() -> int:
    """Half of the memory available now, at most 8 GiB (leave room for page cache)."""
    import psutil

    return max(MIN_MAX_MEMORY, min(8 << 30, psutil.virtual_memory().available // 2))


def _job_inputs(cfg: MergeConfig, ckpts: list[Checkpoint], ref_i: int, name: str) -> Job:
    ref_model = cfg.models[ref_i].model
    ref_t = ckpts[ref_i].tensors[name]
    label = "base" if cfg.base_index == ref_i else ref_model
    refs = []
    for m, c in zip(cfg.models, ckpts):
        t = c.tensors.get(name)
        if t is None:
            raise ShapeError(f"{m.model}: tensor {name} is missing (it is in {ref_model})")
        if t.shape != ref_t.shape:
            hint = ""
            if name in TOKEN_TENSORS and t.shape[1:] == ref_t.shape[1:]:
                hint = (
                    "; the vocabularies differ: set tokenizer_source (base, union or a model) or tokenizer:"
                )
            raise ShapeError(
                f"{t.path}: tensor {name} has shape {list(t.shape)}, {label} has {list(ref_t.shape)}{hint}"
            )
        refs.append(t)
    dtypes = {t.dtype for t in refs}
    if not dtypes <= FLOAT_DTYPES:
        if len(dtypes) > 1:
            raise ShapeError(f"{refs[0].path}: tensor {name} has dtypes {sorted(dtypes)} across models")
        # Non-float buffers (position ids, masks) are copied from the reference model.
        d = ref_t.dtype
        return Job(name, COPY, (ref_t,), None, ({},), {}, d, d, ref_t.shape, -1, -1)
    spec = SPECS[cfg.merge_method]
    work = cfg.dtype or _promote(dtypes)
    out = cfg.out_dtype or work
    base_i = cfg.base_index
    input_params = tuple(
        {
            p.name: m.parameters.get(p.name, cfg.parameters.get(p.name, p.default))
            for p in spec.params
            if p.scope is Scope.INPUT or (p.scope is Scope.NON_BASE and i != base_i)
        }
        for i, m in enumerate(cfg.models)
    )
    shared = {p.name: cfg.parameters.get(p.name, p.default) for p in spec.params if p.scope is Scope.SHARED}
    return Job(name, spec.name, tuple(refs), base_i, input_params, shared, work, out, ref_t.shape, -1, -1)


def _promote(dtypes: set[str]) -> str:
    """torch.promote_types over float dtypes: F16 with BF16 gives F32."""
    if "F64" in dtypes:
        return "F64"
    if "F32" in dtypes or len(dtypes) > 1:
        return "F32"
    return next(iter(dtypes))


def _layout(jobs: list[Job], shard_nbytes: int) -> tuple[Layout, dict[str, tuple[int, int]]]:
    """Pack tensors in reference order into shards (mergekit's flush rule), then lay each
    shard out exactly as safetensors.torch.save_file would."""
    groups: list[list[Job]] = [[]]
    size = 0
    for j in jobs:
        if groups[-1] and size + j.out_nbytes > shard_nbytes:
            groups.append([])
            size = 0
        groups[-1].append(j)
        size += j.out_nbytes
    n = len(groups)
    shards, placed = [], {}
    for i, group in enumerate(groups):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header, infos = encode_header([(j.name, j.out_dtype, j.shape) for j in group], {"format": "pt"})
        for tname, info in infos.items():
            placed[tname] = (i, len(header) + info.begin)
        data = sum(info.nbytes for info in infos.values())
        shards.append(Shard(name, header, len(header) + data, tuple(infos)))
    return Layout(tuple(shards)), placed


def _replace_place(job: Job, shard: int, offset: int) -> Job:
    from dataclasses import replace

    return replace(job, shard=shard, offset=offset)


def _estimate(jobs: tuple[Job, ...], budget: int) -> Estimate:
    def in_item(j: Job) -> int:
        return sum(ITEMSIZE[t.dtype] for t in j.inputs)

    def scratch_words(j: Job) -> int:
        if j.method == COPY:
            return 0
        spec = SPECS[j.method]
        return spec.scratch_per_input * len(j.inputs) + spec.scratch_fixed

    words = max((scratch_words(j) for j in jobs), default=0)
    # Compute blocks shrink with the budget so scratch stays within a quarter of it.
    block = BLOCK_ELEMS
    while block > MIN_BLOCK_ELEMS and block * 4 * (words + HEAP_SLACK_WORDS) > budget // 4:
        block //= 2
    scratch = block * 4 * (words + HEAP_SLACK_WORDS) if words else 0
    derive = max((scratch_nbytes(t) for j in jobs for t in j.inputs), default=0)
    per_elem = max((2 * in_item(j) + 2 * ITEMSIZE[j.out_dtype] for j in jobs), default=1)
    chunk = (budget - scratch - derive) // per_elem // block * block
    if chunk < block:
        need = scratch + derive + block * per_elem
        raise BudgetError(f"--max-memory {budget} bytes is too small for this plan; it needs at least {need}")
    jobs = tuple(_streaming(j, chunk, block, budget) for j in jobs)
    read_set = max((min(chunk, j.numel) * in_item(j) for j in jobs), default=0)
    write_buf = max((min(chunk, j.numel) * ITEMSIZE[j.out_dtype] for j in jobs), default=0)
    reads = sum(t.nbytes * (1 if j.resident else j.passes + 1) for j in jobs for t in j.inputs)
    estimate = Estimate(
        budget, chunk, block, read_set, write_buf, scratch,
        read_nbytes=reads, write_nbytes=sum(j.out_nbytes for j in jobs), derive_nbytes=derive,
    )  # fmt: skip
    return estimate, jobs


def _streaming(j: Job, chunk: int, block: int, budget: int) -> Job:
    """Fix a job's passes and its chunk/block sizes: statistics passes need fixed blocks
    aligned to the tensor start (or whole rows), so every chunk holds whole blocks."""
    from dataclasses import replace

    spec = SPECS.get(j.method)
    passes = spec.passes(j.work_dtype, j.shared_params) if spec and j.numel else 0
    if spec is not None and spec.rows(j.shared_params):
        row = j.shape[-1] if len(j.shape) >= 2 else max(j.numel, 1)
        stat = blk = max(1, spec.stat_block // row) * row
    elif passes:  # combine blocks need no alignment; statistics blocks do (powers of two)
        stat, blk = spec.stat_block, block
    else:
        stat = blk = block
    unit = max(stat, blk)
    if j.numel > chunk and chunk < unit:
        raise BudgetError(
            f"tensor {j.name}: {j.method} streams it in blocks of {unit} elements, which"
            f" --max-memory {budget} bytes cannot hold; raise --max-memory"
        )
    return replace(j, passes=passes, chunk_elems=chunk // unit * unit or chunk, block_elems=blk,
                   stat_block_elems=stat)  # fmt: skip


def _plan_hash(cfg, jobs, layout, fingerprints, seed) -> str:
    doc = {
        "version": __version__,
        "config": cfg.to_dict(),
        "seed": seed,
        "inputs": [[f.path, f.nbytes, f.header_nbytes] for f in fingerprints],
        "jobs": [
            [
                j.name,
                j.method,
                [[t.path, t.offset, t.dtype, repr(t.derive)] for t in j.inputs],
                j.input_params,
                j.shared_params,
                j.work_dtype,
                j.out_dtype,
                j.shard,
                j.offset,
            ]
            for j in jobs
        ],
        "shards": [[s.file_name, hashlib.sha256(s.header).hexdigest()] for s in layout.shards],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
