"""Architectures: each demo family merges end to end with names, shapes, config.json and
one family-specific tensor checked by hand."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from conftest import write_config

import streammerge
from streammerge.arch import ARCHS, tiny
from streammerge.demo import write_checkpoint

# The tensor that makes each family different, checked by hand below.
SPECIAL = {
    "llama": "model.layers.1.mlp.gate_proj.weight",
    "mistral": "model.layers.0.self_attn.k_proj.weight",
    "qwen2": "model.layers.1.self_attn.q_proj.bias",
    "gemma": "model.embed_tokens.weight",
    "phi3": "model.layers.0.self_attn.qkv_proj.weight",
    "mixtral": "model.layers.1.block_sparse_moe.experts.3.w2.weight",
}


def load(model):
    out = {}
    for f in sorted(model.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(f))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_family_merges_with_its_own_names_and_config(arch, tmp_path):
    spec = tiny(arch)
    models = {
        k: write_checkpoint(tmp_path / k, spec, model_seed=s) for k, s in (("base", None), ("a", 1), ("b", 2))
    }
    cfg = write_config(
        tmp_path / "ta.yml",
        f"merge_method: task_arithmetic\nbase_model: {models['base']}\nmodels:\n"
        f"  - model: {models['a']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {models['b']}\n    parameters: {{weight: 0.25}}\ndtype: float32\n",
    )
    streammerge.merge(cfg, tmp_path / "out", max_memory=16 << 20)
    got, base, a, b = (load(p) for p in (tmp_path / "out", models["base"], models["a"], models["b"]))
    assert {n: tuple(t.shape) for n, t in got.items()} == dict(spec.tensors())
    assert ("lm_head.weight" in got) == (arch != "gemma")
    name = SPECIAL[arch]
    want = (
        base[name].float()
        + 0.5 * (a[name].float() - base[name].float())
        + 0.25 * (b[name].float() - base[name].float())
    )
    assert torch.allclose(got[name], want, rtol=1e-6, atol=1e-7), name
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    src_cfg = json.loads((models["base"] / "config.json").read_text())
    assert out_cfg == {**src_cfg, "torch_dtype": "float32"}
    assert out_cfg["vocab_size"] == got["model.embed_tokens.weight"].shape[0]
    assert out_cfg["num_hidden_layers"] == spec.layers
    if arch == "mixtral":
        assert out_cfg["num_local_experts"] == 4 and got[
            "model.layers.0.block_sparse_moe.gate.weight"
        ].shape == (4, 128)
    if arch == "gemma":
        assert "tie_word_embeddings" not in out_cfg  # stays tied (transformers' default)
