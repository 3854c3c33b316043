"""What tools/bench.py measures: the disk floor, one timed child process, the page cache.

The floor reads every input safetensors file once into a reused 64 MiB buffer (os.preadv),
then writes as many bytes as the merged output (os.pwrite, each range handed to writeback as
it is written, as streammerge's writer does: a plain pwrite loop lets dirty pages pile up and
the kernel throttles it, 2-3x slower here) and fsyncs them. streammerge and
mergekit run as child processes; wall time and peak RSS (os.wait4's ru_maxrss) are taken per
child. The kernel carries a process's high-water mark across fork and exec, so a child's peak
cannot read below this (bench) process's own peak: keep this process small (no numpy, torch
or matplotlib before the last run) and see ``own_peak_rss_mib``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from streammerge.write import _Writeback  # imports no numpy/torch: this process stays small

BUF_NBYTES = 64 << 20
MiB, MB = 1 << 20, 1e6
STREAMMERGE = [sys.executable, "-m", "streammerge.cli"]


def make_buffer() -> memoryview:
    """The floor's reused buffer, random bytes, filled in 1 MiB steps (no 64 MiB temporary)."""
    buf = bytearray(BUF_NBYTES)
    for i in range(0, BUF_NBYTES, MiB):
        buf[i : i + MiB] = os.urandom(MiB)
    return memoryview(buf)


def make_plan(config: Path, max_memory: str) -> dict:
    """``streammerge plan CONFIG --json``: inputs, output size and the memory estimate."""
    cmd = [*STREAMMERGE, "plan", str(config), "--json", "--max-memory", max_memory]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"streammerge plan {config}: {proc.stderr.strip() or proc.stdout.strip()}")
    return json.loads(proc.stdout)


def input_files(plan: dict) -> list[Path]:
    dirs = dict.fromkeys(Path(m) for m in [*plan["models"], plan.get("base_model")] if m)
    return sorted(f for d in dirs for f in d.glob("*.safetensors"))


def cached_fraction(files: list[Path]) -> float:
    """Fraction of the files' pages that are in the page cache, by mincore(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    c = ctypes
    libc.mmap.argtypes = [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_int, c.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    resident = pages = 0
    for f in files:
        size, fd = f.stat().st_size, os.open(f, os.O_RDONLY)
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        os.close(fd)
        vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
        ok = libc.mincore(addr, size, vec) == 0
        libc.munmap(addr, size)
        if not ok:
            raise OSError(ctypes.get_errno(), f"mincore failed on {f}")
        resident += sum(b & 1 for b in vec.raw)
        pages += len(vec.raw)
    return resident / max(pages, 1)


def read_all(files: list[Path], buf: memoryview) -> int:
    """cat-like read of every file into one reused buffer; returns bytes read."""
    total = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            offset = 0
            while n := os.preadv(fd, [buf], offset):
                offset += n
            total += offset
        finally:
            os.close(fd)
    return total


def prepare_cache(files: list[Path], cold: bool, buf: memoryview) -> float:
    """Drop (cold) or load (warm) the inputs in the page cache; return the cached fraction."""
    os.sync()
    for f in files:
        if cold:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    if not cold:
        read_all(files, buf)
    return cached_fraction(files)


def timed_sync() -> float:
    t = time.perf_counter()
    os.sync()
    return time.perf_counter() - t


def run_floor(files: list[Path], write_nbytes: int, out_root: Path, buf: memoryview) -> dict:
    t0 = time.perf_counter()
    read_all(files, buf)
    t1 = time.perf_counter()
    path = out_root / "floor.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset, writeback = 0, _Writeback()
        while offset < write_nbytes:
            n = os.pwrite(fd, buf[: min(BUF_NBYTES, write_nbytes - offset)], offset)
            writeback.wrote(fd, offset, n)
            offset += n
        t2 = time.perf_counter()
        os.fsync(fd)
        t3 = time.perf_counter()
    finally:
        os.close(fd)
        path.unlink()
    return {"read_s": t1 - t0, "write_buffered_s": t2 - t1, "write_fsync_s": t3 - t1, "seconds": t3 - t0}


def run_child(cmd: list[str], out: Path, log: Path, timeout_s: float | None = None) -> dict:
    """Run cmd; wall seconds and peak RSS from os.wait4, or an "error" (its log's tail).

    OUT is removed before and after. A child past ``timeout_s`` is killed with its process group.
    """
    shutil.rmtree(out, ignore_errors=True)
    timed_out = threading.Event()
    with open(log, "wb") as logf:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout_s, kill) if timeout_s else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        if timer:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    shutil.rmtree(out, ignore_errors=True)
    res = {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss * 1024 / MiB}
    if timed_out.is_set():
        res["error"] = f"timed out after {timeout_s:g} s"
    elif proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        res["error"] = f"exit {proc.returncode}: " + " | ".join(tail)[-400:]
    log.unlink()
    return res


def streammerge_cmd(config: Path, out: Path, max_memory: str, threads: int | None, device: str) -> list[str]:
    cmd = [*STREAMMERGE, "merge", str(config), str(out), "--max-memory", max_memory]
    cmd += ["--no-progress", "--force", "--device", device]
    return cmd + (["--threads", str(threads)] if threads else [])


def mergekit_cmd(python: str, config: Path, out: Path, cuda: bool = False) -> list[str]:
    script = Path(python).parent / "mergekit-yaml"
    cmd = [str(script)] if script.exists() else [python, "-m", "mergekit.scripts.run_yaml"]
    return cmd + [str(config), str(out)] + (["--cuda"] if cuda else [])


def best(runs: list[dict]) -> dict:
    """Fastest successful run (else the first); peak RSS is the largest over all repeats."""
    ok = [r for r in runs if "error" not in r] or runs[:1]
    top = dict(min(ok, key=lambda r: r["seconds"]))
    if "peak_rss_mib" in top:
        top["peak_rss_mib"] = max(r["peak_rss_mib"] for r in ok)
    return top


def own_peak_rss_mib() -> float:
    """This process's high-water mark (VmHWM): the lowest peak a child can report."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0
