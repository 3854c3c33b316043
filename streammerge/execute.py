"""Run a plan within ``--max-memory``: read, merge and write chunk by chunk.

Three stages overlap: a reader thread makes one of two read sets ready (each input's
chunk mmap'ed and faulted in: the page cache's own pages, no copy; derived, unaligned and
GPU inputs ``os.preadv``'ed into buffers allocated once), the calling thread merges the
other set block by block into one of two write buffers (straight from the read bytes
where the job has ``direct`` loops, else converting each block to D and the result
back), and a writer thread ``pwrite``s the previous buffer at its planned offset and
hashes it. The buffers are exactly the plan's ``Estimate``; nothing grows with model size.
Kernels are elementwise, so any chunk or block size gives the same bytes. Bit copies and
jobs with a ``direct.loop`` never touch torch: a merge made only of them does not load it.

With ``--device cuda`` the buffers are pinned, each chunk crosses to the GPU whole and its
result comes back whole (``_JobRun._combine_on_device``); statistics passes stay on the CPU,
since torch sums in another order on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import mmap
import os
import queue
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil

from .checkpoint import Reader
from .derive import read_derived
from .errors import Interrupted, StreamMergeError, WriteError
from .header import ITEMSIZE
from .methods import SPECS, BlockContext, Scope, direct, get_kernel, parallel, row_elems
from .plan import (
    ALL,
    BLOCK_ELEMS,
    DEFAULT_SHARD_NBYTES,
    Job,
    Plan,
    copies,
    fold_window,
    make_plan,
    schedule_job,
)
from .polite import UNLIMITED, IoLimits, be_nice
from .write import OutputWriter

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
_ALIGN = 64  # byte alignment of each input's region inside a read set
MAP_INPUTS = True  # read inputs through mmap (False: preadv copies into the read sets)
DEVICE_BLOCK_ELEMS = 1 << 24  # a GPU block: ~30 words of temporaries per element stay < 2 GiB


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
    resumed: int = 0  # tensors a resumed merge found already done

    def line(self) -> str:
        gbps = self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
        resumed = f" ({self.resumed} resumed)" if self.resumed else ""
        return (
            f"merged {self.tensors} tensors{resumed} into {self.shards} shard(s) at {self.out}:"
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
    resume: bool = False,
    copy_tokenizer: bool = True,
    progress: bool = False,
    io: IoLimits = UNLIMITED,
    backend: str = "inline",
    address: str | None = None,
    workers: int = 0,
) -> MergeSummary:
    """Plan and run a merge into ``out``; returns a summary. Raises StreamMergeError
    subclasses for bad input (nothing that looks like a model is left at ``out``).

    A merge stopped part-way (``Interrupted``, ``WriteError``, a crash) keeps its finished
    tensors in ``OUT.partial/``; ``resume=True`` continues it to the same bytes.

    ``backend`` ``processes`` or ``ray`` runs one task per output shard (see
    ``streammerge.backends``; rerunning resumes from the shards' done-markers); ``inline``
    runs the whole plan in this process."""
    if backend != "inline":
        from .backends import merge_sharded

        return merge_sharded(
            config, out, backend=backend, address=address, workers=workers, max_memory=max_memory,
            shard_nbytes=shard_nbytes, threads=threads, device=device, seed=seed, force=force,
            copy_tokenizer=copy_tokenizer, io=io,
        )  # fmt: skip
    if io.nice:
        be_nice()
    started = time.perf_counter()
    start_rss = psutil.Process().memory_info().rss
    plan = (
        config
        if isinstance(config, Plan)
        else make_plan(config, max_memory=max_memory, shard_nbytes=shard_nbytes, seed=seed)
    )
    dev = _device(device)
    if threads:
        parallel.set_threads(threads)
    writer = OutputWriter(Path(out), plan, force=force, resume=resume, copy_tokenizer=copy_tokenizer)
    if not writer.complete:
        _run_and_commit(plan, writer, dev, progress, io)
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
        resumed=len(plan.jobs) if writer.complete else len(writer.done),
    )


def _run_and_commit(
    plan: Plan, writer: OutputWriter, dev: str, progress: bool, io: IoLimits = UNLIMITED
) -> None:
    """Run and commit; on any failure keep what is durable for ``--resume``. SIGTERM is
    handled like Ctrl-C: the tensor in flight is abandoned, the journal flushed."""
    resume_hint = f"rerun the same command with --resume to continue from {writer.partial}"
    with _sigterm_interrupts():
        try:
            writer.commit(_run(plan, writer, dev, progress, io))
        except KeyboardInterrupt:
            saved = writer.suspend()
            raise Interrupted(
                f"interrupted; {saved} of {len(plan.jobs)} tensors are saved; {resume_hint}"
            ) from None
        except WriteError as e:
            saved = writer.suspend()
            raise WriteError(f"{e}; {saved} of {len(plan.jobs)} tensors are saved; {resume_hint}") from None
        except BaseException:
            writer.suspend()
            raise


@contextlib.contextmanager
def _sigterm_interrupts():
    """Turn SIGTERM into KeyboardInterrupt while a merge writes (main thread only)."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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


def _device(name: str) -> str:
    """``cpu`` or ``cuda`` for ``--device`` (``auto``: cuda when torch sees a GPU). Only a GPU
    loads torch here: a merge of ``direct`` loops on the CPU never does."""
    if name not in ("cpu", "cuda", "auto"):
        raise StreamMergeError(f"--device: expected cpu, cuda or auto, got {name!r}")
    if name == "cpu":
        return name
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise StreamMergeError("--device cuda: no CUDA device is available (torch sees none)")
    return name


def _schedule(plan: Plan, skip=frozenset()):
    """(job, phase, start, stop) reads in execution (= file) order, minus ``skip``ped jobs."""
    for job in plan.jobs:
        if job.name not in skip:
            yield from schedule_job(job)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _run(
    plan: Plan, writer: OutputWriter, dev: str, progress: bool, io: IoLimits = UNLIMITED
) -> dict[str, str]:
    """Run ``plan``'s jobs through ``writer`` (anything with ``write_chunk`` and ``digests``)."""
    est = plan.estimate
    read_bucket, write_bucket = io.buckets()
    n_inputs = max((len(j.inputs) for j in plan.jobs), default=1)
    read_sets = [_buffer(est.read_set_nbytes + _ALIGN * n_inputs, dev) for _ in range(2)]
    write_bufs = [_buffer(est.write_buffer_nbytes, dev) for _ in range(2)]
    free_reads: queue.Queue = queue.Queue()
    free_writes: queue.Queue = queue.Queue()
    for b in read_sets:
        free_reads.put(b)
    for b in write_bufs:
        free_writes.put(b)
    # inputs are mapped, not copied, except for a GPU (which copies from the pinned read sets)
    mapping = MAP_INPUTS and dev == "cpu"
    ready: queue.Queue = queue.Queue(maxsize=2)
    to_write: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    bar = _progress_bar(plan, progress)
    if bar is not None and writer.done:
        bar.update(sum(j.out_nbytes for j in plan.jobs if j.name in writer.done))

    def reader_loop() -> None:
        reader = Reader()
        try:
            for job, phase, start, end in _schedule(plan, frozenset(writer.done)):
                buf = _get(free_reads, stop)
                if buf is None:
                    return
                views = _input_views(job, start, end, buf)
                for k, ref in enumerate(job.inputs):
                    view = views[k]
                    if ref.derive is not None:
                        read_derived(reader, ref, start, end, view)
                    elif (mapped := reader.map(ref, start, end) if mapping else None) is not None:
                        _release(buf, view)
                        views[k] = mapped  # the page cache's pages: no copy into the read set
                    else:
                        reader.read(ref, start, end, memoryview(view))
                    if read_bucket is not None:
                        read_bucket.take(len(view))
                _put(ready, (job, phase, start, end, buf, views), stop)
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
                if write_bucket is not None:
                    write_bucket.take(nbytes)
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
    run: _JobRun | None = None
    try:
        while (item := _get(ready, stop)) is not None:
            if isinstance(item, _Failure):
                raise item.exc
            job, phase, start, end, rbuf, views = item
            if run is None or run.job is not job:
                run = _JobRun(job, plan.seed, dev)
            if phase >= 0:  # a statistics pass: nothing to write
                run.fold(phase, views, start, end)
                item = views = None  # unmaps mapped inputs before the reader maps more
                free_reads.put(rbuf)
                continue
            wbuf = _get(free_writes, stop)
            if wbuf is None:
                raise errors[0]
            nbytes = (end - start) * ITEMSIZE[job.out_dtype]
            if phase == ALL:
                for i in range(job.passes):
                    run.fold(i, views, start, end)
            run.combine(views, start, wbuf[:nbytes])
            item = views = None
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


def _buffer(nbytes: int, dev: str) -> np.ndarray:
    """A read set or write buffer: page-locked (pinned) for a CUDA device, so whole chunks
    go over PCIe by DMA, without the driver's staging copy; else a private anonymous
    mapping, whose pages ``_release`` can hand back."""
    if dev == "cuda":
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()  # the array keeps it alive
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8)


