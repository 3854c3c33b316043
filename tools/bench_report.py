"""tools/bench.py --suite results -> docs/benchmarks.md, a PNG chart and the README's table.

Everything here reads the results dict of bench_suite.run_suite (also its JSON); nothing is
measured. matplotlib is imported only to draw (optional extra ``streammerge[bench]``).
"""

from __future__ import annotations

import re
from pathlib import Path

from streammerge.plan import HEAP_FIXED_NBYTES, RUNTIME_NBYTES, TORCH_NBYTES

MB = 1e6
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
DEFINITIONS = f"""\
- **floor**: read every input file of the method once (`preadv` into a reused 64 MiB buffer),
  then write as many bytes as the merged output (`pwrite`, each range handed to writeback
  with `sync_file_range` as it is written, as streammerge's writer does) and `fsync` them;
  one process, no overlap.
  No merge can beat it by more than overlapping its reads and writes.
- **MB/s**: input bytes read / seconds (MB = 10^6 bytes), for every tool.
- **marginal MB/s** (size scaling): extra input bytes / extra seconds from one size to the
  next: the throughput without the fixed cost of a run (starting Python, loading the compiled
  loops and, for methods that need it, torch: ~0.7-2.5 s), which raw MB/s at small sizes
  includes; **marginal spread**:
  largest / smallest marginal MB/s - 1 (0% = time grows exactly linearly with size).
- **x floor**: streammerge seconds / floor seconds for the same input files and output size
  (1.00 = as fast as the disk; below 1 means reads and writes overlapped).
- **vs mergekit**: mergekit-yaml seconds / streammerge seconds (throughput ratio).
- **peak RSS**: the child process's high-water mark (`wait4` ru_maxrss), interpreter (and
  torch, where loaded) included. **plan estimate**: `streammerge plan --json`'s
  `estimated_peak_rss_nbytes` (tensor buffers for the same `--max-memory` plus the runtime's
  measured {RUNTIME_NBYTES >> 20} MiB, and where a job runs a torch kernel torch's {TORCH_NBYTES >> 20} MiB and {HEAP_FIXED_NBYTES >> 20} MiB of heap
  fragmentation); **estimate vs peak** = estimate / peak RSS - 1.
- **warm**: inputs read through the page cache before each run; **cold**: dropped from it with
  `posix_fadvise(DONTNEED)` before each run (the "cached" column, by `mincore`, shows it worked).
"""


def ok(r: dict | None) -> bool:
    return r is not None and "error" not in r


def mbps(row: dict, r: dict | None) -> float | None:
    return row["input_nbytes"] / MB / r["seconds"] if ok(r) else None


def derive(row: dict) -> dict:
    """The ratios of one row; None where a run is missing or failed."""
    sm, mk, fl = row["streammerge"], row["mergekit"], row["floor"]
    return {
        "sm_mbps": mbps(row, sm),
        "mk_mbps": mbps(row, mk),
        "floor_mbps": mbps(row, fl),
        "x_floor": sm["seconds"] / fl["seconds"] if ok(sm) and ok(fl) else None,
        "vs_mergekit": mk["seconds"] / sm["seconds"] if ok(sm) and ok(mk) else None,
        "estimate_vs_peak": row["plan_estimate_mib"] / sm["peak_rss_mib"] - 1 if ok(sm) else None,
    }


def fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def secs(r: dict | None) -> str:
    if r is None:
        return "–"
    return "failed¹" if "error" in r else f"{r['seconds']:.2f}"


def rss(r: dict | None) -> str:
    return f"{r['peak_rss_mib']:.0f}" if ok(r) else "–"


def groups(res: dict) -> list[tuple[float, str]]:
    """(size_gb, cache) pairs that have rows, the main one first: the one with the most
    mergekit rows (the comparison is the point), then the largest size, warm first."""
    keys = list(dict.fromkeys((r["size_gb"], r["cache"]) for r in res["rows"]))
    with_mk = {k: sum(1 for r in rows_of(res, *k) if r["mergekit"]) for k in keys}
    return sorted(keys, key=lambda k: (-with_mk[k], -k[0], k[1] != "warm"))


