"""Elementwise kernel steps on every core: split a block's element range into one part per
thread and run the parts in a small pool (numpy's and torch's loops release the GIL).

Only for steps whose result at an element does not depend on how the block is split, so
the output is the same bits for any thread count. Pool threads run torch single-threaded,
so the parts do not also fan out into OpenMP.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

MIN_PART = 1 << 17  # below this a part costs more in dispatch than it saves

_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(
            threads, thread_name_prefix="streammerge-part", initializer=torch.set_num_threads, initargs=(1,)
        )
    return _pools[threads]


def ranges(n: int, align: int = 1, threads: int | None = None) -> list[tuple[int, int]]:
    """[lo, hi) parts of ``range(n)``, one per thread, each a multiple of ``align`` long
    (but the last); a single part when the block is small or there is one thread."""
    threads = torch.get_num_threads() if threads is None else threads
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
    return list(_pool(torch.get_num_threads()).map(lambda part: fn(*part), parts))


def runs(items: range, per_thread: int = 4) -> list[range]:
    """``items`` cut into consecutive runs, ``per_thread`` per thread (for balance)."""
    count = max(1, torch.get_num_threads() * per_thread)
    step = max(1, -(-len(items) // count))
    return [items[i : i + step] for i in range(0, len(items), step)]


def map_ordered(fn: Callable, items: Iterable, window: int) -> Iterator:
    """``fn(item)`` for each item, in order, with up to ``window`` items in flight on the
    pool (so at most that many items' temporaries exist at once). With one thread the
    items run here; with several, even a window of one runs in the pool, where torch is
    single-threaded: its multi-threaded ops cost more than they save on small blocks."""
    threads = torch.get_num_threads()
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
