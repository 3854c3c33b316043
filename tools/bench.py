#!/usr/bin/env python3
"""The project's benchmark: the disk floor, streammerge and (optionally) mergekit in one run.

``--suite`` measures every configs/*.yml method at several model sizes, warm and cold page
cache, and writes docs/benchmarks.md, docs/benchmarks.png and (with --readme) the README's
table; see bench_suite.py for what is run and bench_report.py for what is written.
``--config`` measures one config, as before:

The floor reads every input safetensors file once into a reused 64 MiB buffer (os.preadv),
then writes as many bytes as the merged output (os.pwrite with streamed writeback, as
streammerge writes) and fsyncs them. streammerge and mergekit run as child processes; wall
time and peak RSS (os.wait4's ru_maxrss) are taken per child. Before each run the inputs are read through the page cache (warm) or dropped from it
with posix_fadvise(DONTNEED) (cold); the cached fraction (mincore) is reported. os.sync()
runs after each run (its time is shown, not counted). Throughput is input bytes read /
seconds for every row. Outputs go under --out-root and are deleted after each run.

    .venv/bin/python tools/bench.py --config /work/bench/lin.yml \\
        --mergekit-python /work/mkvenv/bin/python --json bench.json
    .venv/bin/python tools/bench.py --suite --sizes 0.1,0.3 --methods linear,ties,slerp --cache warm
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import bench_measure as bm
import bench_report
import bench_suite

MB, MiB = bm.MB, bm.MiB
# The run behind the README's numbers (the lead's; /work paths are the project machine's).
FULL_SUITE = (
    "python tools/bench.py --suite --sizes 1.5,2.93,6 --cache warm --reuse /work/bench/llama26 "
    "--mergekit-python /work/mkvenv/bin/python --mergekit-sizes 2.93 --json docs/benchmarks.json "
    "--md docs/benchmarks.md --png docs/benchmarks.png --readme README.md"
)


def bench(args: argparse.Namespace) -> dict:
    """One config: floor, streammerge, mergekit (when asked), each --repeat times."""
    plan = bm.make_plan(args.config, args.max_memory)
    files = bm.input_files(plan)
    args.out_root.mkdir(parents=True, exist_ok=True)
    buf = bm.make_buffer()
    sm_out, mk_out = args.out_root / "streammerge", args.out_root / "mergekit"
    runners = {"floor": lambda: bm.run_floor(files, plan["write_nbytes"], args.out_root, buf)}
    sm = bm.streammerge_cmd(args.config, sm_out, args.max_memory, args.threads, args.device)
    runners["streammerge"] = lambda: bm.run_child(sm, sm_out, args.out_root / "streammerge.log", args.timeout)
    if args.mergekit_python:
        mk = bm.mergekit_cmd(args.mergekit_python, args.config, mk_out, cuda=args.device == "cuda")
        runners["mergekit"] = lambda: bm.run_child(mk, mk_out, args.out_root / "mergekit.log", args.timeout)
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    for _ in range(args.repeat):
        for name, runner in runners.items():
            cached = bm.prepare_cache(files, args.cold, buf)
            result = runner()
            if "error" in result:
                sys.exit(f"{name} failed: {result['error']}")
            runs[name].append({**result, "inputs_cached": cached, "sync_after_s": bm.timed_sync()})
    return {
        "config": str(args.config), "cold": args.cold, "max_memory": args.max_memory, "repeat": args.repeat,
        "input_files": len(files), "input_nbytes": sum(f.stat().st_size for f in files),
        "write_nbytes": plan["write_nbytes"], "plan_estimated_peak_mib": plan["estimated_peak_rss_nbytes"] / MiB,
        "best": {name: bm.best(r) for name, r in runs.items()}, "runs": runs,
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


def suite(args: argparse.Namespace) -> dict:
    """Every method, size and cache state; writes the Markdown, the chart and the README block."""
    res = json.loads(args.from_json.read_text()) if args.from_json else bench_suite.run_suite(args)
    if args.json and not args.from_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    args.md.parent.mkdir(parents=True, exist_ok=True)
    note = bench_report.plot(res, args.png) if res["rows"] else "no size was measured"
    png = None if note else os.path.relpath(args.png, args.md.parent)
    args.md.write_text(bench_report.markdown(res, png, note, FULL_SUITE) + "\n")
    if note:
        print(f"chart not drawn: {note}", file=sys.stderr)
    if args.readme:
        rel = lambda p: os.path.relpath(p, args.readme.parent)
        block = bench_report.readme_section(res, rel(args.md), None if note else rel(args.png))
        args.readme.write_text(bench_report.replace_readme_block(args.readme.read_text(), block))
    print("\n".join(bench_report.method_table(bench_report.rows_of(res, *bench_report.groups(res)[0])))
          if res["rows"] else "nothing measured")  # fmt: skip
    print(f"wrote {args.md}" + ("" if note else f", {args.png}") + (f", {args.json}" if args.json else ""))
    return res


def csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", type=Path, help="one mergekit-style YAML")
    what.add_argument("--suite", action="store_true", help="every method x size x cache (see --sizes)")
    ap.add_argument("--out-root", type=Path, default=Path("bench-out"), help="scratch dir for outputs")
    ap.add_argument("--max-memory", default="512MiB", help="passed to streammerge")
    ap.add_argument("--threads", type=int, help="passed to streammerge merge")
    ap.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="streammerge --device; cuda also gives mergekit --cuda",
    )
    ap.add_argument("--mergekit-python", help="python with mergekit installed; also bench mergekit-yaml")
    ap.add_argument("--timeout", type=float, help="kill a child after this many seconds (a failed row)")
    ap.add_argument("--json", type=Path, help="also write the results here as JSON")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest is reported")
    one = ap.add_argument_group("--config")
    one.add_argument("--cold", action="store_true", help="drop inputs from the page cache before each run")
    s = ap.add_argument_group("--suite")
    s.add_argument("--sizes", type=csv(float), default=[], help="GB per model, e.g. 1.5,3,6")
    s.add_argument(
        "--reuse", type=Path, action="append", default=[], help="an existing base/ft1/ft2 set (repeatable)"
    )
    s.add_argument("--data-root", type=Path, default=Path("bench-data"), help="where generated sets go")
    s.add_argument(
        "--keep-data", action="store_true", help="keep generated sets (default: delete after each size)"
    )
    s.add_argument(
        "--min-free-gb", type=float, default=2.0, help="skip a size that would leave less free disk"
    )
    s.add_argument("--methods", type=csv(str), default=None, help="configs/*.yml stems (default: all)")
    s.add_argument("--cache", dest="caches", type=csv(str), default=["warm", "cold"], help="warm,cold")
    s.add_argument("--mergekit-methods", type=csv(str), default=None, help="default: every method")
    s.add_argument(
        "--mergekit-sizes",
        type=csv(float),
        default=None,
        help="GB per model where mergekit runs too (nearest set within 15%%; default: every size)",
    )
    s.add_argument(
        "--mergekit-cache", dest="mergekit_caches", type=csv(str), default=["warm"], help="warm,cold"
    )
    s.add_argument("--md", type=Path, default=Path("docs/benchmarks.md"))
    s.add_argument("--png", type=Path, default=Path("docs/benchmarks.png"))
    s.add_argument("--readme", type=Path, help="rewrite this README's <!-- bench:start/end --> block")
    s.add_argument("--from-json", type=Path, help="measure nothing: write --md/--png/--readme from a --json")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.suite:
        known = bench_suite.all_methods()
        args.methods = args.methods or known
        args.mergekit_methods = args.mergekit_methods or args.methods
        bad = sorted(set(args.methods + args.mergekit_methods) - set(known))
        bad += sorted(set(args.caches + args.mergekit_caches) - {"warm", "cold"})
        if bad:
            ap.error(f"unknown method or cache: {', '.join(bad)} (methods: {', '.join(known)})")
        if not args.sizes and not args.reuse and not args.from_json:
            ap.error("--suite needs --sizes and/or --reuse")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.suite:
        suite(args)
    else:
        res = bench(args)
        print(report(res))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")
    with contextlib.suppress(OSError):
        args.out_root.rmdir()  # only if empty


if __name__ == "__main__":
    main()
