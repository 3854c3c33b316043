"""``base+adapter``: a LoRA/PEFT adapter applied to its base model, tensor by tensor.

Each weight the adapter targets becomes a ``derive.Lora`` ref (W + scale * B @ A,
computed on read, in bounded memory); ``modules_to_save`` tensors replace the base's.
``scale`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with
PEFT's ``rank_pattern``/``alpha_pattern`` overrides. Everything is checked against
the base's shapes here, at plan time: an adapter trained for another base fails with
the tensor named.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

from .errors import CheckpointError

PREFIX = "base_model.model."
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def apply_adapter(base, ref: str, adapter_dir: Path):
    """The ``Checkpoint`` ``base`` with the adapter at ``adapter_dir`` applied."""
    from .checkpoint import TensorRef, open_checkpoint
    from .derive import Lora

    where = adapter_dir / "adapter_config.json"
    cfg = _adapter_config(where)
    weights = next((adapter_dir / n for n in WEIGHT_FILES if (adapter_dir / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")
    raw = open_checkpoint(weights)
    pairs: dict[str, dict[str, object]] = {}
    full: dict[str, object] = {}
    for name, t in raw.tensors.items():
        key = name.removeprefix(PREFIX).replace(".modules_to_save.default", "")
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight|(.+)\.(lora_embedding_[AB])", key)
        if m:
            module, part = (m[1], m[2]) if m[1] else (m[3], m[4])
            pairs.setdefault(module, {})[part[-1]] = t
            pairs[module]["embedding"] = part.startswith("lora_embedding")
        elif "lora_magnitude_vector" in key:
            raise CheckpointError(f"{weights}: tensor {name}: DoRA adapters are not supported")
        else:
            full[key] = t
    tensors = dict(base.tensors)
    for module, ab in pairs.items():
        target = module + ".weight"
        if "A" not in ab or "B" not in ab:
            raise CheckpointError(f"{weights}: {module} has lora_{'AB'['A' in ab]} without its pair")
        w = tensors.get(target)
        if w is None:
            raise CheckpointError(f"{weights}: adapter targets {target}, which base {base.path} lacks")
        a, b = ab["A"], ab["B"]
        embedding = ab["embedding"]
        rank = a.shape[0]
        want = (a.shape[1], b.shape[0]) if embedding else (b.shape[0], a.shape[1])
        if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != rank or tuple(w.shape) != want:
            raise CheckpointError(
                f"{weights}: lora_A {list(a.shape)} and lora_B {list(b.shape)} give {module} a delta"
                f" of {list(want)}, base {base.path} has {list(w.shape)}; is this adapter for another base?"
            )
        scale = _scale(cfg, module, rank, where)
        tensors[target] = TensorRef(w.path, w.offset, w.dtype, w.shape, Lora(a, b, scale, embedding))
    for key, t in full.items():
        w = tensors.get(key)
        if w is None or w.shape != t.shape:
            got = "lacks it" if w is None else f"has {list(w.shape)}"
            raise CheckpointError(
                f"{weights}: tensor {key} {list(t.shape)} replaces a base tensor, base {base.path} {got}"
            )
        tensors[key] = t
    return replace(base, path=ref, tensors=tensors, files=base.files + raw.files)


def _adapter_config(where: Path) -> dict:
    try:
        cfg = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing; expected a PEFT adapter directory") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: unreadable: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{where}: peft_type {kind!r} is not supported (only LORA)")
    if cfg.get("fan_in_fan_out"):
        raise CheckpointError(f"{where}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{where}: DoRA adapters are not supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise CheckpointError(f"{where}: {key} must be a positive number, got {cfg.get(key)!r}")
    return cfg


def _pattern(patterns: dict, module: str):
    """PEFT's lookup: the first key that is the module name or a suffix of it."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return None


def _scale(cfg: dict, module: str, rank: int, where: Path) -> float:
    r = _pattern(cfg.get("rank_pattern"), module) or cfg["r"]
    alpha = _pattern(cfg.get("alpha_pattern"), module) or cfg["lora_alpha"]
    if r != rank:
        raise CheckpointError(f"{where}: r is {r} for {module}, its lora_A has {rank} rows")
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
