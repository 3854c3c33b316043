"""Shared fixtures: demo checkpoints made locally by ``streammerge.demo`` (never a hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from streammerge.cli import main
from streammerge.demo import TINY, ModelSpec, write_checkpoint

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