def rows_of(res: dict, size_gb: float, cache: str) -> list[dict]:
    return [r for r in res["rows"] if r["size_gb"] == size_gb and r["cache"] == cache]


def method_table(rows: list[dict]) -> list[str]:
    head = (
        "| method | inputs | floor s | streammerge s | MB/s | x floor | mergekit s | MB/s | vs mergekit "
        "| peak RSS MiB | mergekit peak RSS MiB | plan estimate MiB | estimate vs peak | cached |"
    )
    out = [head, "|" + " --- |" * (head.count("|") - 1)]
    for row in rows:
        d, sm = derive(row), row["streammerge"]
        out.append(
            f"| {row['method']} | {row['inputs']} | {secs(row['floor'])} | {secs(sm)} | {fmt(d['sm_mbps'], '.0f')} "
            f"| {fmt(d['x_floor'], '.2f')} | {secs(row['mergekit'])} | {fmt(d['mk_mbps'], '.0f')} "
            f"| {fmt(d['vs_mergekit'], '.1f', 'x')} | {rss(sm)} | {rss(row['mergekit'])} "
            f"| {row['plan_estimate_mib']:.0f} | {fmt(d['estimate_vs_peak'], '+.0%')} "
            f"| {fmt(sm.get('inputs_cached'), '.0%')} |"
        )  # fmt: skip
    return out


def scaling_table(res: dict, cache: str) -> list[str]:
    """Per method: MB/s and peak RSS at each size, and the throughput spread (max/min - 1)."""
    sizes = sorted({r["size_gb"] for r in res["rows"] if r["cache"] == cache})
    if len(sizes) < 2:
        return [f"(one size measured with a {cache} cache; give --sizes with two or more to see scaling)"]
    steps = list(zip(sizes, sizes[1:]))
    cols = (
        " | ".join(f"MB/s {s:.3g} GB" for s in sizes)
        + " | spread | "
        + " | ".join(f"marginal MB/s {a:.3g}→{b:.3g} GB" for a, b in steps)
        + " | marginal spread | "
        + " | ".join(f"RSS MiB {s:.3g} GB" for s in sizes)
    )
    out = [f"| method | {cols} |", "|" + " --- |" * (2 * len(sizes) + len(steps) + 3)]
    by = {(r["method"], r["size_gb"]): r for r in res["rows"] if r["cache"] == cache}
    floor_method = next((r["method"] for r in res["rows"] if r["inputs"] == 3), None)
    for method in [*dict.fromkeys(r["method"] for r in res["rows"]), "floor"]:
        if method == "floor" and floor_method is None:
            continue
        cells = [by.get((floor_method if method == "floor" else method, s)) for s in sizes]
        tool = "floor" if method == "floor" else "streammerge"
        speeds = [mbps(c, c[tool]) if c else None for c in cells]
        known = [v for v in speeds if v]
        spread = max(known) / min(known) - 1 if len(known) == len(sizes) else None
        margins = [_marginal(a, b, tool) for a, b in zip(cells, cells[1:])]
        known = [v for v in margins if v]
        margin_spread = max(known) / min(known) - 1 if len(known) == len(margins) else None
        rsses = [rss(c[tool]) if c and tool == "streammerge" else "–" for c in cells]
        label = "floor (3 inputs)" if method == "floor" else method
        out.append(f"| {label} | " + " | ".join(fmt(v, ".0f") for v in speeds)
                   + f" | {fmt(spread, '.0%')} | " + " | ".join(fmt(v, ".0f") for v in margins)
                   + f" | {fmt(margin_spread, '.0%')} | " + " | ".join(rsses) + " |")  # fmt: skip
    return out


