#!/usr/bin/env python3
"""The whole GPU check of issue 6 in one call on a GPU machine (python3 there holds torch).

1. Make the inputs there (tools/make_checkpoints.py): a small check set (--check-size GB per
   model, real Llama tensor shapes) and, by bench.py, the benchmark set (--bench-size).
2. Correctness: every configs/*.yml (or --methods) merged in this process with
   ``--device cpu`` and with ``--device DEVICE``; every tensor compared: bit-identical
   unless TOLERANCE below allows more.
3. Speed: ``tools/bench.py --suite --device DEVICE`` at --bench-size, warm cache: every
   method vs the disk floor, and mergekit-yaml ``--cuda`` (installed from --wheels into a
   scratch dir, image torch reused) for --mergekit-methods.
Results: gpu-check.md/.json and gpu-benchmarks.md/.json/.png under --out; exit 1 when a
method is outside its tolerance or a merge fails.

On the device machine (streammerge runs from the tree via PYTHONPATH; nothing is fetched):
    python3 tools/gpu_check.py --out $OUT --wheels .gpu-wheels
Here, beforehand (mergekit 0.1.5 and the dependencies the CUDA image lacks, ~4 MB):
    .venv/bin/python tools/gpu_check.py --fetch-wheels .gpu-wheels
Dry run on a CPU machine (the same steps, cpu against cpu, tiny models):
    .venv/bin/python tools/gpu_check.py --device cpu --check-size 0.004 --bench-size 0.004 \\
        --methods linear,ties --out /tmp/gc --mergekit-python /work/mkvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

import bench_report  # noqa: E402
import bench_suite  # noqa: E402

# mergekit 0.1.5 and what the CUDA image (KINDS.md: pip list) lacks; versions as in /work/mkvenv.
WHEELS = (
    "mergekit==0.1.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 "
    "immutables==0.21 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"
).split()
MANTISSA_BITS = {"BF16": 7, "F16": 10, "F32": 23, "F64": 52}
MIN_EXPONENT = {"BF16": -126, "F16": -14, "F32": -126, "F64": -1022}  # of the smallest normal


@dataclass(frozen=True, slots=True)
class Tolerance:
    """Device vs CPU output: at most ``any_frac`` of elements differ at all, at most
    ``beyond_frac`` by more than ``ulps`` units in the last place of the output dtype."""

    any_frac: float = 0.0
    ulps: int = 0
    beyond_frac: float = 0.0


# The documented tolerance is none: `--device cuda` gives the CPU's bytes for every example
# config (tests/test_cuda.py). A method whose docs come to allow a difference gets its entry
# here; every row prints the measured fractions and the worst ulps either way.
TOLERANCE: dict[str, Tolerance] = {}


def compare(a_dir: Path, b_dir: Path, tol_ulps: int) -> dict:
    """Every tensor of two merged outputs: how many elements differ, how many by more than
    TOL_ULPS units in the last place of the output dtype, and the worst."""
    import torch
    from safetensors import safe_open

    from streammerge.checkpoint import open_checkpoint

    a, b = open_checkpoint(a_dir), open_checkpoint(b_dir)
    if a.tensors.keys() != b.tensors.keys():
        return {"error": f"tensor names differ: {sorted(a.tensors.keys() ^ b.tensors.keys())[:3]}"}
    n = differ = beyond = 0
    worst_ulps, worst = 0.0, ""
    for name, ref in a.tensors.items():
        other = b.tensors[name]
        if (ref.dtype, ref.shape) != (other.dtype, other.shape):
            return {"error": f"{name}: {ref.dtype}{list(ref.shape)} vs {other.dtype}{list(other.shape)}"}
        with safe_open(ref.path, "pt") as fa, safe_open(other.path, "pt") as fb:
            x, y = fa.get_tensor(name).double(), fb.get_tensor(name).double()
        d = (x - y).abs()
        mant, lowest = MANTISSA_BITS[ref.dtype], MIN_EXPONENT[ref.dtype]
        _, e = torch.frexp(torch.maximum(x.abs(), y.abs()))  # |v| in [2^(e-1), 2^e)
        ulps = d / torch.ldexp(torch.ones_like(d), (e - 1).clamp(min=lowest) - mant)
        ulps = torch.where(d == 0, torch.zeros_like(ulps), ulps)
        n, differ = n + d.numel(), differ + int((d != 0).sum())
        beyond += int((ulps > tol_ulps).sum())
        if d.numel() and (u := float(ulps.max())) > worst_ulps:
            worst_ulps, worst = u, name
    return {
        "elements": n,
        "differ": differ,
        "beyond_tol": beyond,
        "worst_ulps": worst_ulps,
        "worst_tensor": worst,
    }


def check_method(stem: str, cfg: Path, work: Path, device: str, max_memory: int) -> dict:
    """Merge CFG on the CPU and on DEVICE; compare; apply the method's tolerance."""
    import streammerge

    row, tol = {"method": stem}, TOLERANCE.get(stem, Tolerance())
    outs = {"cpu": work / "check-cpu", "device": work / f"check-{device}"}
    for label, out in outs.items():
        t = time.perf_counter()
        try:
            streammerge.merge(
                cfg, out, max_memory=max_memory, device=device if label == "device" else "cpu", force=True
            )
        except Exception as e:  # a failed merge is this method's result; the others still run
            return {**row, "ok": False, "error": f"{label} merge: {type(e).__name__}: {e}"}
        row[f"{label}_s"] = time.perf_counter() - t
    cmp = compare(outs["cpu"], outs["device"], tol.ulps)
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    row |= cmp | {"tolerance": asdict(tol)}
    if "error" in cmp:
        return {**row, "ok": False}
    row["ok"] = (
        cmp["differ"] <= tol.any_frac * cmp["elements"]
        and cmp["beyond_tol"] <= tol.beyond_frac * cmp["elements"]
    )
    return row


