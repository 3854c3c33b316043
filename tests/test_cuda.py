"""--device cuda gives the CPU's bytes for every example config (runs only with a GPU).

Checked on an H200 (2026-11-26, torch 2.11+cu130): 19 of 22 configs bit-identical before
karcher's Gram matrix and arcee_fusion's importance moved to the CPU and slerp's
statistics to the block's device; those three are the reason this test exists.
tools/gpu_check.py on an H200 (2026-11-27, 0.3 GB models, 96 MiB budget): 18 of 22 configs
bit-identical; karcher and slerp differed and nuslerp/nuslerp_columns mixed devices. Since
then statistics passes run on the CPU, nuslerp's sines are taken there and karcher's scale
is rounded as on the CPU (not yet re-run on a GPU). tests/test_configs.py runs the device
path's executor on the CPU for every config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import streammerge
from streammerge.demo import make_demo_models

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the GPU path is checked on GPU machines only"
)

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yml"))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-demo")
    make_demo_models(root / "demo-out")
    return root


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_cuda_output_is_the_cpu_output(path, demo_root, monkeypatch, tmp_path):
    monkeypatch.chdir(demo_root)
    for device in ("cpu", "cuda"):
        streammerge.merge(path, tmp_path / device, device=device, max_memory=64 << 20)
    for shard in sorted((tmp_path / "cpu").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "cuda" / shard.name).read_bytes(), shard.name
