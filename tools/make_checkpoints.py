#!/usr/bin/env python3
"""Make large Llama-shaped checkpoints for benchmarks, tensor by tensor in bounded memory.

Default: base + ft1 + ft2 of 26 layers, hidden 2048, vocab 32000, bf16 (~2.9 GB each),
5 GB-style sharding into 2 shards. ``--size GB`` picks the layer count (and, below ~1 GB,
smaller Llama shapes) for about that many GB per model. Nothing is downloaded. ``base`` has
no delta; ``ftN`` gets seed N (any other name: its position in --models), so models made by
separate runs, e.g. in parallel, are the same as one run's.

    python tools/make_checkpoints.py bench-data --layers 26
    python tools/make_checkpoints.py bench-data/6gb --size 6 --models ft2
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import replace
from pathlib import Path

from streammerge.demo import BENCH, LLAMA_70B, TINY, write_checkpoint

# Llama shapes from large to small; spec_for_size takes the first whose embeddings and head
# stay under a quarter of the target, so layers make up most of every size.
MINI = replace(BENCH, hidden=512, intermediate=1408, vocab=8000, heads=8, kv_heads=8)
SHAPES = (BENCH, MINI, TINY)


def spec_for_size(gb: float, dtype: str = "BF16"):
    """The ModelSpec of about ``gb`` GB (10^9 bytes) per model: a Llama shape, layers to fit."""
    target = gb * 1e9
    for shape in SHAPES:
        fixed = replace(shape, layers=0, dtype=dtype).nbytes
        if fixed <= target / 4 or shape is SHAPES[-1]:
            per_layer = replace(shape, layers=1, dtype=dtype).nbytes - fixed
            return replace(shape, layers=max(1, round((target - fixed) / per_layer)), dtype=dtype)
    raise AssertionError("unreachable")


def model_seed(name: str, index: int) -> int | None:
    """base: no delta; ftN: seed N; anything else: its position in the list."""
    if name == "base":
        return None
    m = re.fullmatch(r"ft(\d+)", name)
    return int(m.group(1)) if m else index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--size", type=float, help="GB per model; sets the shape and the layer count")
    ap.add_argument("--layers", type=int, default=BENCH.layers)
    ap.add_argument("--hidden", type=int, default=BENCH.hidden)
    ap.add_argument("--intermediate", type=int, default=BENCH.intermediate)
    ap.add_argument("--vocab", type=int, default=BENCH.vocab)
    ap.add_argument("--dtype", default="BF16", choices=["BF16", "F16", "F32"])
    ap.add_argument("--models", default="base,ft1,ft2", help="comma list; base is the seedless one")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--sparse-70b", action="store_true", help="Llama-70B shapes, headers only (sparse files)")
    args = ap.parse_args()
    if args.sparse_70b:
        spec = LLAMA_70B
    elif args.size:
        spec = spec_for_size(args.size, args.dtype)
    else:
        spec = replace(
            BENCH, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
            vocab=args.vocab, dtype=args.dtype,
        )  # fmt: skip
    for i, name in enumerate(args.models.split(",")):
        t = time.perf_counter()
        d = write_checkpoint(
            args.root / name, spec, model_seed=model_seed(name, i),
            n_shards=30 if args.sparse_70b else args.shards, sparse=args.sparse_70b,
        )  # fmt: skip
        print(f"{d}: {spec.nbytes / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
