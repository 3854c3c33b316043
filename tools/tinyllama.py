"""A small Llama in plain torch for tools/capability.py: train, greedy-evaluate, save, load.

Module and parameter names follow Hugging Face's LlamaForCausalLM, so ``state_dict()``
holds exactly ``model.embed_tokens.weight``, ``model.layers.N.self_attn.{q,k,v,o}_proj.weight``,
``model.layers.N.mlp.{gate,up,down}_proj.weight``, the two RMSNorm weights per layer,
``model.norm.weight`` and ``lm_head.weight``; with the ``config.json`` written beside it,
the checkpoint is what streammerge (or transformers) sees for a real Llama.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from skills import BOS, EOS, MAX_ANSWER, PAD, VOCAB_SIZE, encode, held_out, sample
from torch import nn


@dataclass(frozen=True, slots=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int = VOCAB_SIZE
    rope_theta: float = 10000.0

    def config_json(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
            "pad_token_id": PAD,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 64,
            "model_type": "llama",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.heads,
            "rms_norm_eps": 1e-05,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "vocab_size": self.vocab,
        }


class Attention(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.heads, self.head_dim = s.heads, s.hidden // s.heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(s.hidden, s.hidden, bias=False) for _ in range(4)
        )

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = (
            p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(s.hidden, eps=1e-5)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = nn.RMSNorm(s.hidden, eps=1e-5)
        self.mlp = MLP(s)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.layers))
        self.norm = nn.RMSNorm(s.hidden, eps=1e-5)


class TinyLlama(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.shape = s
        self.model = Body(s)
        self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(
                    p, std=0.02 / (math.sqrt(2 * s.layers) if "o_proj" in name or "down_proj" in name else 1)
                )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(batch, time) token ids -> (batch, time, vocab) logits."""
        t = ids.shape[1]
        hd = self.shape.hidden // self.shape.heads
        inv = 1.0 / self.shape.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        ang = torch.outer(torch.arange(t, dtype=torch.float32), inv)
        ang = torch.cat([ang, ang], dim=-1)  # (time, head_dim), Hugging Face's rotate_half layout
        cos, sin = ang.cos(), ang.sin()
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def batch(examples: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and next-token targets; only answer tokens (and EOS) are scored."""
    rows = [([BOS, *encode(p)], [*encode(a), EOS]) for p, a in examples]
    t = max(len(p) + len(a) for p, a in rows) - 1
    ids = torch.full((len(rows), t), PAD, dtype=torch.long)
    tgt = torch.full((len(rows), t), -100, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        seq = p + a
        ids[i, : len(seq) - 1] = torch.tensor(seq[:-1])
        tgt[i, len(p) - 1 : len(seq) - 1] = torch.tensor(a)
    return ids, tgt


def train(
    model: TinyLlama,
    mixture: dict[tuple[str, bool], float],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    warmup: int = 0,
) -> list[float]:
    """AdamW on batches drawn from ``mixture`` ((skill, easy) -> weight), cosine decay; returns
    the loss every 50 steps. Deterministic for a given seed and thread count."""
    rng = random.Random(f"train/{seed}")
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    names, weights = list(mixture), list(mixture.values())
    losses = []
    model.train()
    for step in range(steps):
        frac = min(1.0, (step + 1) / warmup) if warmup else 1.0
        for g in opt.param_groups:
            g["lr"] = lr * frac * 0.5 * (1 + math.cos(math.pi * step / steps))
        picks = rng.choices(names, weights, k=batch_size)
        ex = [sample(skill, "train", rng, easy) for skill, easy in picks]
        ids, tgt = batch(ex)
        loss = F.cross_entropy(model(ids).flatten(0, 1), tgt.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: TinyLlama, examples: list[tuple[str, str]], batch_size: int = 256) -> float:
    """Exact-match accuracy of greedy decoding (answer then EOS)."""
    model.eval()
    right = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [[BOS, *encode(p)] for p, _ in chunk]
        n = len(chunk)
        seq = torch.full((n, max(map(len, prompts)) + MAX_ANSWER), PAD, dtype=torch.long)
        for j, p in enumerate(prompts):
            seq[j, : len(p)] = torch.tensor(p)
        pos = torch.tensor([len(p) - 1 for p in prompts])
        rows = torch.arange(n)
        for _ in range(MAX_ANSWER):
            # Causal attention: the pads after each row's position do not change its logits.
            nxt = model(seq[:, : int(pos.max()) + 1])[rows, pos].argmax(-1)
            pos = pos + 1
            seq[rows, pos] = nxt
        for j, (_, a) in enumerate(chunk):
            out = seq[j, len(prompts[j]) :].tolist()
            want = [*encode(a), EOS]
            right += out[: len(want)] == want
    return right / len(examples)


def evaluate(model: TinyLlama, skills: list[str], split: str, n: int, seed: int) -> dict[str, float]:
    return {s: accuracy(model, held_out(s, split, n, seed)) for s in skills}


def save(model: TinyLlama, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(model.shape.config_json(), indent=2) + "\n")


def load(directory: Path) -> TinyLlama:
    cfg = json.loads((Path(directory) / "config.json").read_text())
    s = Shape(
        layers=cfg["num_hidden_layers"],
        hidden=cfg["hidden_size"],
        intermediate=cfg["intermediate_size"],
        heads=cfg["num_attention_heads"],
        vocab=cfg["vocab_size"],
        rope_theta=cfg["rope_theta"],
    )
    model = TinyLlama(s)
    state = {k: v.float() for k, v in load_file(Path(directory) / "model.safetensors").items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    return model
