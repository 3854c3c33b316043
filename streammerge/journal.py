"""Resume: the journal of finished tensors in ``OUT.partial/``, the lock that keeps two
merges out of one ``OUT``, and the input fingerprints that say whether a journal still fits.

The journal is append-only JSON lines, each followed by a tab and its crc32, so a line torn
by a crash is recognised and ignored. The first line records what the partial output was
made from (plan hash, config, seed, shard size, input fingerprints, shards); every later
line is one finished tensor and its sha256. A tensor's line is appended only after its
shard's bytes are ``fdatasync``ed, and lines are written in groups (``GROUP_NBYTES`` of
output or ``GROUP_SECONDS``, whichever comes first), so the journal costs one sync pair
per group, not per tensor. A crash loses at most one group.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import zlib
from pathlib import Path

from . import __version__
from .digest import DIGEST
from .errors import OutputError

JOURNAL = "streammerge.journal"
LOCK = ".lock"
GROUP_NBYTES = 1 << 30  # output bytes per journal group
GROUP_SECONDS = 10.0


def input_prints(plan) -> list[dict]:
    """Fingerprint of every input file: path, size, mtime and the sha256 of its header."""
    prints = []
    for f in plan.fingerprints:
        try:
            with open(f.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                digest = hashlib.sha256(fh.read(f.header_nbytes)).hexdigest()
        except OSError as e:
            raise OutputError(f"{f.path}: input cannot be read any more: {e.strerror}") from None
        prints.append(
            {"path": f.path, "nbytes": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": digest}
        )
    return prints


def state(plan, prints: list[dict], shard_nbytes: int | None) -> dict:
    """What an output is made from: the journal's first line and the manifest's head."""
    return {
        "streammerge_version": __version__,
        "plan_hash": plan.plan_hash,
        "seed": plan.seed,
        "shard_nbytes": shard_nbytes,
        "config": plan.config.to_dict(),
        "inputs": prints,
        "shards": [
            {"file": s.file_name, "nbytes": s.nbytes, "header_sha256": hashlib.sha256(s.header).hexdigest()}
            for s in plan.layout.shards
        ],
    }


def describe_change(old: dict, new: dict, since: str) -> str | None:
    """The first difference between two ``state`` dicts, as a phrase; None if they match."""
    if old.get("streammerge_version") != new["streammerge_version"]:
        return f"streammerge changed from {old.get('streammerge_version')} to {new['streammerge_version']}"
    diff = _first_diff(old.get("config"), new["config"], "")
    if diff is not None:
        path, a, b = diff
        return f"the config changed at {path or 'top level'}: {a!r} -> {b!r}"
    if old.get("seed") != new["seed"]:
        return f"the seed changed from {old.get('seed')} to {new['seed']}"
    old_in = {d.get("path"): d for d in old.get("inputs") or [] if isinstance(d, dict)}
    new_in = {d["path"]: d for d in new["inputs"]}
    for path in old_in.keys() - new_in.keys():
        return f"input {path} is no longer part of the merge"
    for path, d in new_in.items():
        o = old_in.get(path)
        if o is None:
            return f"input {path} is new"
        if o.get("nbytes") != d["nbytes"]:
            return f"input {path} changed size from {o.get('nbytes')} to {d['nbytes']} bytes {since}"
        if o.get("header_sha256") != d["header_sha256"]:
            return f"input {path} has a different header {since}"
        if o.get("mtime_ns") != d["mtime_ns"]:
            return f"input {path} was modified {since}"
    if old.get("shards") != new["shards"]:
        n, m = len(old.get("shards") or []), len(new["shards"])
        return f"the output layout changed ({n} shard(s) -> {m}); was --shard-size different?"
    if old.get("plan_hash") != new["plan_hash"]:
        return f"the plan changed ({old.get('plan_hash')} -> {new['plan_hash']})"
    return None


def _first_diff(a, b, path: str):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            d = _first_diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_diff(x, y, f"{path}[{i}]")
            if d is not None:
                return d
        return None
    return None if a == b else (path, a, b)


class Lock:
    """An exclusive ``flock`` on ``OUT.partial/.lock``, which names its holder (pid, host)."""

    def __init__(self, partial: Path) -> None:
        self.path = partial / LOCK
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise OutputError(f"{partial}: vanished; another merge just finished or removed it") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(self.fd)
            raise OutputError(f"{partial}: another merge is writing here ({holder})") from None
        try:
            same = os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # it committed (renamed) between our open and our lock
            os.close(self.fd)
            raise OutputError(f"{partial}: another merge just finished or removed it")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self, unlink: Path | None = None) -> None:
        """Drop the lock; first remove the lock file at ``unlink`` (after a commit)."""
        if self.fd < 0:
            return
        if unlink is not None:
            unlink.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1


def _line(doc: dict) -> bytes:
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=True)
    return f"{text}\t{zlib.crc32(text.encode()):08x}\n".encode()


def read_journal(partial: Path) -> tuple[dict | None, dict[str, str], int]:
    """(first line, {tensor: digest}, bytes of intact lines). A torn or corrupt line and
    everything after it are ignored; no journal or a torn first line gives (None, {}, 0)."""
    try:
        raw = (partial / JOURNAL).read_bytes()
    except FileNotFoundError:
        return None, {}, 0
    head, done, good = None, {}, 0
    for line in raw.split(b"\n")[:-1]:  # the last piece lacks its newline: torn or empty
        text, _, crc = line.rpartition(b"\t")
        try:
            ok = f"{zlib.crc32(text):08x}".encode() == crc
            doc = json.loads(text) if ok else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            break
        if head is None:
            head = doc
        elif isinstance(doc.get("tensor"), str) and isinstance(doc.get(DIGEST), str):
            done[doc["tensor"]] = doc[DIGEST]
        else:
            break
        good += len(line) + 1
    return head, done, good


class Journal:
    """Appends finished tensors to ``OUT.partial/streammerge.journal`` in durable groups."""

    def __init__(
        self, partial: Path, head: dict | None, *, done: dict[str, str] | None = None, keep_nbytes: int = 0
    ) -> None:
        """Start a journal with first line ``head`` and the already durable tensors ``done``,
        or (``head`` None) reopen one and cut it back to its ``keep_nbytes`` intact bytes."""
        self.path = partial / JOURNAL
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if head else 0), 0o644)
        if head is not None:
            lines = [_line(head), *(_line({"tensor": n, DIGEST: d}) for n, d in (done or {}).items())]
            os.write(self.fd, b"".join(lines))
        else:
            os.ftruncate(self.fd, keep_nbytes)
        os.lseek(self.fd, 0, os.SEEK_END)
        os.fsync(self.fd)
        self._lock = threading.Lock()
        self._pending: list[bytes] = []
        self._pending_fds: set[int] = set()
        self._pending_nbytes = 0
        self._last_flush = time.monotonic()
        self.journaled = 0

    def finished(self, name: str, digest: str, fd: int, nbytes: int) -> None:
        """Record that tensor ``name`` (``nbytes`` bytes written to shard ``fd``) is done."""
        with self._lock:
            self._pending.append(_line({"tensor": name, DIGEST: digest}))
            self._pending_fds.add(fd)
            self._pending_nbytes += nbytes
            now = time.monotonic()
            if self._pending_nbytes >= GROUP_NBYTES or now - self._last_flush >= GROUP_SECONDS:
                self._flush()

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if self._pending and self.fd >= 0:
            for fd in self._pending_fds:  # the bytes first, then the lines that vouch for them
                os.fdatasync(fd)
            os.write(self.fd, b"".join(self._pending))
            os.fdatasync(self.fd)
            self.journaled += len(self._pending)
        self._pending, self._pending_fds, self._pending_nbytes = [], set(), 0
        self._last_flush = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