def _marginal(small: dict | None, large: dict | None, tool: str) -> float | None:
    """Extra input MB per extra second from the smaller size's row to the larger's."""
    if not (small and large and ok(small[tool]) and ok(large[tool])):
        return None
    extra = large[tool]["seconds"] - small[tool]["seconds"]
    return (large["input_nbytes"] - small["input_nbytes"]) / MB / extra if extra > 0 else None


def header(res: dict) -> list[str]:
    m, v, o = res["machine"], res["versions"], res["options"]
    gpu = f"; GPU {m['gpu']}" if "gpu" in m else ""
    mk = (
        f"; mergekit {v['mergekit']} (torch {v['mergekit_torch']})"
        if "mergekit" in v
        else "; mergekit not run"
    )
    sizes = []
    for s in res["sizes"]:
        how = "generated by tools/make_checkpoints.py" if s["generated"] else f"from {s['root']}"
        sizes.append(
            f"{s['model_nbytes'] / 1e9:.3g} GB per model ({how})"
            + (f": **{s['skipped']}**" if "skipped" in s else "")
        )
    return [
        f"Measured {res['date']} by `tools/bench.py --suite` in {res['wall_s'] / 60:.1f} min. Command:",
        "",
        f"    {res['command']}",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['ram_gib']} GiB RAM, "
        f"Linux {m['kernel']}, {m.get('filesystem', '?')}{gpu}; load average {m['load_avg_start'][0]} at the start, {m['load_avg_end'][0]} at the end",
        f"- versions: streammerge {v['streammerge']} ({v['streammerge_commit']}), Python {v['python']}, "
        f"torch {v['torch']}, numpy {v['numpy']}, safetensors {v['safetensors']}{mk}",
        f"- options: `--max-memory {o['max_memory']}`, threads {o['threads'] or 'all'}, device {o['device']}, "
        f"best of {o['repeat']}; page cache: {', '.join(o['caches'])}; mergekit for "
        f"{', '.join(o['mergekit_methods']) or 'none'} ({', '.join(o['mergekit_caches']) or '-'}"
        + (f"; at {', '.join(f'{g:g}' for g in o['mergekit_sizes'])} GB per model" if o.get("mergekit_sizes") else "")
        + ")",
        "- models: three Llama-shaped bf16 checkpoints (base, ft1, ft2) per size: " + "; ".join(sizes),
        f"- this process's own peak RSS was {res['bench_peak_rss_mib']:.0f} MiB: no child can report less",
        *([f"- {res['estimates_note']}"] if res.get("estimates_note") else []),  # set by hand in the json
    ]  # fmt: skip


def markdown(res: dict, png_name: str | None, plot_note: str | None, full_command: str) -> str:
    out = ["# Benchmarks", "", *header(res), ""]
    if full_command and full_command != res["command"]:
        out += ["The full suite (the README's numbers) is:", "", f"    {full_command}", ""]
    if png_name:
        out += [f"![throughput per method and size]({png_name})", ""]
    elif plot_note:
        out += [f"Chart not drawn: {plot_note}.", ""]
    out += ["## Definitions", "", DEFINITIONS]
    keys = groups(res)
    for i, (size, cache) in enumerate(keys):
        title = f"{size:.3g} GB per model, {cache} page cache" + (" (main table)" if i == 0 else "")
        out += [f"## {title}", "", *method_table(rows_of(res, size, cache)), ""]
    for cache in dict.fromkeys(c for _, c in keys):
        out += [f"## Size scaling, {cache} page cache", "", *scaling_table(res, cache), ""]
    errors = [
        (r, t) for r in res["rows"] for t in ("floor", "streammerge", "mergekit") if r[t] and "error" in r[t]
    ]
    if errors:
        out += ["## Failed runs", ""]
        out += [
            f"- ¹ {r['method']}, {r['size_gb']:.3g} GB, {r['cache']}, {t}: {r[t]['error']}" for r, t in errors
        ]
        out.append("")
    return "\n".join(out)


