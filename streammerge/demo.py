"""Small deterministic Llama-shaped checkpoints and configs, made locally with numpy.

Used by ``streammerge demo``, the tests, ``tools/make_checkpoints.py`` and the
benchmarks. A fine-tune is the base plus a small seeded delta, so merges have
something real to do. Tensors are generated one at a time (memory is bounded by the
largest tensor), written through ``header.encode_header`` like ``save_file`` would.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .header import ITEMSIZE, encode_header


@dataclass(frozen=True, slots=True)
class ModelSpec:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    dtype: str = "BF16"

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order Hugging Face Llama checkpoints list them."""
        h, i, v = self.hidden, self.intermediate, self.vocab
        kv = h // self.heads * self.kv_heads
        out = [("model.embed_tokens.weight", (v, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
            ]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors()) * ITEMSIZE[self.dtype]

    def config(self) -> dict:
        """config.json as the family ships it (``arch.ArchSpec`` for the others)."""
        return llama_config(self)


TINY = ModelSpec(layers=4, hidden=256, intermediate=688, vocab=1024, heads=4, kv_heads=2)
BENCH = ModelSpec(layers=26, hidden=2048, intermediate=5632, vocab=32000, heads=16, kv_heads=16)
LLAMA_70B = ModelSpec(layers=80, hidden=8192, intermediate=28672, vocab=128256, heads=64, kv_heads=8)


def _values(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    x = rng.standard_normal(math.prod(shape), dtype=np.float32)
    return x


def tensor_values(name: str, shape: tuple[int, ...], model_seed: int | None, delta: float) -> np.ndarray:
    """fp32 values of one tensor: the base's (seed 0), plus a seeded delta for a fine-tune."""
    is_norm = len(shape) == 1
    x = _values(name, shape, 0)
    x *= 0.02
    if is_norm:
        x += 1.0
    if model_seed is not None:
        x += delta * _values(name, shape, model_seed)
    return x


def to_dtype_bytes(x: np.ndarray, dtype: str) -> np.ndarray:
    """fp32 -> the bytes of ``dtype`` (bf16 by round-to-nearest-even, like torch)."""
    if dtype == "F32":
        return x.view(np.uint8)
    if dtype == "F16":
        return x.astype(np.float16).view(np.uint8)
    if dtype == "BF16":
        u = x.view(np.uint32)
        return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16).view(np.uint8)
    raise ValueError(dtype)


def write_checkpoint(
    directory: str | os.PathLike,
    spec: ModelSpec,
    *,
    model_seed: int | None = None,
    delta: float = 0.002,
    n_shards: int = 2,
    sparse: bool = False,
    tokenizer: bool = True,
    added_tokens: tuple[str, ...] = (),
) -> Path:
    """Write a Llama-shaped model. ``sparse``: real headers, data left as holes (for
    planning tests of 70B-class models without 140 GB of disk)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = spec.tensors()
    per_shard = spec.nbytes / n_shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(n_shards)]
    acc = 0
    for name, shape in tensors:
        groups[min(n_shards - 1, int(acc // per_shard))].append((name, shape))
        acc += math.prod(shape) * ITEMSIZE[spec.dtype]
    groups = [g for g in groups if g]
    n = len(groups)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header, infos = encode_header([(nm, spec.dtype, s) for nm, s in group], {"format": "pt"})
        shapes = dict(group)
        with open(d / fname, "wb") as f:
            f.write(header)
            if sparse:
                f.truncate(len(header) + sum(info.nbytes for info in infos.values()))
            else:
                for name in infos:  # file order
                    x = tensor_values(name, shapes[name], model_seed, delta)
                    f.write(to_dtype_bytes(x, spec.dtype).tobytes())
        weight_map.update({name: fname for name in infos})
    if n > 1:
        total = sum(math.prod(s) for _, s in tensors) * ITEMSIZE[spec.dtype]
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (d / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n")
    if tokenizer:
        write_tokenizer(d, spec.vocab, added_tokens)
    return d


def llama_config(spec: ModelSpec) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": 2048,
        "model_type": "llama",
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[spec.dtype],
        "vocab_size": spec.vocab,
    }


def write_tokenizer(d: Path, vocab: int, added: tuple[str, ...] = ()) -> None:
    """A small word-level tokenizer file set (tokenizers' JSON format); ``added`` tokens
    take the last ids, as a fine-tune's new special tokens do."""
    regular = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3 - len(added))]
    words = regular + list(added)
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": w,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, w in enumerate(words)
            if i < 3 or i >= len(regular)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(regular)}, "unk_token": "<unk>"},
    }
    (d / "tokenizer.json").write_text(json.dumps(tok))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048, **special}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


DEMO_MODELS = {"base": None, "ft1": 1, "ft2": 2}

DEMO_CONFIG = """\
# A linear merge of the two demo fine-tunes and their base (see `streammerge demo`).
merge_method: linear
base_model: {root}/models/base
models:
  - model: {root}/models/ft1
    parameters: {{weight: 0.4}}
  - model: {root}/models/ft2
    parameters: {{weight: 0.4}}
  - model: {root}/models/base
    parameters: {{weight: 0.2}}
dtype: bfloat16
"""


def make_demo_models(root: str | os.PathLike, spec: ModelSpec = TINY) -> dict[str, Path]:
    """base, ft1 and ft2 under ``root/models`` (skipped when already there, same spec)."""
    root = Path(root)
    paths = {}
    for name, seed in DEMO_MODELS.items():
        d = root / "models" / name
        stamp = d / ".streammerge-demo.json"
        want = json.dumps({"spec": asdict(spec), "seed": seed})
        if not (stamp.exists() and stamp.read_text() == want):
            write_checkpoint(d, spec, model_seed=seed)
            stamp.write_text(want)
        paths[name] = d
    return paths
