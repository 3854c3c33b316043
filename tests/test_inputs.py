"""Input formats: .bin, F8 with scales, LoRA adapters (base+adapter), hub IDs from the cache.

Each merges end to end on generated checkpoints and is checked against a hand
computation on the same values loaded with torch/safetensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import write_config

import streammerge
from streammerge.checkpoint import open_checkpoint
from streammerge.demo import TINY
from streammerge.demo_formats import (
    f8_expected,
    write_bin_copy,
    write_f8_copy,
    write_hub_cache,
    write_lora_adapter,
)
from streammerge.errors import CheckpointError


def load(model: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(f))
    return out


def digests(out: Path) -> dict:
    return json.loads((out / "streammerge.json").read_text())["tensors"]


def linear3(a, b, c) -> str:
    return (
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.3}}\n  - model: {c}\n    parameters: {{weight: 0.2}}\n"
    )


def test_bin_inputs_merge_to_the_same_bytes_as_safetensors(tiny, tmp_path):
    """pytorch_model.bin (single) and two shards with an index read the same values."""
    b1 = write_bin_copy(tiny["ft1"], tmp_path / "ft1-bin")
    b2 = write_bin_copy(tiny["ft2"], tmp_path / "ft2-bin", n_shards=2)
    assert (b2 / "pytorch_model.bin.index.json").is_file()
    ref = streammerge.merge(
        write_config(tmp_path / "st.yml", linear3(tiny["ft1"], tiny["ft2"], tiny["base"])),
        tmp_path / "st",
        max_memory=16 << 20,
    )
    got = streammerge.merge(
        write_config(tmp_path / "bin.yml", linear3(b1, b2, tiny["base"])),
        tmp_path / "bin",
        max_memory=16 << 20,
    )
    assert got.tensors == ref.tensors == len(TINY.tensors())
    assert digests(tmp_path / "bin") == digests(tmp_path / "st")
    single = open_checkpoint(b1 / "pytorch_model.bin")  # a single file works too
    assert set(single.tensors) == set(open_checkpoint(tiny["ft1"]).tensors)


def test_bin_errors_name_the_file(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pytorch_model.bin").write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path / "bad")
    assert str(e.value) == (
        f"{tmp_path / 'bad' / 'pytorch_model.bin'}: not a zip-format torch.save file (legacy .bin"
        " format); re-save it with torch>=1.6"
    )
    torch.save({"w": torch.ones(4, 4).T}, tmp_path / "t.bin")
    with pytest.raises(CheckpointError, match=r"t.bin: tensor w is not contiguous; re-save it"):
        open_checkpoint(tmp_path / "t.bin")


@pytest.mark.parametrize("scheme", ["block", "tensor", "row", "e5m2"])
def test_f8_inputs_are_dequantised_on_read(tiny, tmp_path, scheme):
    f8 = write_f8_copy(tiny["ft1"], tmp_path / "ft1-f8", scheme=scheme)
    ck = open_checkpoint(f8)
    # Scale tensors are consumed; every weight is presented as BF16.
    assert set(ck.tensors) == set(open_checkpoint(tiny["ft1"]).tensors)
    assert {t.dtype for t in ck.tensors.values()} == {"BF16"}
    cfg = write_config(
        tmp_path / "m.yml",
        f"merge_method: linear\nmodels:\n  - model: {f8}\n    parameters: {{weight: 0.75}}\n"
        f"  - model: {tiny['base']}\n    parameters: {{weight: 0.25}}\ndtype: float32\n",
    )
    streammerge.merge(cfg, tmp_path / "out", max_memory=16 << 20)
    raw, base, got = load(f8), load(tiny["base"]), load(tmp_path / "out")
    name = "model.layers.1.mlp.down_proj.weight"  # (256, 688): a partial 128-column block
    scale = raw.get(name + "_scale_inv", raw.get(name + "_scale"))
    deq = f8_expected(raw[name], scale, (128, 128) if scheme == "block" else None)
    want = 0.75 * deq.float() + 0.25 * base[name].float()  # linear in fp32: exact to 1 ulp
    assert torch.allclose(got[name], want, rtol=1e-6, atol=1e-7)
    assert torch.equal(
        got["model.norm.weight"],
        0.75 * raw["model.norm.weight"].float() + 0.25 * base["model.norm.weight"].float(),
    )


def test_f8_scale_that_fits_nothing_is_one_line(tiny, tmp_path):
    f8 = write_f8_copy(tiny["ft1"], tmp_path / "f8", scheme="block")
    tensors = safetensors.torch.load_file(f8 / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(3, 3)
    safetensors.torch.save_file(tensors, f8 / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(f8)
    assert str(e.value) == (
        f"{f8}: tensor model.layers.0.mlp.up_proj.weight: F8 scale of shape [3, 3] does not fit"
        " weight [688, 256] (expected a scalar, one per row, or a block grid)"
    )


def lora_expected(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, embedding=False):
    """PEFT's merge_and_unload on CPU: delta = (B @ A) * scale in fp32, rounded to the
    adapter's dtype, then added to W in W's dtype."""
    delta = (b.float() @ a.float()) * scale
    if embedding:
        delta = delta.T
    delta = delta.to(b.dtype)
    return (w.float() + delta.float()).to(w.dtype)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_lora_adapter_applies_w_plus_scale_ba(tiny, tmp_path, fmt):
    ad = write_lora_adapter(tmp_path / "ad", TINY, r=4, alpha=8, embedding=True, save_lm_head=True, fmt=fmt)
    cfg = write_config(
        tmp_path / "p.yml", f"merge_method: passthrough\nmodels:\n  - model: {tiny['base']}+{ad}\n"
    )
    # 4 MiB buffers: q_proj (65k elements) is still whole, the embedding streams in chunks.
    streammerge.merge(cfg, tmp_path / "out", max_memory=12 << 20)
    got, base = load(tmp_path / "out"), load(tiny["base"])
    lora = (
        safetensors.torch.load_file(ad / "adapter_model.safetensors")
        if fmt == "safetensors"
        else torch.load(ad / "adapter_model.bin", weights_only=True)
    )
    p = "base_model.model."
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.v_proj"):
        a, b = lora[f"{p}{module}.lora_A.weight"], lora[f"{p}{module}.lora_B.weight"]
        want = lora_expected(base[module + ".weight"], a, b, 8 / 4)
        assert torch.equal(got[module + ".weight"], want), module
        assert not torch.equal(want, base[module + ".weight"])  # the delta is visible in bf16
    a = lora[f"{p}model.embed_tokens.lora_embedding_A"]
    b = lora[f"{p}model.embed_tokens.lora_embedding_B"]
    assert torch.equal(
        got["model.embed_tokens.weight"], lora_expected(base["model.embed_tokens.weight"], a, b, 2.0, True)
    )
    assert torch.equal(got["lm_head.weight"], lora[f"{p}lm_head.weight"])  # modules_to_save
    assert torch.equal(
        got["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"]
    )


def test_adapter_for_another_base_is_one_line_at_plan_time(tiny, tmp_path):
    from streammerge.demo import ModelSpec

    other = ModelSpec(layers=4, hidden=128, intermediate=688, vocab=1024, heads=4, kv_heads=2)
    ad = write_lora_adapter(tmp_path / "ad", other)
    cfg = write_config(
        tmp_path / "p.yml", f"merge_method: passthrough\nmodels:\n  - model: {tiny['base']}+{ad}\n"
    )
    with pytest.raises(CheckpointError) as e:
        streammerge.plan(cfg)
    assert str(e.value) == (
        f"{cfg}: models[0].model: {ad / 'adapter_model.safetensors'}: lora_A [4, 128] and lora_B [128, 4]"
        f" give model.layers.0.self_attn.q_proj a delta of [128, 128], base {tiny['base']} has [256, 256];"
        " is this adapter for another base?"
    )


def test_hub_id_resolves_from_the_local_cache_only(tiny, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    write_hub_cache(cache, "demo-org/tiny-ft1", tiny["ft1"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for mod in [m for m in sys.modules if m.startswith("huggingface_hub")]:
        monkeypatch.delitem(sys.modules, mod)  # constants are read at import
    ck = open_checkpoint("demo-org/tiny-ft1")
    assert set(ck.tensors) == set(open_checkpoint(tiny["ft1"]).tensors)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint("demo-org/not-here")
    assert str(e.value) == (
        f"demo-org/not-here: no such file or directory, nor a model in the local Hugging Face cache ({cache});"
        " streammerge does not download, run: hf download demo-org/not-here"
    )
