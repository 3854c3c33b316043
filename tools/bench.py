#!/usr/bin/env python3
"""Benchmark a merge: the disk floor, streammerge and (optionally) mergekit, all in one run.

The floor reads every input safetensors file once into a reused 64 MiB buffer (os.preadv),
then writes as many bytes as the merged output (os.pwrite) and fsyncs them. streammerge and
mergekit run as child processes; wall time and peak RSS (os.wait4's ru_maxrss) are taken per
child. Before each run the inputs are read through the page cache (default, warm) or dropped
from it with posix_fadvise(DONTNEED) (--cold); the cached fraction (mincore) is reported.
os.sync() runs after each run (its time is shown, not counted). Throughput is input bytes
read / seconds for every row. Outputs go under --out-root and are deleted after each run.

    .venv/bin/python tools/bench.py --config /work/bench/lin.yml \\
        --mergekit-python /work/mkvenv/bin/python --json bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BUF_NBYTES = 64 << 20
MiB, MB = 1 << 20, 1e6
BIN = Path(sys.executable).parent


def make_plan(config: Path, max_memory: str) -> dict:
    cmd = [str(BIN / "streammerge"), "plan", str(config), "--json", "--max-memory", max_memory]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


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
        offset = 0
        while offset < write_nbytes:
            offset += os.pwrite(fd, buf[: min(BUF_NBYTES, write_nbytes - offset)], offset)
        t2 = time.perf_counter()
        os.fsync(fd)
        t3 = time.perf_counter()
    finally:
        os.close(fd)
        path.unlink()
    return {"read_s": t1 - t0, "write_buffered_s": t2 - t1, "write_fsync_s": t3 - t1, "seconds": t3 - t0}


def run_child(name: str, cmd: list[str], out: Path, log: Path) -> dict:
    """Run cmd, return wall seconds and the child's peak RSS from os.wait4."""
    shutil.rmtree(out, ignore_errors=True)
    with open(log, "wb") as logf:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
    log.unlink()
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss * 1024 / MiB}


def mergekit_cmd(python: str, config: Path, out: Path) -> list[str]:
    script = Path(python).parent / "mergekit-yaml"
    if script.exists():
        return [str(script), str(config), str(out)]
    return [python, "-m", "mergekit.scripts.run_yaml", str(config), str(out)]


def best(runs: list[dict]) -> dict:
    """Fastest run; peak RSS is the largest over all repeats."""
    top = dict(min(runs, key=lambda r: r["seconds"]))
    if "peak_rss_mib" in top:
        top["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return top


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """The child processes to time: streammerge, and mergekit-yaml when asked."""
    sm = [str(BIN / "streammerge"), "merge", str(args.config), str(args.out_root / "streammerge")]
    sm += ["--max-memory", args.max_memory, "--no-progress", "--force"]
    cmds = {"streammerge": sm + (["--threads", str(args.threads)] if args.threads else [])}
    if args.mergekit_python:
        cmds["mergekit"] = mergekit_cmd(args.mergekit_python, args.config, args.out_root / "mergekit")
    return cmds


def bench(args: argparse.Namespace) -> dict:
    plan = make_plan(args.config, args.max_memory)
    files = input_files(plan)
    args.out_root.mkdir(parents=True, exist_ok=True)
    buf = memoryview(bytearray(os.urandom(BUF_NBYTES)))
    runners = {"floor": lambda: run_floor(files, plan["write_nbytes"], args.out_root, buf)}
    for name, cmd in commands(args).items():
        runners[name] = lambda n=name, c=cmd: run_child(n, c, args.out_root / n, args.out_root / f"{n}.log")
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    for _ in range(args.repeat):
        for name, runner in runners.items():
            cached = prepare_cache(files, args.cold, buf)
            result = runner()
            runs[name].append({**result, "inputs_cached": cached, "sync_after_s": timed_sync()})
    return {
        "config": str(args.config), "cold": args.cold, "max_memory": args.max_memory, "repeat": args.repeat,
        "input_files": len(files), "input_nbytes": sum(f.stat().st_size for f in files),
        "write_nbytes": plan["write_nbytes"], "plan_estimated_peak_mib": plan["estimated_peak_nbytes"] / MiB,
        "best": {name: best(r) for name, r in runs.items()}, "runs": runs,
    }  # fmt: skip


def report(res: dict) -> str:
    b, fl = res["best"], res["best"]["floor"]
    nbytes, sm_s = res["input_nbytes"], b["streammerge"]["seconds"]
    cache = "warm" if not res["cold"] else "cold, posix_fadvise(DONTNEED) before each run"
    out = [
        f"inputs: {res['input_files']} files, {nbytes / MB:.1f} MB; output {res['write_nbytes'] / MB:.1f} MB; "
        f"page cache: {cache}; best of {res['repeat']}",
        f"{'run':<24}{'seconds':>9}{'MB/s':>9}{'peak RSS MiB':>14}{'inputs cached':>15}{'sync after s':>14}",
    ]  # fmt: skip
    for name, r in b.items():
        rss = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "-"
        label = "floor (read+write+fsync)" if name == "floor" else name
        out.append(f"{label:<24}{r['seconds']:9.2f}{nbytes / MB / r['seconds']:9.1f}{rss:>14}"
                   f"{r['inputs_cached']:14.1%}{r['sync_after_s']:14.2f}")  # fmt: skip
    worst = max(r["inputs_cached"] for rs in res["runs"].values() for r in rs)
    out += [
        f"  floor: read {fl['read_s']:.2f} s + write+fsync {fl['write_fsync_s']:.2f} s; write buffered only "
        f"{fl['write_buffered_s']:.2f} s (floor without fsync {fl['read_s'] + fl['write_buffered_s']:.2f} s)",
        f"  floor if reads and writes overlapped, max(read, write+fsync): {max(fl['read_s'], fl['write_fsync_s']):.2f} s",
        f"  streammerge: plan estimate {res['plan_estimated_peak_mib']:.0f} MiB, measured peak RSS "
        f"{b['streammerge']['peak_rss_mib']:.0f} MiB (--max-memory {res['max_memory']})",
        "MB/s = input bytes read / seconds (MB = 10^6 bytes); 'inputs cached' is measured by mincore.",
    ]  # fmt: skip
    if res["cold"]:
        out.append(f"cold drop {'worked' if worst < 0.01 else 'did NOT fully work'}: "
                   f"at most {worst:.1%} of input pages cached at the start of any run")  # fmt: skip
    if "mergekit" in b:
        out.append(f"streammerge / mergekit throughput: {b['mergekit']['seconds'] / sm_s:.2f}x")
    out.append(f"streammerge / floor (floor s / streammerge s): {fl['seconds'] / sm_s:.2f}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="mergekit-style YAML")
    ap.add_argument("--out-root", type=Path, default=Path("bench-out"), help="scratch dir for outputs")
    ap.add_argument("--max-memory", default="512MiB", help="passed to streammerge")
    ap.add_argument("--threads", type=int, help="passed to streammerge merge")
    ap.add_argument("--mergekit-python", help="python with mergekit installed; also bench mergekit-yaml")
    ap.add_argument("--cold", action="store_true", help="drop inputs from the page cache before each run")
    ap.add_argument("--json", type=Path, help="also write the results here as JSON")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest is reported")
    args = ap.parse_args()
    res = bench(args)
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    with contextlib.suppress(OSError):
        args.out_root.rmdir()  # only if empty


if __name__ == "__main__":
    main()
