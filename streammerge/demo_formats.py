"""Demo checkpoints in the other input formats, made from ``demo`` ones, for tests.

PyTorch ``.bin`` copies (single or sharded with an index), F8 checkpoints with
per-tensor or block-wise scales, LoRA/PEFT adapters for a demo base, and a Hugging
Face cache layout. These use torch (``torch.save``, F8 casts), like the files real
tools write; everything is small and local.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .demo import ModelSpec, tensor_values

CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _load(model: Path) -> dict:
    import safetensors.torch

    out = {}
    for f in sorted(model.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(f))
    return out


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in CONFIG_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def write_bin_copy(src: str | os.PathLike, dst: str | os.PathLike, *, n_shards: int = 1) -> Path:
    """The safetensors model ``src`` re-saved with ``torch.save`` as ``pytorch_model.bin``
    (or ``n_shards`` shards plus ``pytorch_model.bin.index.json``)."""
    import torch

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = _load(src)
    names = list(tensors)
    groups = [names[i::n_shards] for i in range(n_shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = "pytorch_model.bin" if n_shards == 1 else f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        torch.save({n: tensors[n] for n in group}, dst / fname)
        weight_map.update({n: fname for n in group})
    if n_shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    _copy_side_files(src, dst)
    return dst


def write_f8_copy(src: str | os.PathLike, dst: str | os.PathLike, *, scheme: str = "block") -> Path:
    """``src`` with every 2-D ``*_proj.weight`` quantised to F8 E4M3, as FP8 checkpoints
    ship: ``scheme`` "block" (128x128 ``weight_scale_inv``, DeepSeek-V3 style), "tensor"
    (scalar ``weight_scale`` plus an ``input_scale``, compressed-tensors style), "row"
    (one scale per row) or "e5m2" (F8 E5M2, no scale)."""
    import safetensors.torch
    import torch

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, x in _load(src).items():
        if not (name.endswith("_proj.weight") and x.dim() == 2):
            out[name] = x
            continue
        x = x.float()
        if scheme == "e5m2":
            out[name] = x.to(torch.float8_e5m2)
            continue
        if scheme == "block":
            rows, cols = -(-x.shape[0] // 128), -(-x.shape[1] // 128)
            pad = torch.zeros(rows * 128, cols * 128)
            pad[: x.shape[0], : x.shape[1]] = x.abs()
            amax = pad.reshape(rows, 128, cols, 128).amax(dim=(1, 3))
            scale = amax / 448.0
            full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: x.shape[0], : x.shape[1]]
            out[name] = (x / full).to(torch.float8_e4m3fn)
            out[name + "_scale_inv"] = scale
        elif scheme == "row":
            scale = x.abs().amax(dim=1, keepdim=True) / 448.0
            out[name] = (x / scale).to(torch.float8_e4m3fn)
            out[name + "_scale"] = scale
        else:
            scale = x.abs().amax() / 448.0
            out[name] = (x / scale).to(torch.float8_e4m3fn)
            out[name + "_scale"] = scale.reshape(1)
            out[name.removesuffix("weight") + "input_scale"] = torch.ones(1)
    safetensors.torch.save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    _copy_side_files(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    if scheme == "block":
        cfg["quantization_config"]["weight_block_size"] = [128, 128]
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def write_lora_adapter(
    dst: str | os.PathLike,
    spec: ModelSpec,
    *,
    r: int = 4,
    alpha: float = 8.0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    embedding: bool = False,
    save_lm_head: bool = False,
    seed: int = 7,
    fmt: str = "safetensors",
    dtype: str = "F32",
) -> Path:
    """A PEFT LoRA adapter for a demo model of ``spec``: ``adapter_config.json`` and
    ``adapter_model.safetensors`` (or ``.bin``) with PEFT's tensor names."""
    import torch

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shapes = dict(spec.tensors())
    torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16}[dtype]
    tensors = {}

    def values(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        x = tensor_values(name, shape, seed, 1.0) - tensor_values(name, shape, None, 0.0)
        return torch.from_numpy(np.ascontiguousarray(x.reshape(shape))).to(torch_dtype)

    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if len(shape) == 2 and module.rsplit(".", 1)[-1] in targets:
            out_f, in_f = shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = values(module + "A", (r, in_f)) * 0.1
            tensors[f"base_model.model.{module}.lora_B.weight"] = values(module + "B", (out_f, r)) * 0.01
    if embedding:
        v, h = shapes["model.embed_tokens.weight"]
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = values("embA", (r, v)) * 0.1
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = values("embB", (h, r)) * 0.01
    if save_lm_head:
        tensors["base_model.model.lm_head.weight"] = values("lm_head", shapes["lm_head.weight"]).to(
            torch.bfloat16
        )
    if fmt == "bin":
        torch.save(tensors, dst / "adapter_model.bin")
    else:
        import safetensors.torch

        safetensors.torch.save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets) + (["embed_tokens"] if embedding else []),
        "modules_to_save": ["lm_head"] if save_lm_head else None,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "base_model_name_or_path": "demo-base",
    }
    (dst / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst


def write_hub_cache(cache: str | os.PathLike, repo: str, src: str | os.PathLike) -> Path:
    """Lay ``src``'s files out as ``huggingface_hub`` caches repository ``repo``."""
    cache, src = Path(cache), Path(src)
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copyfile(f, snap / f.name)
    return snap


def f8_expected(x_f8, scale, block: tuple[int, int] | None = None):
    """Dequantise by hand: ``bf16(f8 * scale)`` (tests' reference)."""
    import torch

    x = x_f8.float()
    if scale is None:
        return x.to(torch.bfloat16)
    if block is not None:
        s = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        return (x * s[: x.shape[0], : x.shape[1]]).to(torch.bfloat16)
    return (x * scale.reshape(-1, *([1] * (x.dim() - 1))) if scale.numel() > 1 else x * scale.reshape(())).to(
        torch.bfloat16
    )
