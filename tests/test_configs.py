"""Every runnable example in configs/ plans and merges against the demo checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import streammerge
import streammerge.methods
from streammerge.demo import make_demo_models

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yml"))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-root")
    make_demo_models(root / "demo-out")
    return root


def test_there_are_examples():
    assert {p.stem for p in CONFIGS} >= {"linear", "task_arithmetic", "passthrough"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_config_merges(path, demo_root, monkeypatch, tmp_path):
    monkeypatch.chdir(demo_root)  # the examples use paths relative to the repository root
    plan = streammerge.plan(path, max_memory=64 << 20)
    assert plan.jobs
    summary = streammerge.merge(path, tmp_path / "out", max_memory=64 << 20)
    assert summary.tensors == len(plan.jobs)
    assert streammerge.verify(tmp_path / "out") == len(plan.jobs)


@pytest.fixture(scope="module")
def small_root(small):
    """The SMALL models laid out like demo-out/models, so the examples can point at them."""
    return small["base"].parent


def _on(path: Path, root: Path, tmp: Path) -> Path:
    text = path.read_text().replace("demo-out/models/", f"{root}/")
    out = tmp / path.name
    out.write_text(text)
    return out


def _digests(out: Path) -> dict:
    import json

    return json.loads((out / "streammerge.json").read_text())["tensors"]


def _streaming_budget(path: Path) -> int:
    """A budget that streams the embedding (2M elements) in several chunks yet holds whole
    statistics blocks: slerp's are 1M elements; the task-arithmetic family's, sce's and
    arcee_fusion's 256K (task_arithmetic has none, and no scratch: it merges straight from
    the read bytes, so 32 MiB would hold the whole embedding)."""
    method = yaml.safe_load(path.read_text())["merge_method"]
    large_stats = method in streammerge.methods.GTA or method in ("sce", "arcee_fusion")
    if method == "slerp":
        return 48 << 20
    return 32 << 20 if large_stats and method != "task_arithmetic" else 12 << 20


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_method_is_identical_across_threads_and_budgets(path, small_root, tmp_path):
    """A small budget streams the embedding (2M elements) in several chunks and reads it
    once per statistics pass; 2 GiB holds every tensor whole. The bytes must not change."""
    cfg = _on(path, small_root, tmp_path)
    small = _streaming_budget(path)
    runs = {}
    for label, budget, threads in [
        ("stream-1t", small, 1),
        ("stream-2t", small, 2),
        ("whole-2t", 2 << 30, 2),
    ]:
        plan = streammerge.plan(cfg, max_memory=budget)
        if label == "stream-1t":
            assert any(not j.resident for j in plan.jobs)  # really streamed
        streammerge.merge(cfg, tmp_path / label, max_memory=budget, threads=threads, seed=5)
        runs[label] = _digests(tmp_path / label)
    assert runs["stream-1t"] == runs["stream-2t"] == runs["whole-2t"]
    if streammerge.methods.SPECS[plan.config.merge_method].random:
        streammerge.merge(cfg, tmp_path / "seed6", max_memory=2 << 30, seed=6)
        assert _digests(tmp_path / "seed6") != runs["whole-2t"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_the_device_path_gives_the_cpu_bytes(path, small_root, tmp_path, monkeypatch):
    """``--device cuda``'s executor path, run here on the CPU: statistics passes on the CPU,
    each chunk staged whole and merged in device blocks (slices of it, several per chunk
    here), one result copied back. Its bytes must be the CPU path's; tests/test_cuda.py
    checks the same on a real GPU."""
    from streammerge import execute

    cfg = _on(path, small_root, tmp_path)
    budget = _streaming_budget(path)
    streammerge.merge(cfg, tmp_path / "cpu", max_memory=budget, seed=5)
    monkeypatch.setattr(execute._JobRun, "_staged", lambda self: True)
    monkeypatch.setattr(execute, "DEVICE_BLOCK_ELEMS", 1 << 18)
    streammerge.merge(cfg, tmp_path / "staged", max_memory=budget, seed=5)
    assert _digests(tmp_path / "staged") == _digests(tmp_path / "cpu")


@pytest.mark.parametrize("stem", ["linear", "ties", "slerp", "passthrough", "nuslerp"])
def test_mapped_and_copied_reads_give_the_same_bytes(stem, small_root, tmp_path, monkeypatch):
    """Inputs are mmap'ed (the page cache's pages, no copy) unless MAP_INPUTS is off, when
    they are preadv'ed into the read sets, as on a GPU; derived inputs (a tokenizer's rows)
    always go through the read sets. Streamed, with statistics passes: the same bytes."""
    from streammerge import execute

    path = next(p for p in CONFIGS if p.stem == stem)
    cfg = _on(path, small_root, tmp_path)
    budget = 72 << 20 if stem == "slerp" else 32 << 20
    streammerge.merge(cfg, tmp_path / "mapped", max_memory=budget, seed=5)
    monkeypatch.setattr(execute, "MAP_INPUTS", False)
    streammerge.merge(cfg, tmp_path / "copied", max_memory=budget, seed=5)
    assert _digests(tmp_path / "mapped") == _digests(tmp_path / "copied")
