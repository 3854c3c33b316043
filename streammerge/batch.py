"""K merges over shared inputs in one read pass (``streammerge batch``, DESIGN.md §5).

Each member config is planned on its own; one whose config or inputs are wrong fails
alone (the summary names it) unless ``fail_fast``. Members whose plans list the same
tensors in the same order form a group. For every tensor the group reads the union of
its members' inputs once per chunk, and every member merges that chunk into its own
output, so K merges cost one read of the inputs plus K writes. One ``max_memory`` bounds
the whole batch: two read sets of the union, two write buffers per member, and one
compute scratch (members merge one after another on the same cores). Output bytes are
those of ``streammerge merge`` on each config alone: kernels are chunk-independent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Reader
from .config import MergeConfig, from_dict, load_config
from .derive import read_derived
from .errors import BudgetError, ConfigError, OutputError, StreamMergeError
from .execute import ALL, COMBINE, MergeSummary, _device, _get, _JobRun, _put, _schedule_job, peak_rss
from .header import ITEMSIZE
from .methods import SPECS
from .plan import (
    BLOCK_ELEMS,
    COPY,
    DEFAULT_SHARD_NBYTES,
    HEAP_SLACK_WORDS,
    MIN_BLOCK_ELEMS,
    Job,
    Plan,
    _streaming,
    default_max_memory,
    make_plan,
)  # fmt: skip
from .polite import UNLIMITED, IoLimits, be_nice
from .write import OutputWriter

log = logging.getLogger(__name__)

_ALIGN = 64


@dataclass(frozen=True, slots=True)
class Member:
    """One merge of a batch: an output name, its config (or config path), sweep values."""

    name: str
    config: MergeConfig | str | tuple  # a config, a YAML path, or (source, parsed mapping)
    values: dict = field(default_factory=dict)  # sweep key path -> value; {} if not swept

    def load(self) -> MergeConfig:
        if isinstance(self.config, MergeConfig):
            return self.config
        if isinstance(self.config, tuple):
            return from_dict(self.config[1], self.config[0])
        return load_config(self.config)


def members_from(configs: list[str], sweeps: list[str] | tuple[str, ...] = ()) -> list[Member]:
    """Batch members for config paths, each expanded by the ``--sweep`` specs into a grid
    (``streammerge.sweep``). Outputs are named after the config file, plus the swept
    values: ``linear-models1.weight=0.4``. A config that cannot be read stays one member,
    which fails when it is planned."""
    stems = [Path(c).stem for c in configs]
    names = [s if stems.count(s) == 1 else f"{s}-{i + 1}" for i, s in enumerate(stems)]
    if not sweeps:
        return [Member(n, str(c)) for n, c in zip(names, configs)]
    from .sweep import expand, parse_sweep

    parsed = [parse_sweep(s) for s in sweeps]
    members = []
    for name, path in zip(names, configs):
        try:
            doc = _yaml_doc(path)
        except ConfigError:
            members.append(Member(name, str(path)))
            continue
        for v in expand(doc, parsed):
            members.append(Member(f"{name}-{v.name}", (f"{path} [{v.name}]", v.doc), dict(v.settings)))
    return members


def _yaml_doc(path: str):
    """The parsed YAML mapping of a config file; errors are the config module's lines."""
    import yaml

    from .config import _UniqueKeyLoader, parse_config

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return load_config(path)  # raises its one-line ConfigError
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError:
        return parse_config(text, source=path)  # raises its one-line ConfigError


@dataclass(frozen=True, slots=True)
class BatchSummary:
    merged: dict[str, MergeSummary]  # name -> summary, in member order
    failed: dict[str, str]  # name -> the one-line error
    read_nbytes: int  # input bytes actually read (every group's shared passes)
    write_nbytes: int
    seconds: float

    def lines(self) -> list[str]:
        rows = [s.line() for s in self.merged.values()]
        rows += [f"failed {name}: {err}" for name, err in self.failed.items()]
        gb = 1e9
        rows.append(
            f"batch: {len(self.merged)} merged, {len(self.failed)} failed; read {self.read_nbytes / gb:.2f} GB"
            f" once, wrote {self.write_nbytes / gb:.2f} GB in {self.seconds:.1f} s"
        )
        return rows


