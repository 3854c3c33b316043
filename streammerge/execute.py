"""Run a plan within ``--max-memory``: read, merge and write chunk by chunk.

Three stages overlap: a reader thread fills one of two read sets (``os.preadv`` into
buffers allocated once), the calling thread merges the other set block by block into one
of two write buffers, and a writer thread ``pwrite``s the previous buffer at its planned
offset and hashes it. The buffers are exactly the plan's ``Estimate``; nothing grows with
model size. Kernels are elementwise, so any chunk or block size gives the same bytes.
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from .checkpoint import Reader
from .errors import StreamMergeError
from .header import ITEMSIZE
from .methods import SPECS, Scope, get_kernel
from .plan import COPY, DEFAULT_SHARD_NBYTES, Job, Plan, make_plan
from .write import OutputWriter

log = logging.getLogger(__name__)

TORCH_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32,
    "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_ALIGN = 64  # byte alignment of each input's region inside a read set


@dataclass(frozen=True, slots=True)
class MergeSummary:
    out: str
    nbytes: int  # output bytes written
    read_nbytes: int
    seconds: float
    tensors: int
    shards: int
    peak_rss_nbytes: int  # process high-water mark (includes the interpreter and torch)
    start_rss_nbytes: int  # resident size when the merge started (interpreter, torch)
    estimate_nbytes: int  # tensor memory the plan budgets
    plan_hash: str

    def line(self) -> str:
        gbps = self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
        return (
            f"merged {self.tensors} tensors into {self.shards} shard(s) at {self.out}:"
            f" {_fmt(self.nbytes)} in {self.seconds:.1f} s ({gbps:.2f} GB/s),"
            f" peak memory {_fmt(self.peak_rss_nbytes)} RSS"
            f" ({_fmt(self.peak_rss_nbytes - self.start_rss_nbytes)} over start-up;"
            f" plan {_fmt(self.estimate_nbytes)})"
        )


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


def merge(
    config,
    out: str | os.PathLike,
    *,
    max_memory: int = 0,
    shard_nbytes: int = DEFAULT_SHARD_NBYTES,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    copy_tokenizer: bool = True,
    progress: bool = False,
) -> MergeSummary:
    """Plan and run a merge into ``out``; returns a summary. Raises StreamMergeError
    subclasses for bad input (nothing that looks like a model is left at ``out``)."""
    started = time.perf_counter()
    start_rss = psutil.Process().memory_info().rss
    plan = (
        config
        if isinstance(config, Plan)
        else make_plan(config, max_memory=max_memory, shard_nbytes=shard_nbytes, seed=seed)
    )
    dev = _device(device)
    if threads:
        torch.set_num_threads(threads)
    writer = OutputWriter(Path(out), plan, force=force, copy_tokenizer=copy_tokenizer)
    try:
        digests = _run(plan, writer, dev, progress)
        writer.commit(digests)
    except BaseException:
        writer.abort()
        raise
    return MergeSummary(
        out=str(out),
        nbytes=plan.estimate.write_nbytes,
        read_nbytes=plan.estimate.read_nbytes,
        seconds=time.perf_counter() - started,
        tensors=len(plan.jobs),
        shards=len(plan.layout.shards),
        peak_rss_nbytes=peak_rss(),
        start_rss_nbytes=start_rss,
        estimate_nbytes=plan.estimate.peak_nbytes,
        plan_hash=plan.plan_hash,
    )


def peak_rss() -> int:
    """This process's peak resident set size in bytes.

    On Linux from ``VmHWM``: ``ru_maxrss`` survives ``exec`` and so reports the parent's
    size when a big process (a test runner, a notebook) started us.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise StreamMergeError("--device cuda: no CUDA device is available (torch sees none)")
    if name not in ("cpu", "cuda"):
        raise StreamMergeError(f"--device: expected cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def _chunks(plan: Plan):
    """(job, start, stop) element ranges in execution (= file) order."""
    step = plan.estimate.chunk_elems
    for job in plan.jobs:
        n = job.numel
        for start in range(0, max(n, 1), step):
            yield job, start, min(n, start + step)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _run(plan: Plan, writer: OutputWriter, dev: torch.device, progress: bool) -> dict[str, str]:
    est = plan.estimate
    n_inputs = max((len(j.inputs) for j in plan.jobs), default=1)
    read_sets = [np.empty(est.read_set_nbytes + _ALIGN * n_inputs, np.uint8) for _ in range(2)]
    write_bufs = [np.empty(est.write_buffer_nbytes, np.uint8) for _ in range(2)]
    free_reads: queue.Queue = queue.Queue()
    free_writes: queue.Queue = queue.Queue()
    for b in read_sets:
        free_reads.put(b)
    for b in write_bufs:
        free_writes.put(b)
    ready: queue.Queue = queue.Queue(maxsize=2)
    to_write: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    bar = _progress_bar(plan, progress)

    def reader_loop() -> None:
        reader = Reader()
        try:
            for job, start, end in _chunks(plan):
                buf = _get(free_reads, stop)
                if buf is None:
                    return
                views = _input_views(job, start, end, buf)
                for ref, view in zip(job.inputs, views):
                    reader.read(ref, start, end, memoryview(view))
                _put(ready, (job, start, end, buf, views), stop)
            _put(ready, None, stop)
        except BaseException as e:  # handed to the main thread, which re-raises
            _put(ready, _Failure(e), stop)
        finally:
            reader.close()

    def writer_loop() -> None:
        try:
            while (item := _get(to_write, stop)) is not None:
                job, start, end, buf, nbytes = item
                writer.write_chunk(job, start, end, memoryview(buf)[:nbytes])
                free_writes.put(buf)
                if bar is not None:
                    bar.update(nbytes)
                    if start == 0:
                        rss = psutil.Process().memory_info().rss
                        bar.set_postfix_str(f"{job.name} rss={_fmt(rss)}", refresh=False)
        except BaseException as e:
            errors.append(e)
            stop.set()

    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=reader_loop, name="sm-reader", daemon=True),
        threading.Thread(target=writer_loop, name="sm-writer", daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        while (item := _get(ready, stop)) is not None:
            if isinstance(item, _Failure):
                raise item.exc
            job, start, end, rbuf, views = item
            wbuf = _get(free_writes, stop)
            if wbuf is None:
                raise errors[0]
            nbytes = (end - start) * ITEMSIZE[job.out_dtype]
            _compute(job, views, wbuf[:nbytes], plan.estimate.block_elems, dev)
            free_reads.put(rbuf)
            _put(to_write, (job, start, end, wbuf, nbytes), stop)
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
        if bar is not None:
            bar.close()
    return writer.digests


def _get(q: queue.Queue, stop: threading.Event):
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return None


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _input_views(job: Job, start: int, end: int, buf: np.ndarray) -> list[np.ndarray]:
    """Carve one aligned byte region per input out of a read set."""
    views, offset = [], 0
    for ref in job.inputs:
        nbytes = (end - start) * ITEMSIZE[ref.dtype]
        views.append(buf[offset : offset + nbytes])
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return views


def _compute(job: Job, views: list[np.ndarray], out: np.ndarray, block: int, dev) -> None:
    """Merge one chunk: raw input bytes in ``views`` -> raw output bytes in ``out``."""
    if job.method == COPY or (
        job.method == "passthrough"
        and job.input_params[0]["scale"] == 1.0
        and job.inputs[0].dtype == job.out_dtype
    ):
        out[:] = views[0]  # bit copy: no dtype round trip
        return
    kernel = get_kernel(job.method)
    kwargs = _kernel_args(job)
    work = TORCH_DTYPES[job.work_dtype]
    xs_all = [torch.from_numpy(v).view(TORCH_DTYPES[r.dtype]) for v, r in zip(views, job.inputs)]
    out_all = torch.from_numpy(out).view(TORCH_DTYPES[job.out_dtype])
    n = out_all.numel()
    for s in range(0, n, block):
        e = min(n, s + block)
        xs = [x[s:e].to(device=dev, dtype=work) for x in xs_all]
        result = kernel(xs, base_index=job.base_index, **kwargs)
        out_all[s:e].copy_(result)


def _kernel_args(job: Job) -> dict:
    spec = SPECS[job.method]
    kwargs: dict = dict(job.shared_params)
    for p in spec.params:
        if p.scope is not Scope.SHARED:
            kwargs[p.name] = [params.get(p.name) for params in job.input_params]
    return kwargs


def _progress_bar(plan: Plan, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=plan.estimate.write_nbytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="merging",
        dynamic_ncols=True,
        leave=False,
    )