def install_mergekit(wheels: Path, work: Path) -> str | None:
    """mergekit from WHEELS into WORK/mk-site (no deps, no index: the image's torch and
    transformers are used); returns a python wrapper that sees it, or None (printed why)."""
    found = sorted(wheels.glob("*.whl"))
    if not any(w.name.startswith("mergekit-") for w in found):
        print(f"mergekit: no mergekit wheel in {wheels}; mergekit is not benchmarked")
        return None
    site = work / "mk-site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
    if subprocess.run(pip + [str(w) for w in found]).returncode != 0:
        print(f"mergekit: the wheels in {wheels} do not install here (pip said why above); not benchmarked")
        return None
    wrapper = work / "mkpython"
    wrapper.write_text(
        f'#!/bin/sh\nPYTHONPATH="{site}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" "$@"\n'
    )
    wrapper.chmod(0o755)
    probe = subprocess.run(
        [str(wrapper), "-c", "import mergekit.scripts.run_yaml"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        print(f"mergekit: installed but does not import; not benchmarked:\n{probe.stderr[-1500:]}")
        return None
    return str(wrapper)


def fetch_wheels(dest: Path) -> None:
    """Download WHEELS for the CUDA image's Python 3.12 (run where a package index is reachable)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
    ]
    cmd += [
        "--implementation",
        "cp",
        "--platform",
        "manylinux_2_17_x86_64",
        "--platform",
        "manylinux2014_x86_64",
    ]
    subprocess.run(cmd + ["--platform", "any", "-d", str(dest), *WHEELS], check=True)
    print(f"{dest}: {', '.join(sorted(p.name for p in dest.glob('*.whl')))}")


def environment(device: str) -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cores": os.cpu_count()}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: torch sees no CUDA device (use --device cpu for a dry run)")
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def tol_text(t: dict) -> str:
    if not t["any_frac"]:
        return "bit-identical"
    return f"<= {t['any_frac']:g} differ, <= {t['beyond_frac']:g} by > {t['ulps']} ulp"


def write_report(res: dict, out: Path) -> None:
    (out / "gpu-check.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        f"# GPU check: CPU vs {res['device']}",
        "",
        f"{res['env']}; check set {res['check_size_gb']:.3g} GB per model, --max-memory {res['max_memory']}",
        "",
        "| method | ok | cpu s | device s | elements differing | > tolerance ulps | worst ulps | tolerance |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["methods"]:
        if "elements" not in r:
            lines.append(f"| {r['method']} | FAIL | | | {r.get('error', '')} | | | |")
            continue
        n = r["elements"]
        lines.append(
            f"| {r['method']} | {'ok' if r['ok'] else 'FAIL'} | {r['cpu_s']:.2f} | {r['device_s']:.2f} "
            f"| {r['differ'] / n:.2e} | {r['beyond_tol'] / n:.2e} | {r['worst_ulps']:.3g} | {tol_text(r['tolerance'])} |"
        )  # fmt: skip
    if res.get("bench"):
        lines += ["", f"Bench: {res['bench']}"]
    if "over_2x_floor" in res:  # issue 6, acceptance 5
        lines.append(
            f"Slower than 2x the disk floor (or failed): {', '.join(res['over_2x_floor']) or 'none'}"
        )
        lines.append(
            f"Under 4x mergekit --cuda (or not measured): {', '.join(res['under_4x_mergekit']) or 'none'}"
        )
    (out / "gpu-check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def bench(args: argparse.Namespace, methods: list[str]) -> dict:
    """tools/bench.py --suite on DEVICE at --bench-size (warm), and acceptance 5's two ratios."""
    mk = args.mergekit_python or (install_mergekit(args.wheels, args.work) if args.wheels else None)
    mk_methods = [m for m in args.mergekit_methods.split(",") if m in methods] if mk else []
    work, out = args.work, args.out
    cmd = [
        sys.executable, str(ROOT / "tools" / "bench.py"), "--suite", "--sizes", str(args.bench_size),
        "--device", args.device, "--cache", "warm", "--methods", ",".join(methods), "--timeout", "300",
        "--max-memory", args.max_memory, "--data-root", str(work / "data"), "--out-root", str(work / "out"),
        "--md", str(out / "gpu-benchmarks.md"), "--png", str(out / "gpu-benchmarks.png"),
        "--json", str(out / "gpu-benchmarks.json"),
    ]  # fmt: skip
    if mk_methods:
        cmd += ["--mergekit-python", mk, "--mergekit-methods", ",".join(mk_methods)]
    print("bench:", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    res = {
        "bench_rc": rc,
        "bench": f"exit {rc}; see gpu-benchmarks.md" + ("" if mk_methods else " (mergekit not run)"),
    }
    if rc == 0:
        rows = json.loads((out / "gpu-benchmarks.json").read_text())["rows"]
        d = {r["method"]: bench_report.derive(r) for r in rows}
        res["over_2x_floor"] = sorted(m for m, x in d.items() if x["x_floor"] is None or x["x_floor"] > 2)
        res["under_4x_mergekit"] = sorted(m for m in mk_methods if (d[m]["vs_mergekit"] or 0) < 4)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fetch-wheels", type=Path, help="only download the mergekit wheels into this dir")
    ap.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the same steps"
    )
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")))
    ap.add_argument(
        "--work", type=Path, default=ROOT / "gpu-check-work", help="scratch: models, outputs (on disk)"
    )
    ap.add_argument("--check-size", type=float, default=0.3, help="GB per model for the CPU-vs-device check")
    ap.add_argument(
        "--check-max-memory",
        default="96MiB",
        help="small, so large tensors go in several chunks (slerp needs 68 MiB)",
    )
    ap.add_argument("--bench-size", type=float, default=2.93, help="GB per model for the benchmark (0: skip)")
    ap.add_argument("--methods", help="configs/*.yml stems (default: all)")
    ap.add_argument("--max-memory", default="512MiB")
    ap.add_argument("--wheels", type=Path, help="dir with mergekit's wheels (see --fetch-wheels)")
    ap.add_argument("--mergekit-python", help="a python that already has mergekit (instead of --wheels)")
    ap.add_argument("--mergekit-methods", default="linear,ties,dare_ties,slerp")
    args = ap.parse_args()
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels)
    from streammerge.config import parse_size

    # the children (bench.py, its `python -m streammerge.cli`) run streammerge from this tree
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    methods = args.methods.split(",") if args.methods else bench_suite.all_methods()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    res = {"device": args.device, "env": environment(args.device), "check_size_gb": args.check_size}
    res["max_memory"], res["methods"] = args.check_max_memory, []
    print(f"gpu_check: {res['env']}", flush=True)

    t0 = time.perf_counter()
    (s,) = bench_suite.choose_sets([args.check_size], [], args.work / "data")
    bench_suite.generate(s, print)
    for stem in methods:
        cfg = bench_suite.write_config(stem, s["root"], args.work / "configs")
        row = check_method(stem, cfg, args.work, args.device, parse_size(args.check_max_memory))
        res["methods"].append(row)
        detail = (
            row.get("error")
            or f"{row['differ']} of {row['elements']} differ, worst {row['worst_ulps']:.3g} ulp"
        )
        print(
            f"check {stem}: {'ok' if row['ok'] else 'FAIL'} {detail} [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
    shutil.rmtree(s["root"], ignore_errors=True)
    shutil.rmtree(args.work / "configs", ignore_errors=True)
    write_report(res, args.out)  # now, in case the benchmark runs out of the machine's time

    if args.bench_size > 0:
        res |= bench(args, methods)
    write_report(res, args.out)
    shutil.rmtree(args.work, ignore_errors=True)  # models, outputs and mergekit's scratch install
    sys.exit(0 if all(r["ok"] for r in res["methods"]) and not res.get("bench_rc") else 1)


if __name__ == "__main__":
    main()
