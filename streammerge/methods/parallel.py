"""Elementwise kernel steps on every core: split a block's element range into one part per
thread and run the parts in a small pool (numpy's and torch's loops release the GIL).

Only for steps whose result at an element does not depend on how the block is split, so
the output is the same bits for any thread count. Pool threads count as one thread (a part
never splits again) and run torch single-threaded, so the parts do not also fan out into
OpenMP.

Torch-free: a merge whose jobs are all compiled loops over the stored bytes never imports
torch (``methods.direct``). The thread count is ``set_threads``' (``--threads``), else
OMP_NUM_THREADS, else the CPUs this process may run on: fixed for the process. (Not
torch's count: a pool thread's ``torch.set_num_threads(1)`` also becomes the count of
every thread torch meets later, so after one merge the next would have run on one core.)
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

MIN_PART = 1 << 17  # below this a part costs more in dispatch than it saves

_pools: dict[tuple[int, bool], ThreadPoolExecutor] = {}
_local = threading.local()  # ``thread_count`` is 1 in pool threads
_count: int | None = None  # set_threads'


def set_threads(n: int | None) -> None:
    """Run parts on ``n`` threads (None or 0: the default), and torch's ops too when torch
    is loaded (``torch_loaded`` passes it on to a torch loaded later)."""
    global _count
    _count = n or None
    torch_loaded()


def torch_loaded() -> None:
    """Give torch, now that it is loaded, the count ``set_threads`` chose."""
    torch = sys.modules.get("torch")
    if torch is not None and _count and getattr(_local, "threads", None) is None:
        torch.set_num_threads(_count)


def thread_count() -> int:
    """The threads parts may use here: 1 in a pool thread."""
    if (n := getattr(_local, "threads", None)) is not None:
        return n
    return _count or _default()


@functools.cache
def _default() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0))


def single() -> None:
    """Make the calling thread count as one: a pool's threads, whose parts never split again."""
    _local.threads = 1
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _pool(threads: int) -> ThreadPoolExecutor:
    key = (threads, "torch" in sys.modules)  # threads started before torch left its count alone
    if key not in _pools:
        _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="streammerge-part", initializer=single)
    return _pools[key]


def ranges(n: int, align: int = 1, threads: int | None = None) -> list[tuple[int, int]]:
    """[lo, hi) parts of ``range(n)``, one per thread, each a multiple of ``align`` long
    (but the last); a single part when the block is small or there is one thread."""
    threads = thread_count() if threads is None else threads
    parts = min(threads, n // MIN_PART)
    if parts < 2:
        return [(0, n)]
    step = -(-n // parts)
    step = -(-step // align) * align
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def run(fn: Callable[[int, int], object], n: int, align: int = 1) -> list:
    """``[fn(lo, hi) for each part]``, the parts in parallel when there are several."""
    parts = ranges(n, align)
    if len(parts) == 1:
        return [fn(0, n)]
    return list(_pool(thread_count()).map(lambda part: fn(*part), parts))


def runs(items: range, per_thread: int = 4) -> list[range]:
    """``items`` cut into consecutive runs, ``per_thread`` per thread (for balance)."""
    count = max(1, thread_count() * per_thread)
    step = max(1, -(-len(items) // count))
    return [items[i : i + step] for i in range(0, len(items), step)]


def map_ordered(fn: Callable, items: Iterable, window: int) -> Iterator:
    """``fn(item)`` for each item, in order, with up to ``window`` items in flight on the
    pool (so at most that many items' temporaries exist at once). With one thread the
    items run here; with several, even a window of one runs in the pool, where torch is
    single-threaded: its multi-threaded ops cost more than they save on small blocks."""
    threads = thread_count()
    if threads < 2:
        yield from map(fn, items)
        return
    pool, pending = _pool(threads), deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= min(window, threads):
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
