#!/usr/bin/env python3
"""Benchmark `streammerge batch` against K separate merges of the same configs, one run.

K linear configs (different weight sets) over the same inputs. Each arm runs as a child
process that reports its own /proc/self/io (``rchar``: bytes its read calls returned,
page cache or not; ``read_bytes``: bytes it made the block layer fetch) and its wall time.
``--cache cold`` (default): before each child the inputs are dropped from the page cache
with posix_fadvise(DONTNEED) (a model larger than RAM never stays cached). ``--cache warm``:
the inputs are read once before the first child and never dropped (they fit in RAM), so
only compute and writes are compared. os.sync() runs after each child (its time is shown
and counted, the outputs are the child's work). Separate merges write and delete one output
at a time; the batch writes all K, deleted at the end. ``--threads`` goes to both arms.

    .venv/bin/python tools/bench_batch.py /work/bench/llama26 --out-root /tmp/bb --k 4 --cache warm
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, sys, time
    t = time.perf_counter()
    threads = int(sys.argv[2]) or None
    if sys.argv[1] == "merge":
        from streammerge.execute import merge
        merge(sys.argv[3], sys.argv[4], max_memory=int(sys.argv[5]), threads=threads)
    else:
        from streammerge.batch import Member, run_batch
        from pathlib import Path
        cfgs = sys.argv[5:]
        members = [Member(Path(c).stem, c) for c in cfgs]
        s = run_batch(members, sys.argv[3], max_memory=int(sys.argv[4]), threads=threads)
        assert not s.failed, s.failed
    seconds = time.perf_counter() - t
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    print(json.dumps({"seconds": seconds, **{k: int(v) for k, v in io.items()}}))
""")
WEIGHTS = [
    (0.5, 0.3, 0.2),
    (0.2, 0.4, 0.4),
    (0.6, 0.2, 0.2),
    (0.1, 0.1, 0.8),
    (0.3, 0.3, 0.4),
    (0.7, 0.2, 0.1),
]


def drop_cache(models: list[Path]) -> None:
    for m in models:
        for f in m.glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm_cache(models: list[Path]) -> None:
    for m in models:
        for f in m.glob("*.safetensors"):
            with open(f, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass


def child(args: list[str], models: list[Path], cache: str) -> dict:
    if cache == "cold":
        drop_cache(models)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"child failed: {done.stderr.strip().splitlines()[-1]}")
    got = json.loads(done.stdout)
    s = time.perf_counter()
    os.sync()
    got["sync_seconds"] = time.perf_counter() - s
    got["wall_seconds"] = time.perf_counter() - t
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, help="folder with base/, ft1/, ft2/")
    ap.add_argument("--out-root", type=Path, required=True, help="scratch folder (deleted at the end)")
    ap.add_argument("--k", type=int, default=4, help="configs in the batch")
    ap.add_argument("--max-memory", default=str(2 << 30), help="bytes of tensor buffers, both arms")
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold", help="inputs dropped or kept cached")
    ap.add_argument("--threads", type=int, default=0, help="--threads for both arms (0: torch's default)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    a = ap.parse_args()
    models = [a.models / n for n in ("ft1", "ft2", "base")]
    root = a.out_root
    root.mkdir(parents=True, exist_ok=False)
    try:
        cfgs = []
        for i, w in enumerate(WEIGHTS[: a.k]):
            lines = ["merge_method: linear", "models:"]
            lines += [f"  - model: {m}\n    parameters: {{weight: {x}}}" for m, x in zip(models, w)]
            cfgs.append(root / f"lin{i}.yml")
            cfgs[-1].write_text("\n".join(lines) + "\n")
        if a.cache == "warm":
            warm_cache(models)
        separate = []
        for c in cfgs:
            got = child(["merge", str(a.threads), str(c), str(root / "one"), a.max_memory], models, a.cache)
            shutil.rmtree(root / "one")
            separate.append(got)
            print(f"separate {c.stem}: {got['wall_seconds']:.1f} s, rchar {got['rchar'] / 1e9:.2f} GB,"
                  f" read_bytes {got['read_bytes'] / 1e9:.2f} GB", flush=True)  # fmt: skip
        batch = child(
            ["batch", str(a.threads), str(root / "batch"), a.max_memory, *map(str, cfgs)], models, a.cache
        )
        shutil.rmtree(root / "batch")
        inputs = sum(f.stat().st_size for m in models for f in m.glob("*.safetensors"))
        sep_s = sum(g["wall_seconds"] for g in separate)
        sep_rchar = sum(g["rchar"] for g in separate)
        sep_read = sum(g["read_bytes"] for g in separate)
        print(f"inputs {inputs / 1e9:.2f} GB, K={a.k}, --max-memory {int(a.max_memory) >> 20} MiB,"
              f" cache {a.cache}, threads {a.threads or 'default'}")  # fmt: skip
        print(
            f"separate x{a.k}: {sep_s:.1f} s, rchar {sep_rchar / 1e9:.2f} GB, read_bytes {sep_read / 1e9:.2f} GB"
        )
        print(f"batch:        {batch['wall_seconds']:.1f} s (sync {batch['sync_seconds']:.1f} s),"
              f" rchar {batch['rchar'] / 1e9:.2f} GB, read_bytes {batch['read_bytes'] / 1e9:.2f} GB,"
              f" write_bytes {batch['write_bytes'] / 1e9:.2f} GB")  # fmt: skip
        print(f"batch / separate time: {batch['wall_seconds'] / sep_s:.2f}")
        if a.json:
            doc = {
                "inputs": inputs,
                "k": a.k,
                "cache": a.cache,
                "threads": a.threads,
                "separate": separate,
                "batch": batch,
                "ratio": batch["wall_seconds"] / sep_s,
            }
            a.json.write_text(json.dumps(doc, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