@dataclass
class _Slot:
    """A member while the batch runs."""

    name: str
    plan: Plan
    writer: OutputWriter
    dev: torch.device
    started: float
    start_rss: int
    error: str | None = None
    run: _JobRun | None = None
    free: queue.Queue = field(default_factory=queue.Queue)  # its two write buffers


def run_batch(
    members: list[Member],
    out_root: str | os.PathLike,
    *,
    max_memory: int = 0,
    shard_nbytes: int = DEFAULT_SHARD_NBYTES,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    copy_tokenizer: bool = True,
    fail_fast: bool = False,
    io: IoLimits = UNLIMITED,
) -> BatchSummary:
    """Merge every member into ``out_root/<name>``; members sharing tensors share reads."""
    started = time.perf_counter()
    if io.nice:
        be_nice()
    if threads:
        torch.set_num_threads(threads)
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    budget = max_memory or default_max_memory()
    failed: dict[str, str] = {}

    def fail(name: str, e: BaseException) -> None:
        if fail_fast:
            raise e
        failed[name] = str(e)
        log.info("batch: %s failed: %s", name, e)

    plans: dict[str, Plan] = {}
    for m in members:
        try:
            cfg = m.load()
            plans[m.name] = make_plan(cfg, max_memory=budget, shard_nbytes=shard_nbytes, seed=seed)
        except StreamMergeError as e:
            fail(m.name, e)
    need = sum(p.layout.nbytes for p in plans.values())
    free = shutil.disk_usage(root).free
    if plans and free < need + (64 << 20):
        raise OutputError(f"{root}: not enough free space: the batch writes {need} bytes, {free} are free")
    groups: dict[tuple, list[str]] = {}
    for name, p in plans.items():
        groups.setdefault(tuple(j.name for j in p.jobs), []).append(name)
    dev = _device(device)
    merged: dict[str, MergeSummary] = {}
    read_total = 0
    for names in groups.values():
        slots = []
        for name in names:
            try:
                writer = OutputWriter(root / name, plans[name], force=force, copy_tokenizer=copy_tokenizer)
            except StreamMergeError as e:
                fail(name, e)
                continue
            slots.append(_Slot(name, plans[name], writer, dev, time.perf_counter(), _rss()))
        if not slots:
            continue
        try:
            read_total += _run_group(slots, budget, dev, io, fail_fast)
        except BaseException as e:
            for s in slots:
                _discard(s.writer)
            if fail_fast or not isinstance(e, (StreamMergeError, OSError)):
                raise
            for s in slots:
                s.error = s.error or str(e)
        for s in slots:
            if s.error is None:
                try:
                    s.writer.commit(s.writer.digests)
                    merged[s.name] = _summary(s, root)
                    continue
                except (StreamMergeError, OSError) as e:
                    s.error = str(e)
                    _discard(s.writer)
            fail(s.name, StreamMergeError(s.error))
    order = [m.name for m in members]
    return BatchSummary(
        {n: merged[n] for n in order if n in merged},
        {n: failed[n] for n in order if n in failed},
        read_total,
        sum(s.nbytes for s in merged.values()),
        time.perf_counter() - started,
    )


