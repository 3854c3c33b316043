"""Where shard tasks run: in this process, in a local process pool, or on Ray.

A backend only schedules ``shards.run_shard(plan, out, index, options)`` over shard
indices and reports each result or failure; it never touches tensor bytes. ``drive``
is the one driver: it submits the shards without a valid done-marker (so a rerun after
the driver died resumes), resubmits those whose worker died up to the attempt cap, and
finalizes. Errors in the user's input (``StreamMergeError``) are never retried.

    inline     a for-loop here; for tests and tiny merges (``merge`` without
               ``--backend`` runs the whole plan in one pipeline instead)
    processes  concurrent.futures over spawned processes; a dead worker breaks the
               pool, so the pool is rebuilt and the unfinished shards resubmitted
    ray        ``ray.remote`` tasks (``pip install 'streammerge[ray]'``), imported
               lazily; Ray retries tasks whose worker died, our attempt records cap it
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from .config import MergeConfig, load_config
from .errors import BackendError, ShardError, StreamMergeError
from .plan import DEFAULT_SHARD_NBYTES, Plan, default_max_memory, make_plan
from .polite import UNLIMITED, IoLimits
from .shards import DEFAULT_MAX_ATTEMPTS, ShardOptions, finalize, portable, prepare, run_shard

log = logging.getLogger(__name__)

BACKENDS = ("inline", "processes", "ray")
RAY_MISSING = (
    "--backend ray needs Ray: pip install 'streammerge[ray]' (use the Ray version your cluster runs)"
)

# (item, failure or None, result or None), in completion order
Outcome = tuple[int, BaseException | None, object]


class WorkerDied(Exception):
    """A worker process or node died under a task: retry it elsewhere."""


class Backend(Protocol):
    def map_unordered(self, fn: Callable, common: tuple, items: list[int]) -> Iterator[Outcome]:
        """Run ``fn(*common, item)`` for every item; yield outcomes as they finish."""

    def close(self) -> None: ...


class InlineBackend:
    def map_unordered(self, fn, common, items):
        for item in items:
            try:
                yield item, None, fn(*common, item)
            except (StreamMergeError, OSError) as e:
                yield item, e, None

    def close(self) -> None:
        pass


class ProcessesBackend:
    """A local pool of ``workers`` processes (never forked from this one: torch's thread
    pools do not survive a fork)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = None

    def map_unordered(self, fn, common, items):
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=_context())
        task = functools.partial(fn, *common)
        futures = {self._pool.submit(task, item): item for item in items}
        for future in as_completed(futures):
            item = futures[future]
            try:
                yield item, None, future.result()
            except BrokenProcessPool:
                self.close()  # every unfinished task of a broken pool fails; start afresh
                yield item, WorkerDied("a worker process died"), None
            except Exception as e:
                yield item, e, None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _context():
    """Workers forked from a server process that imported the executor once (fast pool
    rebuilds after a death, no torch threads forked); plain spawn where there is none."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["streammerge.execute"])
    return ctx


class RayBackend:
    """Tasks on a Ray cluster (``address``: ``auto``, ``ray://head:10001``), or on a local
    instance of ``workers`` CPUs when no address is given and none is running."""

    def __init__(self, address: str | None, workers: int, task_options: dict) -> None:
        try:
            import ray
        except ImportError:
            raise BackendError(RAY_MISSING) from None
        self.ray = ray
        self.task_options = task_options
        self._owner = not ray.is_initialized()
        if self._owner:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            local = {"num_cpus": workers} if address is None and workers else {}
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, **local)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise BackendError(
                    f"--address {address}: cannot start or reach Ray: {_first_line(e)}"
                ) from None
        self._pending: dict = {}

    def map_unordered(self, fn, common, items):
        ray = self.ray
        remote = ray.remote(fn).options(**self.task_options)
        common_refs = [ray.put(c) for c in common]  # the plan travels once
        self._pending = {remote.remote(*common_refs, item): item for item in items}
        while self._pending:
            ready, _ = ray.wait(list(self._pending), num_returns=1)
            item = self._pending.pop(ready[0])
            try:
                yield item, None, ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                yield item, cause if isinstance(cause, BaseException) else e, None
            except (ray.exceptions.RayError, ConnectionError) as e:
                yield item, WorkerDied(_first_line(e)), None

    def close(self) -> None:
        for ref in self._pending:
            self.ray.cancel(ref, force=True)
        self._pending = {}
        if self._owner and self.ray.is_initialized():
            self.ray.shutdown()


def shard_task(plan: Plan, out: str, options: ShardOptions, index: int) -> dict:
    """``run_shard`` with the shard index last, as backends call it."""
    return run_shard(plan, out, index, options)


def make_backend(name: str, *, address: str | None = None, workers: int = 1, task_options=None) -> Backend:
    if name == "inline":
        return InlineBackend()
    if name == "processes":
        return ProcessesBackend(workers)
    if name == "ray":
        return RayBackend(address, workers, task_options or {})
    raise BackendError(f"--backend: expected one of {', '.join(BACKENDS)}, got {name!r}")


def drive(
    plan: Plan,
    out: str | os.PathLike,
    backend: Backend,
    *,
    options: ShardOptions | None = None,
    force: bool = False,
    copy_tokenizer: bool = True,
    shard_nbytes: int = DEFAULT_SHARD_NBYTES,
):
    """Run every shard of ``plan`` not yet done on ``backend``, then finalize ``out``."""
    from .execute import MergeSummary

    options = options or ShardOptions()
    started = time.perf_counter()
    out = Path(out).absolute()
    options_doc = {"max_memory": plan.estimate.max_memory, "shard_nbytes": shard_nbytes}
    work = prepare(plan, out, force=force, copy_tokenizer=copy_tokenizer, plan_options=options_doc)
    done = work.done(plan)
    if done:
        log.info("%s: resuming, %d of %d shards already done", out, len(done), len(plan.layout.shards))
    pending = [i for i in range(len(plan.layout.shards)) if i not in done]
    submitted: Counter = Counter()
    while pending:
        retry = []
        for i, failure, marker in backend.map_unordered(shard_task, (plan, str(out), options), pending):
            submitted[i] += 1
            if failure is None:
                done[i] = marker
                continue
            if isinstance(failure, StreamMergeError) or not isinstance(failure, (WorkerDied, OSError)):
                raise failure
            shard = plan.layout.shards[i].file_name
            tries = max(submitted[i], work.attempts(i))
            if tries >= options.max_attempts:
                raise ShardError(
                    f"shard {i} ({shard}): {tries} attempts failed; last: {_first_line(failure)}"
                )
            log.warning("shard %d (%s): %s; retrying", i, shard, _first_line(failure))
            retry.append(i)
        pending = sorted(retry)
    finalize(plan, out, copy_tokenizer=copy_tokenizer, force=force)
    worst = max(done.values(), key=lambda m: m["peak_rss"])
    return MergeSummary(
        out=str(out),
        nbytes=plan.estimate.write_nbytes,
        read_nbytes=plan.estimate.read_nbytes,
        seconds=time.perf_counter() - started,
        tensors=len(plan.jobs),
        shards=len(plan.layout.shards),
        peak_rss_nbytes=worst["peak_rss"],
        start_rss_nbytes=worst["start_rss"],
        estimate_nbytes=plan.estimate.peak_nbytes,
        plan_hash=plan.plan_hash,
    )


def merge_sharded(
    config,
    out: str | os.PathLike,
    *,
    backend: str,
    address: str | None = None,
    workers: int = 0,
    max_memory: int = 0,
    shard_nbytes: int = DEFAULT_SHARD_NBYTES,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    copy_tokenizer: bool = True,
    io: IoLimits = UNLIMITED,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
):
    """``merge`` with one task per output shard on ``backend``.

    ``processes``: ``workers`` local processes (default: one per core, at most one per
    shard) share ``max_memory`` and the cores. ``ray``: ``max_memory`` and ``threads`` are
    per task (each task may have a node to itself); ``workers`` sizes a local instance.
    """
    if backend not in BACKENDS:
        raise BackendError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    cfg = portable(config if isinstance(config, MergeConfig) else load_config(config))
    budget = max_memory or default_max_memory()
    cores = os.cpu_count() or 1
    if backend == "processes":
        shards = len(make_plan(cfg, max_memory=budget, shard_nbytes=shard_nbytes, seed=seed).layout.shards)
        workers = workers or max(1, min(cores, shards))
        budget //= workers
        threads = threads or max(1, cores // workers)
    plan = make_plan(cfg, max_memory=budget, shard_nbytes=shard_nbytes, seed=seed)
    options = ShardOptions(threads=threads, device=device, io=io, max_attempts=max_attempts)
    task_options = {
        "num_cpus": threads or 1,
        "memory": plan.estimate.peak_nbytes,
        "max_retries": max_attempts,
        "scheduling_strategy": "SPREAD",
    }
    runner = make_backend(backend, address=address, workers=workers, task_options=task_options)
    try:
        return drive(
            plan,
            out,
            runner,
            options=options,
            force=force,
            copy_tokenizer=copy_tokenizer,
            shard_nbytes=shard_nbytes,
        )
    finally:
        runner.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
