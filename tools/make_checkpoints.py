#!/usr/bin/env python3
"""Make large Llama-shaped checkpoints for benchmarks, tensor by tensor in bounded memory.

Default: base + ft1 + ft2 of 26 layers, hidden 2048, vocab 32000, bf16 (~2.9 GB each),
5 GB-style sharding into 2 shards. Nothing is downloaded.

    python tools/make_checkpoints.py bench-data --layers 26
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from streammerge.demo import BENCH, LLAMA_70B, write_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--layers", type=int, default=BENCH.layers)
    ap.add_argument("--hidden", type=int, default=BENCH.hidden)
    ap.add_argument("--intermediate", type=int, default=BENCH.intermediate)
    ap.add_argument("--vocab", type=int, default=BENCH.vocab)
    ap.add_argument("--dtype", default="BF16", choices=["BF16", "F16", "F32"])
    ap.add_argument("--models", default="base,ft1,ft2", help="comma list; base is the seedless one")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--sparse-70b", action="store_true", help="Llama-70B shapes, headers only (sparse files)")
    args = ap.parse_args()
    spec = LLAMA_70B if args.sparse_70b else replace(
        BENCH, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
        vocab=args.vocab, dtype=args.dtype,
    )  # fmt: skip
    for i, name in enumerate(args.models.split(",")):
        t = time.perf_counter()
        d = write_checkpoint(
            args.root / name, spec, model_seed=None if name == "base" else i,
            n_shards=30 if args.sparse_70b else args.shards, sparse=args.sparse_70b,
        )  # fmt: skip
        print(f"{d}: {spec.nbytes / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
