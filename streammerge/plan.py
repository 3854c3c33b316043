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
import sys
from dataclasses import dataclass, field

from . import __version__
from .checkpoint import Checkpoint, TensorRef, open_checkpoint
from .config import MergeConfig, Scalar, load_config, resolve_all
from .derive import scratch_nbytes
from .digest import DIGEST
from .errors import BudgetError, CheckpointError, Collector
from .header import FLOAT_DTYPES, ITEMSIZE, encode_header
from .layers import Route, config_updates, routes
from .methods import GTA, SPECS, row_elems
from .params import value_problems
from .problems import Findings, architecture_problems, extra_tensor_problems, unmatched_filters
from .vocab import TOKEN_TENSORS, VocabPlan, apply_tokenizer, resolve_template, tie_lm_head

DEFAULT_SHARD_NBYTES = 5_000_000_000  # mergekit's default --out-shard-size, in bytes
COPY = "copy"  # pseudo-method: non-float tensors are copied from the reference model
BLOCK_ELEMS = 1 << 20  # largest compute block: kernels run on blocks, not whole chunks
MIN_BLOCK_ELEMS = 1 << 16
# glibc keeps freed kernel temporaries as heap holes: measured with the compiled loops and
# the allocator settings of ``methods.heap`` (freed heap kept between blocks), the peak RSS of
# every method at 1.5-6 GB per model sits about 8 fp32 words per block element above the
# live buffers and temporaries, eager or compiled (16 before those settings).
HEAP_SLACK_WORDS = 8
# Blocks of many sizes (each tensor's last) fragment the heap by a further 7-9 MiB at any
# budget (measured at 16-64 MiB): part of the runtime, beside --max-memory.
HEAP_FIXED_NBYTES = 8 << 20
# Resident memory of the runtime before any merge: the interpreter, numpy, numba with the
# compiled loops (~110 MiB of it, mostly LLVM) and our modules with the CLI, measured on
# Linux x86-64 at 150 MiB (36 MiB before the executor); --max-memory comes on top.
RUNTIME_NBYTES = 152 << 20
# torch (CPU build 2.13) and the kernel modules on top of it, loaded only when a job needs
# them (``torch_free``). Measured 2026-11-27 over every torch method at 1.5-6 GB per model:
# 164 MiB; 204 MiB before the compiled loops loaded on first use (a50f991), when importing
# a kernel module loaded every loop it declares.
TORCH_NBYTES = 164 << 20
# torch sums up to this many float32 values in order (beyond, its vectorized sum has an
# order of its own): linear's divisor is made without torch only up to here
IN_ORDER_SUM = 4
STAT_SLACK_WORDS = 6  # statistics folds: few, block-sized temporaries
# Statistics blocks the scratch holds at once where they are larger than the combine's
# (slerp's 1M-element blocks): with one, the folds ran one block at a time on one core
STAT_FOLDS = 2
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
    # combine pass; elements per read chunk, per compute block, per statistics block; how
    # many statistics blocks fold at once where they outgrow the combine's scratch.
    passes: int = 0
    chunk_elems: int = 0
    block_elems: int = 0
    stat_block_elems: int = 0
    stat_folds: int = 1

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
    torch: bool = True  # some job runs a torch kernel (``torch_free``)
    # read sets and write buffers resident at the peak (``_resident_buffers``; None: all four full)
    buffers_nbytes: int | None = None

    @property
    def peak_nbytes(self) -> int:
        full = 2 * self.read_set_nbytes + 2 * self.write_buffer_nbytes
        return (
            (full if self.buffers_nbytes is None else self.buffers_nbytes)
            + self.scratch_nbytes
            + self.derive_nbytes
        )

    @property
    def peak_rss_nbytes(self) -> int:
        """The whole process on the CPU: the runtime (interpreter, numpy, numba), torch where
        a job runs a torch kernel (``torch_free``), the heap's fragmentation where jobs make
        block temporaries, and the buffers."""
        heap = HEAP_FIXED_NBYTES if self.scratch_nbytes else 0
        return RUNTIME_NBYTES + (TORCH_NBYTES if self.torch else 0) + heap + self.peak_nbytes


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
    # Keys to set in the donor's config.json so it matches the tensors written.
    config_updates: dict = field(default_factory=dict)

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
            "estimated_peak_rss_nbytes": e.peak_rss_nbytes,
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
    """Plan a merge from headers alone. ``max_memory`` 0 means the default budget.
    Every problem found in the inputs is reported together, one line each."""
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    budget = max_memory or default_max_memory()
    if budget < MIN_MAX_MEMORY:
        raise BudgetError(f"--max-memory {budget} bytes is too small; use at least 8MiB")
    probs = Collector()
    ckpts: dict[str, Checkpoint] = {}
    for m in cfg.models:
        with probs.each():
            try:
                ckpts[m.model] = open_checkpoint(m.model)
            except CheckpointError as e:
                key = m.key if m.key == "base_model" else f"{m.key}.model"
                raise CheckpointError(f"{cfg.source}: {key}: {e}") from None
    if cfg.donor not in ckpts:
        probs.check()
    untied, vocab = False, None
    order = [m.model for m in cfg.models]
    if all(m in ckpts for m in order):  # tied heads and vocabularies need every input
        inputs, untied = tie_lm_head([ckpts[m] for m in order])
        if cfg.tokenizer is not None:
            with probs.each():
                inputs, vocab = apply_tokenizer(cfg, inputs, order.index(cfg.donor), _promote)
            probs.check()
        ckpts = dict(zip(order, inputs))
    checks = Findings(cfg)
    skip = set(architecture_problems(cfg, ckpts, checks)) | {
        m.model for m in cfg.models if m.model not in ckpts
    }
    routing = routes(cfg, {m: list(c.tensors) for m, c in ckpts.items() if m not in skip})
    for line in routing.problems:
        checks.add(("layers", line), f"{cfg.source}: {line}")
    skip |= routing.skip
    if not cfg.frankenmerge:
        extra_tensor_problems(cfg, ckpts, skip, checks)
    unresolved = []
    for r in routing.routes:
        job = _job(cfg, r, ckpts, skip, checks)
        if job is not None:
            unresolved.append(job)
    unmatched_filters(cfg, routing, checks)
    probs.errors += checks.errors()
    probs.check()
    layout, placed = _layout(unresolved, shard_nbytes)
    jobs = tuple(
        sorted(
            (_replace_place(j, *placed[j.name]) for j in unresolved),
            key=lambda j: (j.shard, j.offset),
        )
    )
    estimate, jobs = _estimate(jobs, budget)
    donor = cfg.donor
    tok = cfg.tokenizer.source if cfg.tokenizer is not None else None
    tokenizer_from = donor if tok in (None, "base", "union") else tok
    template = resolve_template(cfg.chat_template, [c.directory for c in ckpts.values()])
    fingerprints = tuple(f for c in ckpts.values() for f in c.files)
    updates = config_updates(ckpts[donor].config, routing.layer_sources) if cfg.frankenmerge else {}
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
        vocab,
        template,
        untied,
        updates,
    )


