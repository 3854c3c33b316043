"""One read pass of a batch group (``streammerge.batch``): shared reads, members' compute
side by side, every member's own writes.

A reader thread reads each chunk of the union of the group's inputs once into one of two
read sets; the calling thread hands the chunk to every member that needs it, and writer
threads (one per compute thread, each owning some members) hash and write the members'
output chunks in order. Members compute side by side on ``workers``
threads that each run torch single-threaded (a member's steps run in order, one at a time;
another member's steps fill the other cores), so K members cost K single-threaded kernel
runs spread over the cores rather than K fork/join runs that each wait for the slowest
core. A chunk only one member needs runs on the calling thread with torch's own threads.
Kernels are elementwise and thread-count independent, so the bytes equal separate merges.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from .checkpoint import Reader
from .derive import read_derived
from .errors import BudgetError, StreamMergeError
from .execute import _get, _JobRun, _put
from .header import ITEMSIZE
from .methods import parallel
from .plan import ALL, COMBINE, Job, Plan, _streaming, compute_block, compute_scratch, schedule_job
from .polite import IoLimits
from .write import OutputWriter

_ALIGN = 64
STEP_ELEMS = 1 << 21  # a member's chunk is computed in steps of about this many elements


@dataclass
class Slot:
    """A member while the batch runs."""

    name: str
    plan: Plan
    writer: OutputWriter
    dev: str  # cpu or cuda
    started: float
    start_rss: int
    error: str | None = None
    run: _JobRun | None = None
    free: queue.Queue = field(default_factory=queue.Queue)  # its two write buffers
    to_write: queue.Queue | None = None  # its writer thread's queue (shared with others)


@dataclass(frozen=True, slots=True)
class _Read:
    """One read of a group: chunk ``[start, end)`` of ``refs`` for ``jobs`` (slot, job)."""

    jobs: tuple
    refs: tuple
    phase: int
    start: int
    end: int


def workers_for(slots: list[Slot], dev: str, threads: int | None) -> int:
    """Compute threads for a group: one per member up to ``threads`` (torch's count by
    default); 1 (torch's own threads) on a GPU, where kernels are queued, not run."""
    if dev != "cpu":
        return 1
    return max(1, min(len(slots), threads or parallel.thread_count()))


def streams(slots: list[Slot], budget: int, workers: int = 1):
    """Fit the group into ``budget``; returns (tensors, read set bytes), where tensors is
    a list of (shared, [(slot, job)]), one per output tensor, with jobs re-chunked to a
    common chunk where their blocks allow (else each job streams on its own). The budget
    holds two read sets of the union, two write buffers per member and one compute
    scratch per worker."""
    columns = list(zip(*(s.plan.jobs for s in slots)))  # per tensor: one job per member
    every = [j for col in columns for j in col]
    block = compute_block(every, budget, workers)
    # Per worker, as the plan counts it: a combine block's or a statistics block's scratch
    # (members fold one statistics block at a time).
    scratch = workers * max((compute_scratch(j, block, folds=1) for j in every), default=0)
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
                for _, phase, start, end in schedule_job(job):
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


def run_group(
    slots: list[Slot], budget: int, io: IoLimits, fail_fast: bool, threads: int | None = None
) -> int:
    """Run one group's shared reads; returns the input bytes read."""
    workers = workers_for(slots, slots[0].dev, threads)
    tensors, read_set_nbytes = streams(slots, budget, workers)
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
    # As many writer threads as compute threads: each hashes and writes its members'
    # chunks in order (hashlib and pwrite release the GIL, so K outputs hash side by side).
    to_write = [queue.Queue(maxsize=2 * len(slots)) for _ in range(workers)]
    for i, s in enumerate(slots):
        s.to_write = to_write[i % workers]
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

    def writer_loop(mine: queue.Queue) -> None:
        while (entry := _get(mine, stop)) is not None:
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

    threads_ = [threading.Thread(target=reader_loop, name="sm-batch-reader", daemon=True)]
    threads_ += [
        threading.Thread(target=writer_loop, args=(q,), name=f"sm-batch-writer-{i}", daemon=True)
        for i, q in enumerate(to_write)
    ]
    for t in threads_:
        t.start()
    crew = _Crew(workers)
    try:
        while (got := _get(ready, stop)) is not None:
            item, rbuf, views = got
            lanes = [
                _steps(slot, job, item, [views[_key(r)] for r in job.inputs], stop)
                for slot, job in item.jobs
                if slot.error is None
            ]
            crew.run(lanes)
            free_reads.put(rbuf)
        if errors:
            raise errors[0]
        for q in to_write:
            _put(q, None, stop)
        for t in threads_[1:]:
            t.join()
        if errors:
            raise errors[0]
    finally:
        stop.set()
        crew.close()
        for t in threads_:
            t.join(timeout=10)
    return counted[0]


def _steps(slot: Slot, job: Job, item: _Read, views, stop) -> list[Callable]:
    """One member's work on one read, as steps to run in order: statistics folds or
    combines over whole blocks of about STEP_ELEMS elements (the same bytes as one call
    over the chunk: blocks stay aligned to the tensor start), the write at the end."""
    if slot.run is None or slot.run.job is not job:
        slot.run = _JobRun(job, slot.plan.seed, slot.dev)
    run = slot.run
    if item.phase >= 0 and job.passes <= item.phase:
        return []
    if item.phase == ALL:
        parts = [(item.start, item.end)]  # every pass, then combine, on one resident read
    else:
        unit = max(job.stat_block_elems, job.block_elems, 1)
        step = max(unit, STEP_ELEMS // unit * unit)
        parts = [(s, min(item.end, s + step)) for s in range(item.start, max(item.end, item.start + 1), step)]

    def sub(s: int, e: int) -> list[np.ndarray]:
        out = []
        for v, r in zip(views, job.inputs):
            size = ITEMSIZE[r.dtype]
            out.append(v[(s - item.start) * size : (e - item.start) * size])
        return out

    if item.phase >= 0:
        return [lambda s=s, e=e: run.fold(item.phase, sub(s, e), s, e) for s, e in parts]
    size = ITEMSIZE[job.out_dtype]
    nbytes = (item.end - item.start) * size
    held: list = []

    def step(s: int, e: int) -> None:
        if not held:
            buf = _get(slot.free, stop)
            if buf is None:
                return
            held.append(buf)
        if item.phase == ALL:
            for i in range(job.passes):
                run.fold(i, views, s, e)
        run.combine(sub(s, e), s, held[0][(s - item.start) * size : (e - item.start) * size])
        if e == item.end:
            _put(slot.to_write, (slot, job, item.start, item.end, held[0], nbytes), stop)

    return [lambda s=s, e=e: step(s, e) for s, e in parts]


class _Crew:
    """Runs lanes of steps: each lane's steps in order and one at a time, lanes side by
    side on ``workers`` threads that run torch single-threaded. One lane runs on the
    calling thread (torch's own threads). The first error stops the crew and is raised."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = None
        if workers > 1:
            self.pool = ThreadPoolExecutor(
                workers,
                thread_name_prefix="sm-batch-compute",
                initializer=parallel.single,
            )

    def run(self, lanes: list[list[Callable]]) -> None:
        todo = [deque(lane) for lane in lanes if lane]
        if self.pool is None or len(todo) < 2:
            for lane in todo:
                for fn in lane:
                    fn()
            return
        cond = threading.Condition()
        busy: set[int] = set()
        errors: list[BaseException] = []

        def work() -> None:
            while True:
                with cond:
                    while True:
                        if errors:
                            return
                        free = [i for i, lane in enumerate(todo) if lane and i not in busy]
                        if free:
                            break
                        if not any(todo):
                            return
                        cond.wait()
                    i = max(free, key=lambda i: len(todo[i]))  # the longest lane first
                    fn = todo[i].popleft()
                    busy.add(i)
                try:
                    fn()
                except BaseException as e:
                    errors.append(e)
                with cond:
                    busy.discard(i)
                    cond.notify_all()

        futures = [self.pool.submit(work) for _ in range(min(self.workers, len(todo)))]
        for f in futures:
            f.result()
        if errors:
            raise errors[0]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
