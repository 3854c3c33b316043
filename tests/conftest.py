"""Shared fixtures: demo checkpoints made locally by ``streammerge.demo`` (never a hub)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import streammerge
from streammerge.cli import main
from streammerge.demo import TINY, ModelSpec, write_checkpoint
from streammerge.polite import IoLimits
from streammerge.shards import WorkDir

# Big enough that small budgets split tensors into several chunks (embed: 2M elements).
SMALL = ModelSpec(layers=2, hidden=512, intermediate=1536, vocab=4096, heads=8, kv_heads=4)


def _models(root: Path, spec: ModelSpec) -> dict[str, Path]:
    return {
        name: write_checkpoint(root / name, spec, model_seed=seed)
        for name, seed in {"base": None, "ft1": 1, "ft2": 2}.items()
    }


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """base, ft1, ft2: TINY Llama-shaped bf16 models, 2 shards each."""
    return _models(tmp_path_factory.mktemp("tiny"), TINY)


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> dict[str, Path]:
    """base, ft1, ft2: SMALL models whose largest tensors span several chunks."""
    return _models(tmp_path_factory.mktemp("small"), SMALL)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def linear_config(models: dict[str, Path], **extra: str) -> str:
    lines = [
        "merge_method: linear",
        "models:",
        f"  - model: {models['ft1']}",
        "    parameters: {weight: 0.5}",
        f"  - model: {models['ft2']}",
        "    parameters: {weight: 0.3}",
        f"  - model: {models['base']}",
        "    parameters: {weight: 0.2}",
    ]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def cli():
    """Run the CLI in-process; returns the click Result (stdout, stderr, exit_code)."""
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run


# Scale-out tests (test_scaleout.py, test_ray.py): the TINY linear merge in output shards.
SHARD = 4_000_000  # the TINY output (6.8 MB) in 2 shards
SLOW = IoLimits(read_rate=12_000_000)  # about 0.8 s per shard: long enough to be caught mid-shard


def tree(out: Path) -> dict[str, bytes]:
    """Every file of an output, by name (a merged folder holds no subfolders)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="session")
def reference(tiny, tmp_path_factory):
    """(config, the one-process merge's files) for the TINY linear merge in 2 shards."""
    root = tmp_path_factory.mktemp("scaleout")
    cfg = write_config(root / "linear.yml", linear_config(tiny))
    streammerge.merge(cfg, root / "inline", max_memory=32 << 20, shard_nbytes=SHARD)
    files = tree(root / "inline")
    assert sum(n.endswith(".safetensors") for n in files) == 2
    return cfg, files


def attempts(out: Path, index: int) -> list[dict]:
    folder = WorkDir(out).root / "attempts" / str(index)
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError("timed out")
