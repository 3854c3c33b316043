"""Every runnable example in configs/ plans and merges against the demo checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

import streammerge
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