def readme_section(res: dict, md_link: str, png_link: str | None) -> str:
    """The README's block between the bench markers: the main table, links to the rest."""
    if not res["rows"]:
        return f"No sizes were measured; see [{md_link}]({md_link})."
    size, cache = groups(res)[0]
    head = (
        "| method | streammerge | x floor | mergekit | vs mergekit | peak RSS (mergekit) | estimate vs peak |"
    )
    out = [
        f"{size:.3g} GB per model, {cache} page cache, `--max-memory {res['options']['max_memory']}`, "
        f"{res['machine']['cores']} cores, {res['date']} ({res['versions']['streammerge_commit']}):",
        "",
        head,
        "|" + " --- |" * (head.count("|") - 1),
    ]  # fmt: skip
    for row in rows_of(res, size, cache):
        d, sm, mk = derive(row), row["streammerge"], row["mergekit"]
        sm_cell = f"{secs(sm)} s, {fmt(d['sm_mbps'], '.0f')} MB/s" if ok(sm) else secs(sm)
        mk_cell = f"{secs(mk)} s, {fmt(d['mk_mbps'], '.0f')} MB/s" if ok(mk) else secs(mk)
        out.append(
            f"| {row['method']} | {sm_cell} | {fmt(d['x_floor'], '.2f')} | {mk_cell} | {fmt(d['vs_mergekit'], '.1f', 'x')} "
            f"| {rss(sm)} MiB ({rss(mk)}) | {fmt(d['estimate_vs_peak'], '+.0%')} |"
        )  # fmt: skip
    out += ["", f"Every size, cold cache, definitions and the exact command: [{md_link}]({md_link})."]
    if png_link:
        out += ["", f"![benchmark chart]({png_link})"]
    return "\n".join(out)


def replace_readme_block(text: str, block: str) -> str:
    """Swap what lies between the README's bench markers for BLOCK."""
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README: no {README_START} ... {README_END} markers to write the table between")
    return pattern.sub(lambda _: f"{README_START}\n{block}\n{README_END}", text)


def plot(res: dict, path: Path) -> str | None:
    """Draw the chart to PATH; returns why not when matplotlib is missing (else None)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (`pip install -e '.[bench]'`)"
    size, cache = groups(res)[0]
    rows = rows_of(res, size, cache)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(4.0, 0.32 * len(rows) + 1.5)))
    y = range(len(rows))
    d = [derive(r) for r in rows]
    both = any(x["mk_mbps"] for x in d)
    ax1.barh([i + 0.2 * both for i in y], [x["sm_mbps"] or 0 for x in d], 0.4, label="streammerge")
    if both:
        ax1.barh([i - 0.2 for i in y], [x["mk_mbps"] or 0 for x in d], 0.4, label="mergekit")
    ax1.scatter([x["floor_mbps"] or 0 for x in d], list(y), marker="|", s=300, color="k", label="disk floor")
    ax1.set_yticks(list(y), [r["method"] for r in rows])
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xlabel("MB/s (input bytes / s, log scale)")
    ax1.set_title(f"{size:.3g} GB per model, {cache} cache")
    ax1.legend(loc="lower right", fontsize=8)
    for method in dict.fromkeys(r["method"] for r in res["rows"]):
        pts = sorted(
            (r["size_gb"], derive(r)["sm_mbps"])
            for r in res["rows"]
            if r["method"] == method and r["cache"] == cache
        )
        pts = [(s, v) for s, v in pts if v]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=method)
    floor = sorted(
        (r["size_gb"], derive(r)["floor_mbps"])
        for r in res["rows"]
        if r["cache"] == cache and r["inputs"] == 3
    )
    if floor:
        ax2.plot(*zip(*dict(floor).items()), "k--", label="floor (3 inputs)")
    ax2.set_xlabel("GB per model")
    ax2.set_ylabel("streammerge MB/s")
    ax2.set_yscale("log")
    ax2.set_title(f"throughput vs model size ({cache} cache): flat = linear cost")
    ax2.legend(fontsize=6, ncol=2)
    fig.suptitle(
        f"streammerge {res['versions']['streammerge_commit']}, {res['machine']['cores']} cores, {res['date']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