def default_max_memory() -> int:
    """Half of the memory available now, at most 8 GiB (leave room for page cache)."""
    import psutil

    return max(MIN_MAX_MEMORY, min(8 << 30, psutil.virtual_memory().available // 2))


def _job(cfg: MergeConfig, r: Route, ckpts, skip, checks: Findings) -> Job | None:
    sl = cfg.slices[r.slice]
    ref_i = sl.base_index if sl.base_index is not None else 0
    ref_model = sl.sources[ref_i].model
    if any(m.model in skip for m in sl.sources):
        return None
    ref_t = ckpts[ref_model].tensors.get(r.inputs[ref_i])
    label = "base" if sl.base_index == ref_i else ref_model
    refs = []
    for i, m in enumerate(sl.sources):
        t = ckpts[m.model].tensors.get(r.inputs[i])
        if t is None:
            holder = (
                ref_model
                if ref_t is not None
                else next(
                    (s.model for s, n in zip(sl.sources, r.inputs) if n in ckpts[s.model].tensors), None
                )
            )
            if holder is not None:
                checks.add(
                    ("missing", m.model), f"{m.model}: tensor {r.inputs[i]} is missing (it is in {holder})"
                )
        elif ref_t is not None and t.shape != ref_t.shape:
            hint = ""
            if r.name in TOKEN_TENSORS and t.shape[1:] == ref_t.shape[1:]:
                hint = (
                    "; the vocabularies differ: set tokenizer_source (base, union or a model) or tokenizer:"
                )
            checks.add(("shape", m.model, bool(hint)), f"{t.path}: tensor {r.inputs[i]} has shape"
                       f" {list(t.shape)}, {label} has {list(ref_t.shape)}{hint}")  # fmt: skip
        refs.append(t)
    if any(t is None for t in refs) or any(t.shape != ref_t.shape for t in refs):
        return None
    dtypes = {t.dtype for t in refs}
    if not dtypes <= FLOAT_DTYPES:
        if len(dtypes) > 1:
            checks.add(
                ("dtype", r.name),
                f"{refs[0].path}: tensor {r.name} has dtypes {sorted(dtypes)} across models",
            )
            return None
        # Non-float buffers (position ids, masks) are copied from the reference model.
        d = ref_t.dtype
        return Job(r.name, COPY, (ref_t,), None, ({},), {}, d, d, ref_t.shape, -1, -1)
    spec = SPECS[sl.merge_method]
    shared, inputs = resolve_all(cfg, sl, r.name, r.t, r.inputs)
    for i, params in enumerate([shared, *inputs]):
        for value, key in params.values():
            if value is None:  # a required parameter whose filters all miss this tensor
                model = f" for {sl.sources[i - 1].model}" if i else ""
                checks.add(("param", key), f"{cfg.source}: {key}: required by {spec.name}{model}, but no"
                           f" filter matches tensor {r.inputs[i - 1] if i else r.name}")  # fmt: skip
    if any(v is None for p in [shared, *inputs] for v, _ in p.values()):
        return None
    for key, msg in value_problems(spec, shared, inputs, sl.base_index):
        checks.add(("param", key, msg), f"{cfg.source}: {key}: {msg} (tensor {r.name})")
    work = cfg.dtype or _promote(dtypes)
    out = cfg.out_dtype or work
    input_params = tuple({k: v for k, (v, _) in p.items()} for p in inputs)
    shared_params = {k: v for k, (v, _) in shared.items()}
    return Job(r.name, spec.name, tuple(refs), sl.base_index, input_params, shared_params, work, out,
               ref_t.shape, -1, -1)  # fmt: skip


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


def _in_item(j: Job) -> int:
    """Bytes of one element of every input of ``j``: a read set's size per element."""
    return sum(ITEMSIZE[t.dtype] for t in j.inputs)


def _buffer_bytes(j: Job) -> int:
    """Bytes per chunk element of ``j``'s two read sets and two write buffers."""
    return 2 * _in_item(j) + 2 * ITEMSIZE[j.out_dtype]


COMBINE = -1  # phase of a chunk that is merged and written
ALL = -2  # phase of a resident tensor: every pass, then combine, on one read


def schedule_job(job: Job):
    """``job``'s reads, (job, phase, start, stop), in execution order: a tensor that needs
    statistics is read once per pass unless it fits in one chunk."""
    n, step = job.numel, job.chunk_elems
    ranges = [(s, min(n, s + step)) for s in range(0, max(n, 1), step)]
    if job.passes and job.resident:
        yield job, ALL, 0, n
        return
    for phase in [*range(job.passes), COMBINE]:
        for start, stop in ranges:
            yield job, phase, start, stop


def _resident_buffers(jobs: tuple[Job, ...]) -> int:
    """Bytes of the read sets and write buffers resident at the peak, following the
    executor's buffers through the schedule: both kinds are handed back in order, so read k
    fills read set k % 2 and written chunk k write buffer k % 2. A write buffer, or a read
    set inputs are copied into, keeps the pages of the largest chunk it held; a job whose
    inputs are all mapped (on disk, aligned to their dtype: the page cache's pages, the
    read set's own handed back) holds its chunk only while it is in flight: while read i
    is merged, the reader maps read i + 1."""
    reads = []  # per read: (bytes read, whether mapped, bytes written)
    for j in jobs:
        mapped = all(t.derive is None and t.offset % ITEMSIZE[t.dtype] == 0 for t in j.inputs)
        for _, phase, start, stop in schedule_job(j):
            out = (stop - start) * ITEMSIZE[j.out_dtype] if phase in (COMBINE, ALL) else 0
            reads.append(((stop - start) * _in_item(j), mapped, out))
    read_hw, write_hw, written, peak = [0, 0], [0, 0], 0, 0
    for i, (size, mapped, out) in enumerate(reads):
        after = reads[i + 1] if i + 1 < len(reads) else (0, True, 0)
        for k, (n, m, _) in ((i, reads[i]), (i + 1, after)):
            if not m:
                read_hw[k % 2] = max(read_hw[k % 2], n)
        if out:
            write_hw[written % 2] = max(write_hw[written % 2], out)
            written += 1
        flight = (size if mapped else 0) + (after[0] if after[1] else 0)
        peak = max(peak, sum(read_hw) + flight + sum(write_hw))
    return peak


def _estimate(jobs: tuple[Job, ...], budget: int) -> Estimate:
    block = compute_block(jobs, budget)
    folds = _stat_folds(jobs, block, budget)
    scratch = max((compute_scratch(j, block, folds) for j in jobs), default=0)
    derive = max((scratch_nbytes(t) for j in jobs for t in j.inputs), default=0)
    per_elem = max((_buffer_bytes(j) for j in jobs), default=1)
    chunk = (budget - scratch - derive) // per_elem // block * block
    if chunk < block:
        need = scratch + derive + block * per_elem
        raise BudgetError(f"--max-memory {budget} bytes is too small for this plan; it needs at least {need}")
    jobs = tuple(_balanced(_streaming(j, chunk, block, budget, folds)) for j in jobs)
    read_set = max((min(j.chunk_elems, j.numel) * _in_item(j) for j in jobs), default=0)
    write_buf = max((min(j.chunk_elems, j.numel) * ITEMSIZE[j.out_dtype] for j in jobs), default=0)
    reads = sum(t.nbytes * (1 if j.resident else j.passes + 1) for j in jobs for t in j.inputs)
    estimate = Estimate(
        budget, chunk, block, read_set, write_buf, scratch,
        read_nbytes=reads, write_nbytes=sum(j.out_nbytes for j in jobs), derive_nbytes=derive,
        torch=not all(torch_free(j) for j in jobs), buffers_nbytes=_resident_buffers(jobs),
    )  # fmt: skip
    return estimate, jobs


def compute_block(jobs, budget: int, workers: int = 1) -> int:
    """Elements per compute block: halved from BLOCK_ELEMS until ``workers`` blocks'
    scratch fits a quarter of the budget (a floor of MIN_BLOCK_ELEMS). Copies count one
    word: their chunks hold whole blocks, so a block must fit the budget too."""
    words = max((_block_words(j) for j in jobs), default=0)
    block = BLOCK_ELEMS
    while block > MIN_BLOCK_ELEMS and workers * block * 4 * words > budget // 4:
        block //= 2
    return block


def _block_words(j: Job) -> int:
    """Words per block element that size the blocks: the scratch, or for a job merged straight
    from the read sets (none) the bytes of its two read sets and write buffers, since its
    chunks must hold whole blocks."""
    words = sum(_scratch_words(j))
    if words == 0 and not copies(j):
        return -(-_buffer_bytes(j) // 4)
    return max(1, words)


def compute_scratch(j: Job, block: int, folds: int | None = None) -> int:
    """Bytes of ``j``'s compute scratch with ``block``-element compute blocks. Statistics
    passes run on their own fixed blocks (slerp: 1M elements, rows: whole rows), which can
    be larger than the combine block: scratch covers the largest, ``folds`` of them (the
    job's ``stat_folds`` by default) folding on several cores at once. Statistics folds
    make few, block-sized temporaries: little heap slack."""
    words, slack = _scratch_words(j)
    if not words:
        return 0
    stat, blk = _blocks(j, block)
    folds = j.stat_folds if folds is None else folds
    return max(blk * (words + slack), folds * _stat_scratch(stat, words, slack)) * 4


def _stat_folds(jobs, block: int, budget: int) -> int:
    """STAT_FOLDS where their scratch fits a quarter of the budget, as ``compute_block``
    sizes the combine's; else 1 (a small budget keeps its smallest scratch)."""
    wide = max((compute_scratch(j, block, STAT_FOLDS) for j in jobs), default=0)
    return STAT_FOLDS if wide <= budget // 4 else 1


def _stat_scratch(stat: int, words: int, slack: int) -> int:
    """Words of one statistics block's fold."""
    return stat * (words + min(slack, STAT_SLACK_WORDS))


def copies(j: Job) -> bool:
    """``j``'s output is its one input's bytes, or their product with a scale, written
    straight into the output buffer (no kernel, no scratch): non-float buffers, and a
    passthrough whose input, working and output dtypes are one."""
    if j.method != "passthrough":
        return j.method == COPY
    same = j.inputs[0].dtype == j.out_dtype
    return same and (j.input_params[0]["scale"] == 1.0 or j.work_dtype == j.out_dtype)


def direct(j: Job) -> bool:
    """Whether ``j``'s combine runs straight from the read sets into the write buffer, with
    no block temporaries (``MethodSpec.direct``; statistics passes would need scratch)."""
    if j.method not in SPECS:
        return False
    spec = SPECS[j.method]
    stored = {t.dtype for t in j.inputs}
    one = stored.pop() if len(stored) == 1 else None
    passes = spec.passes(j.work_dtype, j.shared_params)
    return not passes and spec.direct(one, j.work_dtype, j.out_dtype, j.shared_params, j.input_params)


def torch_free(j: Job) -> bool:
    """Whether ``j`` runs without torch on the CPU (``methods.direct``'s loops): a bit copy,
    or a scaled one of bfloat16 or float32; a direct job of linear or the gta family, but
    linear normalizing more weights than torch sums in order; model_stock over the whole
    tensor with inputs, D and output one dtype (bfloat16 or float32) and no more pairs of
    fine-tunes than torch sums in order."""
    if copies(j):
        return j.method == COPY or j.input_params[0]["scale"] == 1.0 or j.out_dtype in ("BF16", "F32")
    if j.method == "model_stock":
        one = {t.dtype for t in j.inputs} == {j.work_dtype} and j.work_dtype == j.out_dtype
        count = len(j.inputs) - 1
        whole = not j.shared_params.get("filter_wise")
        return one and j.work_dtype in ("BF16", "F32") and whole and count * (count - 1) // 2 <= IN_ORDER_SUM
    if not direct(j) or j.method not in ("linear", *GTA):
        return False
    return j.method != "linear" or not j.shared_params.get("normalize", True) or len(j.inputs) <= IN_ORDER_SUM


def _scratch_words(j: Job) -> tuple[int, int]:
    """(words, heap slack words) per block element: none for copies and ``direct``'s loops,
    which run on the read sets' bytes into the write buffer (folds included)."""
    if copies(j) or torch_free(j):
        return 0, 0
    spec = SPECS[j.method]
    compiled = spec.compiled(j.work_dtype, j.shared_params, len(j.inputs))
    per_input, fixed = compiled or (spec.scratch_per_input, spec.scratch_fixed)
    return per_input * len(j.inputs) + fixed, HEAP_SLACK_WORDS


def fold_window(j: Job) -> int:
    """Statistics blocks of ``j`` that may be folded at once: as many as fit in the
    scratch the plan counts (``compute_scratch``); any number for loops that fold views of
    the read set."""
    words, slack = _scratch_words(j)
    if not words:
        return sys.maxsize
    one = _stat_scratch(max(j.stat_block_elems, 1), words, slack)
    return max(1, compute_scratch(j, j.block_elems) // 4 // one)


def _blocks(j: Job, block: int) -> tuple[int, int]:
    """(statistics block, combine block) in elements: statistics passes need fixed blocks
    aligned to the tensor start (powers of two), or whole rows for row-wise methods."""
    spec = SPECS.get(j.method)
    passes = spec.passes(j.work_dtype, j.shared_params) if spec and j.numel else 0
    if spec is not None and spec.rows(j.shared_params):
        row = row_elems(j.shape)
        stat = max(1, spec.stat_block // row) * row
        return stat, max(1, block // stat) * stat  # compute blocks: whole statistics blocks
    if passes:
        return spec.stat_block, block
    return block, block


def _streaming(j: Job, chunk: int, block: int, budget: int, folds: int = 1) -> Job:
    """Fix a job's passes and its chunk/block sizes: statistics passes need fixed blocks
    aligned to the tensor start (or whole rows), so every chunk holds whole blocks;
    ``folds`` statistics blocks fold at once."""
    from dataclasses import replace

    spec = SPECS.get(j.method)
    passes = spec.passes(j.work_dtype, j.shared_params) if spec and j.numel else 0
    stat, blk = _blocks(j, block)
    unit = max(stat, blk)
    if j.numel > chunk and chunk < unit:
        raise BudgetError(
            f"tensor {j.name}: {j.method} streams it in blocks of {unit} elements, which"
            f" --max-memory {budget} bytes cannot hold; raise --max-memory"
        )
    return replace(j, passes=passes, chunk_elems=chunk // unit * unit or chunk, block_elems=blk,
                   stat_block_elems=stat, stat_folds=folds)  # fmt: skip


def _balanced(j: Job) -> Job:
    """A streamed tensor in chunks of equal size (whole blocks), as few as before: the two
    buffers the chunks alternate between are then both filled, so the buffers the plan
    counts are the memory the merge touches (a 65M-element embedding in 55M + 10M chunks
    touched one buffer's first 10M elements only)."""
    from dataclasses import replace

    if j.numel <= j.chunk_elems:
        return j
    unit = max(j.stat_block_elems, j.block_elems, 1)
    chunks = -(-j.numel // j.chunk_elems)
    per_chunk = -(-j.numel // chunks)
    return replace(j, chunk_elems=-(-per_chunk // unit) * unit)


def _plan_hash(cfg, jobs, layout, fingerprints, seed) -> str:
    doc = {
        "version": __version__,
        "digest": DIGEST,  # journaled digests of another kind cannot be re-checked
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
