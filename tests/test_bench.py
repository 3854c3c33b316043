"""tools/bench.py --suite end to end on tiny generated models, and its pure parts.

The suite runs as a child process, as users run it: a child's peak RSS (wait4) cannot read
below its parent's, so measuring from inside pytest would report pytest's size.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import bench_measure  # noqa: E402
import bench_report  # noqa: E402
import bench_suite  # noqa: E402
import gpu_check  # noqa: E402
from make_checkpoints import spec_for_size  # noqa: E402

README = "# x\n\n## Benchmarks\n\n<!-- bench:start -->\nold numbers\n<!-- bench:end -->\n\n## After\n"


def test_suite_writes_markdown_json_and_readme_on_tiny_models(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    out, data, md, png, js = (tmp_path / n for n in ("out", "data", "b.md", "b.png", "b.json"))
    cmd = [
        sys.executable, str(TOOLS / "bench.py"), "--suite", "--sizes", "0.004", "--methods", "linear,slerp",
        "--cache", "warm", "--out-root", str(out), "--data-root", str(data), "--md", str(md),
        "--png", str(png), "--json", str(js), "--readme", str(readme), "--threads", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(js.read_text())
    (size,) = res["sizes"]
    assert size["generated"] and 3e6 < size["model_nbytes"] < 5e6
    assert [(r["method"], r["inputs"], r["cache"]) for r in res["rows"]] == [
        ("linear", 3, "warm"),
        ("slerp", 2, "warm"),
    ]
    for row in res["rows"]:
        n = row["inputs"]
        assert n * size["model_nbytes"] == row["input_nbytes"]
        assert 0 < row["write_nbytes"] <= size["model_nbytes"]
        assert row["plan_estimate_mib"] > 0 and row["mergekit"] is None
        sm, fl = row["streammerge"], row["floor"]
        assert "error" not in sm and 0 < fl["seconds"] < sm["seconds"] < 100
        # torch alone is ~200 MiB; a tiny merge stays well under a GiB
        assert 100 < sm["peak_rss_mib"] < 1024 and sm["inputs_cached"] == 1.0
    assert res["bench_peak_rss_mib"] < 200  # small enough not to mask the children's peaks
    assert not data.exists() or not any(data.iterdir())  # generated models deleted
    assert not out.exists()  # outputs deleted, scratch dir removed

    text = md.read_text()
    label = f"{size['model_nbytes'] / 1e9:.3g} GB per model, warm page cache (main table)"
    assert res["command"] in text and label in text
    assert "| linear | 3 |" in text and "| slerp | 2 |" in text
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert png.exists() == has_mpl
    assert ("](b.png)" in text) == has_mpl and ("matplotlib is not installed" in text) != has_mpl
    new = readme.read_text()
    assert "old numbers" not in new and "| linear |" in new and "[b.md](b.md)" in new
    assert new.startswith("# x\n") and new.endswith("<!-- bench:end -->\n\n## After\n")


@pytest.mark.parametrize("gb", [0.1, 0.3, 1.5, 3, 6])
def test_spec_for_size_is_within_5_percent(gb):
    assert abs(spec_for_size(gb).nbytes / (gb * 1e9) - 1) < 0.05


def _fake_set(root: Path, nbytes: int) -> Path:
    for m in bench_suite.MODELS:
        (root / m).mkdir(parents=True)
        with open(root / m / "model.safetensors", "wb") as f:
            f.truncate(nbytes)  # sparse: no disk used
    return root


def test_reused_sets_serve_sizes_within_15_percent(tmp_path):
    llama = _fake_set(tmp_path / "llama26", 2_930_000_000)
    sets = bench_suite.choose_sets([1.5, 3.0, 6.0], [llama], tmp_path / "data")
    assert [(round(s["gb"], 1), s["generate"]) for s in sets] == [(1.5, True), (3.0, False), (6.0, True)]
    assert sets[1]["root"] == llama and sets[1]["model_nbytes"] == 2_930_000_000
    assert sets[2]["root"] == tmp_path / "data" / "llama-h2048-l56"
    # a reused set that matches no size is measured as its own size
    assert [s["root"] for s in bench_suite.choose_sets([], [llama], tmp_path)] == [llama]


def test_a_size_without_room_is_skipped_with_the_numbers(tmp_path):
    s = {"gb": 6.0, "root": tmp_path / "x", "model_nbytes": 6_000_000_000, "generate": True}
    why = bench_suite.room_for(s, tmp_path, min_free_gb=1e6)
    assert why.startswith("skipped: 3 models + 1 output need 24.0 GB, ") and "1e+06 GB must stay free" in why
    assert f"GB free on {tmp_path}," in why
    assert bench_suite.room_for({**s, "model_nbytes": 1000}, tmp_path, min_free_gb=0) is None


def test_configs_point_at_the_benchmark_models(tmp_path):
    cfg = bench_suite.write_config("ties", tmp_path / "m", tmp_path)
    assert "demo-out" not in cfg.read_text() and f"{(tmp_path / 'm').resolve()}/ft1" in cfg.read_text()


def test_ratios_and_readme_markers():
    row = {
        "input_nbytes": 3e9, "plan_estimate_mib": 450.0, "floor": {"seconds": 4.0},
        "streammerge": {"seconds": 5.0, "peak_rss_mib": 500.0}, "mergekit": {"seconds": 50.0},
    }  # fmt: skip
    d = bench_report.derive(row)
    assert d["sm_mbps"] == 600 and d["x_floor"] == 1.25 and d["vs_mergekit"] == 10.0
    assert d["estimate_vs_peak"] == pytest.approx(-0.1)
    assert bench_report.derive({**row, "mergekit": {"seconds": 9, "error": "exit 1"}})["vs_mergekit"] is None
    assert bench_report.replace_readme_block(README, "new") == README.replace("old numbers", "new")
    with pytest.raises(SystemExit, match="no <!-- bench:start --> ... <!-- bench:end --> markers"):
        bench_report.replace_readme_block("# x\n", "new")


def test_a_failing_child_is_a_row_error_not_an_exit(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    res = bench_measure.run_child(cmd, tmp_path / "o", tmp_path / "log")
    assert res["error"] == "exit 3: boom" and not (tmp_path / "log").exists()
    slow = bench_measure.run_child(
        [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "o", tmp_path / "l", 0.5
    )
    assert slow["error"] == "timed out after 0.5 s" and slow["seconds"] < 10


def test_cache_states_are_measured(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(os.urandom(1 << 20))
    buf = bench_measure.make_buffer()
    assert bench_measure.prepare_cache([f], cold=False, buf=buf) == 1.0
    assert 0.0 <= bench_measure.prepare_cache([f], cold=True, buf=buf) <= 1.0  # tmpfs keeps its pages


def test_gpu_check_counts_ulps_of_the_output_dtype(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    # bf16 has 7 mantissa bits: the ulp of 1.0 is 2^-7 = 0.0078125, of 2.0 it is 2^-6
    a = torch.tensor([1.0, 2.0, 0.0, -3.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0078125, 2.0, 0.0, -3.0 - 3 * 2**-6], dtype=torch.bfloat16)
    for d, t in (("a", a), ("b", b)):
        (tmp_path / d).mkdir()
        save_file({"w": t}, str(tmp_path / d / "model.safetensors"), metadata={"format": "pt"})
    res = gpu_check.compare(tmp_path / "a", tmp_path / "b", tol_ulps=1)
    assert res == {"elements": 4, "differ": 2, "beyond_tol": 1, "worst_ulps": 3.0, "worst_tensor": "w"}
    assert gpu_check.compare(tmp_path / "a", tmp_path / "a", tol_ulps=1)["differ"] == 0


def test_the_readme_has_the_block_the_suite_rewrites():
    readme = (TOOLS.parent / "README.md").read_text()
    assert readme.count(bench_report.README_START) == readme.count(bench_report.README_END) == 1
    assert "replaced" in bench_report.replace_readme_block(readme, "replaced")