def _release(buf: np.ndarray, view: np.ndarray) -> None:
    """Give back the pages of read set ``buf`` under ``view`` (an input that was mapped
    instead): a read set that once held a copied input stays resident otherwise, and the
    mapped chunks would come on top of it, past the budget."""
    lo = view.ctypes.data - buf.ctypes.data
    lo, hi = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE, (lo + view.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:  # ``buf`` is a CPU read set: ``_buffer``'s array over its anonymous mapping
        buf.base.obj.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


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


class _JobRun:
    """The executor's state for one tensor: its kernel, finished statistics, the running
    accumulator of the current pass and the kernel's per-pass ``state`` dict. A bit copy or
    a job with a ``direct.loop`` (on the CPU) needs no kernel and no torch."""

    def __init__(self, job: Job, seed: int, dev: str) -> None:
        self.job, self.seed, self.dev = job, seed, dev
        self.stats: list = []
        self.acc = None
        self.state: dict = {}
        self.copy = copies(job)
        if self.copy:  # straight into the output buffer: no kernel, no block temporaries
            self.scale = job.input_params[0].get("scale", 1.0)
            return
        self.loop = direct.loop(job) if dev == "cpu" else None
        if self.loop is not None:  # compiled loops from the read bytes into the output
            return
        from .methods.tensors import DTYPES

        self.kernel = get_kernel(job.method)
        self.params = _kernel_args(job)
        self.work = DTYPES[job.work_dtype]

    def _bits(self, views: list[np.ndarray]) -> list[np.ndarray]:
        """The inputs' bytes as the loops take them (``direct.BITS``)."""
        return [v.view(direct.BITS[r.dtype]) for v, r in zip(views, self.job.inputs)]

    def _blocks(self, xs: list[torch.Tensor], start: int, end: int, step: int):
        """(flat offset, input blocks in dtype D) over one chunk, on the chunk's device."""
        for s in range(0, end - start, step):
            yield start + s, self._block(xs, s, min(end - start, s + step))

    def _raw(self, views: list[np.ndarray]) -> list[torch.Tensor]:
        import torch

        from .methods.tensors import DTYPES

        return [torch.from_numpy(v).view(DTYPES[r.dtype]) for v, r in zip(views, self.job.inputs)]

    def _block(self, xs: list[torch.Tensor], s: int, e: int) -> list[torch.Tensor]:
        return [x[s:e].to(dtype=self.work) for x in xs]

    def _call(self, fn, *args, offset: int, **extra):
        ctx = BlockContext(self.job.method, self.job.name, self.job.shape, offset, self.seed, self.work)
        context = {"ctx": ctx, "stats": self.stats, "state": self.state}
        wanted = {k: v for k, v in context.items() if k in _wants(fn)}
        return fn(*args, base_index=self.job.base_index, **wanted, **extra, **self.params)

    def fold(self, i: int, views: list[np.ndarray], start: int, end: int) -> None:
        """Fold one chunk into statistics pass ``i``; finish the pass at the tensor's end.

        On the CPU whatever the device: statistics are sums, and torch sums in a different
        order on a GPU (so other bits); a pass is one read, cheap next to the combine."""
        if start == 0:
            self.acc, self.state = None, {}
        step = self.job.stat_block_elems
        if self.loop is not None:  # runs of blocks on every core, a run in one call, joined in order
            bits = self._bits(views)

            def fold_span(run: range) -> list:
                lo, hi = run.start, min(end - start, run[-1] + step)
                return self.loop.fold([x[lo:hi] for x in bits], step)

            runs = parallel.runs(range(0, end - start, step))
            for partial in parallel.map_ordered(fold_span, runs, fold_window(self.job)):
                self.acc = partial if self.acc is None else self.acc + partial
        elif self.kernel.reduce is None:  # blocks in order, each onto the running accumulator
            for offset, xs in self._blocks(self._raw(views), start, end, step):
                self.acc = self._call(self.kernel.fold, i, self.acc, xs, offset=offset)
        else:  # runs of blocks on every core, each run folded in order, the runs joined in order
            raw = self._raw(views)
            # a kernel that folds spans takes a run's blocks in one call, when they are views
            # of the read set (no conversion to D: nothing grows with the span)
            spans = self.kernel.spans and all(x.dtype == self.work for x in raw)

            def fold_run(run: range):
                if spans:
                    lo, hi = run.start, min(end - start, run[-1] + step)
                    return self._call(
                        self.kernel.fold, i, None, self._block(raw, lo, hi), offset=start + lo, span=step
                    )
                acc = None
                for s in run:
                    xs = self._block(raw, s, min(end - start, s + step))
                    acc = self._call(self.kernel.fold, i, acc, xs, offset=start + s)
                return acc

            runs = parallel.runs(range(0, end - start, step))
            for partial in parallel.map_ordered(fold_run, runs, fold_window(self.job)):
                self.acc = self._call(self.kernel.reduce, i, self.acc, partial, offset=0)
        if end == self.job.numel:
            finish = self.loop.finish if self.loop is not None else None
            self.stats.append(
                finish(self.acc) if finish else self._call(self.kernel.finish, i, self.acc, offset=0)
            )
            self.acc = None

    def combine(self, views: list[np.ndarray], start: int, out: np.ndarray) -> None:
        """Merge one chunk: raw input bytes in ``views`` -> raw output bytes in ``out``."""
        if self.copy:
            dtype = self.job.out_dtype
            if self.scale == 1.0:
                out[:] = views[0]  # bit copy: no dtype round trip
            elif dtype in direct.BITS:
                direct.scale_into(views[0].view(direct.BITS[dtype]), self.scale, out.view(direct.BITS[dtype]))
            else:
                import torch

                from .methods.passthrough import scale_into
                from .methods.tensors import DTYPES

                x, o = (torch.from_numpy(v).view(DTYPES[dtype]) for v in (views[0], out))
                scale_into(x, self.scale, o)
            return
        if start == 0:
            self.state = {}
        end = start + out.nbytes // ITEMSIZE[self.job.out_dtype]
        if self.loop is not None:  # the inputs' and the output's bits, as numpy integers
            xs, bits = self._bits(views), out.view(direct.BITS[self.job.out_dtype])

            def merge_block(s: int, e: int) -> None:
                self.loop.combine([x[s:e] for x in xs], bits[s:e], self.stats)
        else:
            import torch

            from .methods.tensors import DTYPES

            out_all = torch.from_numpy(out).view(DTYPES[self.job.out_dtype])
            if self._staged():
                return self._combine_on_device(views, start, end, out_all)
            raw = self._raw(views)

            def merge_block(s: int, e: int) -> None:
                self._merge_block(raw, s, e, start, out_all)

        step, window = self._combine_step()
        blocks = range(0, end - start, step)
        if window < 2:  # blocks in order, each split across the cores by the kernel
            for s in blocks:
                merge_block(s, min(end - start, s + step))
            return
        # a whole block per core: no barrier inside a block
        for _ in parallel.map_ordered(lambda s: merge_block(s, min(end - start, s + step)), blocks, window):
            pass

    def _merge_block(self, raw: list[torch.Tensor], s: int, e: int, start: int, out: torch.Tensor) -> None:
        """Elements ``s:e`` of the chunk ``raw`` (inputs as stored; the chunk starts at element
        ``start`` of the tensor) merged into the same elements of ``out``."""
        result = self._call(self.kernel.combine, self._block(raw, s, e), offset=start + s)
        out[s : s + result.numel()].copy_(result.reshape(-1))

    def _combine_on_device(self, views: list[np.ndarray], start: int, end: int, out: torch.Tensor) -> None:
        """The chunk crosses to the device whole, one copy per input (asynchronous from the
        pinned read set), its blocks run there in order as slices of it (the device is the
        parallelism: no host threads), and the result comes back whole into ``out``."""
        import torch

        xs = [x.to(self.dev, non_blocking=True) for x in self._raw(views)]
        result = torch.empty(end - start, dtype=out.dtype, device=self.dev)
        self._combine_in_order(xs, start, end, self._device_step(), result)
        out.copy_(result, non_blocking=True)
        if self.dev == "cuda":  # the read set and ``out`` are handed on after this returns
            torch.cuda.current_stream(self.dev).synchronize()

    def _combine_in_order(
        self, xs: list[torch.Tensor], start: int, end: int, step: int, out: torch.Tensor
    ) -> None:
        """The chunk ``xs`` (elements ``start:end``) merged block by block, in order, into ``out``."""
        for s in range(0, end - start, step):
            self._merge_block(xs, s, min(end - start, s + step), start, out)

    def _staged(self) -> bool:
        """Whether the combine runs on whole chunks staged on a device (not the CPU path)."""
        return self.dev != "cpu"

    def _device_step(self) -> int:
        """A device block: the plan's block (whole rows for row-wise methods) times as many as
        fit DEVICE_BLOCK_ELEMS, so a chunk is a few kernel launches, not thousands."""
        block = self.job.block_elems
        return max(block, DEVICE_BLOCK_ELEMS // block * block)

    def _combine_step(self) -> tuple[int, int]:
        """(block, blocks at once): the plan's block split in one part per thread, whole rows
        for row-wise methods, when the kernel needs no order (it keeps no ``state``)."""
        block, threads = self.job.block_elems, parallel.thread_count()
        if (self.loop is None and self.kernel.ordered) or threads < 2:
            return block, 1
        unit = row_elems(self.job.shape) if SPECS[self.job.method].rows(self.job.shared_params) else 1
        step = max(block // threads, parallel.MIN_PART) // unit * unit
        if step == 0 or block // step < 2:  # too small to split: the plan's block, in order
            return block, 1
        return step, min(threads, block // step)


def merge_tensors(
    method: str,
    xs: list[torch.Tensor],
    *,
    base_index: int | None = None,
    name: str = "tensor",
    seed: int = 0,
    chunk_elems: int | None = None,
    block_elems: int = BLOCK_ELEMS,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    **params,
) -> torch.Tensor:
    """Merge in-memory CPU tensors (same shape and dtype) exactly as a streamed merge would,
    through the same chunk/pass/block machinery, e.g. ``merge_tensors("ties", [a, b, base],
    base_index=2, weight=[1, 1, None], density=[0.5, 0.5, None])``. Per-model parameters
    are lists (one value per input, None for the base), shared ones plain values. ``dtype``
    and ``out_dtype`` are the config keys (the math's dtype D, the result's; both default to
    the inputs' dtype).
    """
    from dataclasses import replace

    import torch

    from .checkpoint import TensorRef
    from .methods.tensors import DTYPES
    from .plan import STAT_FOLDS, _streaming

    spec = SPECS[method]

    def code_of(dt: torch.dtype) -> str:
        return next(c for c, d in DTYPES.items() if d == dt)

    code = code_of(xs[0].dtype)
    work, out_code = code_of(dtype or xs[0].dtype), code_of(out_dtype or dtype or xs[0].dtype)
    shape = tuple(xs[0].shape)
    input_params = tuple(
        {
            p.name: params[p.name][i] if p.name in params else p.default
            for p in spec.params
            if p.scope is Scope.INPUT or (p.scope is Scope.NON_BASE and i != base_index)
        }
        for i in range(len(xs))
    )
    shared = {p.name: params.get(p.name, p.default) for p in spec.params if p.scope is Scope.SHARED}
    refs = tuple(TensorRef("<memory>", 0, code, shape) for _ in xs)
    job = Job(name, method, refs, base_index, input_params, shared, work, out_code, shape, 0, 0)
    n = job.numel
    job = _streaming(job, max(n, 1), block_elems, 0, STAT_FOLDS)
    if chunk_elems:  # a caller-chosen chunk must still hold whole statistics blocks
        unit = max(job.stat_block_elems, job.block_elems)
        job = replace(job, chunk_elems=max(unit, chunk_elems // unit * unit))
    raw = [x.contiguous().reshape(-1).view(torch.uint8).numpy() for x in xs]
    out_item = ITEMSIZE[out_code]
    out = np.empty(n * out_item, np.uint8)
    run = _JobRun(job, seed, "cpu")
    item = xs[0].element_size()
    for _, phase, start, end in schedule_job(job):
        views = [r[start * item : end * item] for r in raw]
        if phase >= 0:
            run.fold(phase, views, start, end)
            continue
        if phase == ALL:
            for i in range(job.passes):
                run.fold(i, views, start, end)
        run.combine(views, start, out[start * out_item : end * out_item])
    return torch.from_numpy(out).view(DTYPES[out_code]).reshape(shape)


@functools.cache
def _wants(fn) -> frozenset[str]:
    return frozenset({"ctx", "stats", "state"} & set(inspect.signature(fn).parameters))


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
