"""Sharing a server: I/O rate limits and low CPU/I/O priority (``--max-read-rate``,
``--max-write-rate``, ``--io-nice``).

``IoLimits`` is plain data that travels with a shard task to any worker; each process
turns it into its own token buckets. Priorities are per thread on Linux and inherited by
threads started later, so ``be_nice`` runs before the executor starts its threads.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

NICE = 10  # CPU niceness for --io-nice: below interactive work, above idle batch jobs
IOPRIO_LEVEL = 7  # lowest level of the best-effort class (never starved, unlike "idle")


@dataclass(frozen=True, slots=True)
class IoLimits:
    """Average byte rates, 0 meaning unlimited, and whether to lower priorities."""

    read_rate: int = 0  # bytes/s of tensor data read
    write_rate: int = 0  # bytes/s of tensor data written
    nice: bool = False

    def buckets(self) -> tuple[TokenBucket | None, TokenBucket | None]:
        return _bucket(self.read_rate), _bucket(self.write_rate)


class TokenBucket:
    """Sleeps ``take`` callers so bytes pass at ``rate`` per second on average.

    The bucket holds at most a quarter second of tokens and starts empty; a take larger
    than the bucket goes into debt, so a big chunk waits for its own size.
    """

    def __init__(self, rate: int) -> None:
        assert rate > 0
        self.rate = rate
        self.capacity = rate / 4
        self.tokens = 0.0
        self.stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= nbytes
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


UNLIMITED = IoLimits()


def _bucket(rate: int) -> TokenBucket | None:
    return TokenBucket(rate) if rate else None


def be_nice() -> None:
    """Lower this thread's CPU priority (nice +10) and I/O priority (best-effort, level 7)
    where the platform allows; threads started afterwards inherit both."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, max(current, NICE))
    except (AttributeError, OSError) as e:  # not POSIX, or not permitted
        log.info("--io-nice: cannot lower CPU priority: %s", e)
    ionice = shutil.which("ionice")
    if ionice is None:
        log.info("--io-nice: no ionice on PATH; I/O priority unchanged")
        return
    # ionice -p sets the I/O class of the thread whose id is given: the calling one.
    tid = threading.get_native_id()
    done = subprocess.run(
        [ionice, "-c", "2", "-n", str(IOPRIO_LEVEL), "-p", str(tid)], capture_output=True, text=True
    )
    if done.returncode != 0:
        log.info("--io-nice: ionice failed: %s", done.stderr.strip())