def _summary(s: _Slot, root: Path) -> MergeSummary:
    p = s.plan
    return MergeSummary(
        str(root / s.name), p.estimate.write_nbytes, p.estimate.read_nbytes, time.perf_counter() - s.started,
        len(p.jobs), len(p.layout.shards), peak_rss(), s.start_rss, p.estimate.peak_nbytes, p.plan_hash,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Read:
    """One read of a group: chunk ``[start, end)`` of ``refs`` for ``jobs`` (slot, job)."""

    jobs: tuple
    refs: tuple
    phase: int
    start: int
    end: int


def _streams(slots: list[_Slot], budget: int):
    """Fit the group into ``budget``; returns (tensors, read set bytes), where tensors is
    a list of (slot, job) lists, one per output tensor, with jobs re-chunked to a common
    chunk where their blocks allow (else each job streams on its own)."""
    columns = list(zip(*(s.plan.jobs for s in slots)))  # per tensor: one job per member

    def words(j: Job) -> int:
        spec = SPECS.get(j.method)
        return 0 if j.method == COPY else spec.scratch_per_input * len(j.inputs) + spec.scratch_fixed

    scratch_words = max((words(j) for col in columns for j in col), default=0)
    block = BLOCK_ELEMS
    while block > MIN_BLOCK_ELEMS and block * 4 * (scratch_words + HEAP_SLACK_WORDS) > budget // 4:
        block //= 2
    scratch = block * 4 * (scratch_words + HEAP_SLACK_WORDS) if scratch_words else 0
    per_elem = max(
        (2 * _in_item(col) + 2 * sum(ITEMSIZE[j.out_dtype] for j in col) for col in columns), default=1
    )
    chunk = (budget - scratch) // per_elem // block * block
    if chunk < block:
        need = scratch + block * per_elem
        raise BudgetError(
            f"--max-memory {budget} bytes is too small for this batch; it needs at least {need}"
        )
    tensors, read_set = [], 0
    for col in columns:
        jobs = [_streaming(j, chunk, block, budget) for j in col]
        common = min(j.chunk_elems for j in jobs)
        unit = math.lcm(*(max(j.stat_block_elems, j.block_elems) for j in jobs))
        if jobs[0].numel > common:
            common = common // unit * unit
        if common:
            jobs = [replace(j, chunk_elems=common) for j in jobs]
        tensors.append((bool(common), list(zip(slots, jobs))))
        read_set = max(read_set, min(chunk, jobs[0].numel) * _in_item(col) + _ALIGN * len(_union(col)))
    return tensors, read_set


def _key(ref) -> tuple:
    """Inputs are the same bytes when they read the same range the same way."""
    return ref.path, ref.offset, ref.dtype, ref.derive


def _discard(writer: OutputWriter) -> None:
    """Drop a failed member's partial output (a batch has no --resume)."""
    writer.suspend()
    shutil.rmtree(writer.partial, ignore_errors=True)


def _in_item(col) -> int:
    return sum(ITEMSIZE[r.dtype] for r in _union(col))


def _union(jobs) -> tuple:
    """The distinct input tensors of ``jobs``, in first-use order."""
    seen: dict = {}
    for j in jobs:
        for r in j.inputs:
            seen.setdefault(_key(r), r)
    return tuple(seen.values())


def _reads(tensors):
    """Every read of the group, in file order: shared tensors once per pass for all of
    their members; a tensor whose members cannot share a chunking, once per member."""
    for shared, pairs in tensors:
        if not shared:
            for slot, job in pairs:
                for _, phase, start, end in _schedule_job(job):
                    yield _Read(((slot, job),), job.inputs, phase, start, end)
            continue
        job = pairs[0][1]
        passes = max(j.passes for _, j in pairs)
        n, step = job.numel, job.chunk_elems
        ranges = [(s, min(n, s + step)) for s in range(0, max(n, 1), step)]
        if passes and job.resident:
            yield _Read(tuple(pairs), _union(j for _, j in pairs), ALL, 0, n)
            continue
        for phase in [*range(passes), COMBINE]:
            active = tuple((s, j) for s, j in pairs if phase == COMBINE or j.passes > phase)
            refs = _union(j for _, j in active)
            for start, stop in ranges:
                yield _Read(active, refs, phase, start, stop)


def _run_group(slots: list[_Slot], budget: int, dev: torch.device, io: IoLimits, fail_fast: bool) -> int:
    """Run one group's shared reads; returns the input bytes read."""
    tensors, read_set_nbytes = _streams(slots, budget)
    for s in slots:
        size = max(
            min(j.chunk_elems, j.numel) * ITEMSIZE[j.out_dtype]
            for _, pairs in tensors
            for t, j in pairs
            if t is s
        )
        for _ in range(2):
            s.free.put(np.empty(size, np.uint8))
    free_reads: queue.Queue = queue.Queue()
    for _ in range(2):
        free_reads.put(np.empty(read_set_nbytes, np.uint8))
    ready: queue.Queue = queue.Queue(maxsize=2)
    to_write: queue.Queue = queue.Queue(maxsize=2 * len(slots))
    stop = threading.Event()
    read_bucket, write_bucket = io.buckets()
    counted = [0]
    errors: list[BaseException] = []

    def reader_loop() -> None:
        reader = Reader()
        try:
            for item in _reads(tensors):
                buf = _get(free_reads, stop)
                if buf is None:
                    return
                views, offset = {}, 0
                for ref in item.refs:
                    nbytes = (item.end - item.start) * ITEMSIZE[ref.dtype]
                    view = buf[offset : offset + nbytes]
                    if ref.derive is None:
                        reader.read(ref, item.start, item.end, memoryview(view))
                    else:
                        read_derived(reader, ref, item.start, item.end, view)
                    views[_key(ref)] = view
                    offset += -(-nbytes // _ALIGN) * _ALIGN
                    counted[0] += nbytes
                    if read_bucket is not None:
                        read_bucket.take(nbytes)
                _put(ready, (item, buf, views), stop)
            _put(ready, None, stop)
        except BaseException as e:
            errors.append(e)
            stop.set()
        finally:
            reader.close()

    def writer_loop() -> None:
        while (entry := _get(to_write, stop)) is not None:
            slot, job, start, end, buf, nbytes = entry
            if slot.error is None:
                try:
                    slot.writer.write_chunk(job, start, end, memoryview(buf)[:nbytes])
                except (StreamMergeError, OSError) as e:
                    slot.error = str(e)
                    if fail_fast:
                        errors.append(e)
                        stop.set()
            slot.free.put(buf)
            if write_bucket is not None:
                write_bucket.take(nbytes)

    threads = [
        threading.Thread(target=reader_loop, name="sm-batch-reader", daemon=True),
        threading.Thread(target=writer_loop, name="sm-batch-writer", daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        while (got := _get(ready, stop)) is not None:
            item, rbuf, views = got
            for slot, job in item.jobs:
                if slot.error is None:
                    _merge_chunk(slot, job, item, [views[_key(r)] for r in job.inputs], to_write, stop)
            free_reads.put(rbuf)
        if errors:
            raise errors[0]
        _put(to_write, None, stop)
        threads[1].join()
        if errors:
            raise errors[0]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    return counted[0]


def _merge_chunk(slot: _Slot, job: Job, item: _Read, views, to_write: queue.Queue, stop) -> None:
    if slot.run is None or slot.run.job is not job:
        slot.run = _JobRun(job, slot.plan.seed, slot.dev)
    run = slot.run
    if item.phase >= 0:
        if job.passes > item.phase:
            run.fold(item.phase, views, item.start, item.end)
        return
    if item.phase == ALL:
        for i in range(job.passes):
            run.fold(i, views, item.start, item.end)
    buf = _get(slot.free, stop)
    if buf is None:
        return
    nbytes = (item.end - item.start) * ITEMSIZE[job.out_dtype]
    run.combine(views, item.start, buf[:nbytes])
    _put(to_write, (slot, job, item.start, item.end, buf, nbytes), stop)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def write_sweep_index(
    out_root: str | os.PathLike, members: list[Member], summary: BatchSummary
) -> Path | None:
    """``out_root/sweep.json``: each swept output's name -> its values (and whether it merged)."""
    swept = [m for m in members if m.values]
    if not swept:
        return None
    doc = {m.name: {"values": m.values, "merged": m.name in summary.merged} for m in swept}
    path = Path(out_root) / "sweep.json"
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path
