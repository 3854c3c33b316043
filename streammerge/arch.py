"""Demo model specs for the architectures streammerge is tested on, beyond Llama.

Each ``ArchSpec`` lists its tensors with the names and shapes Hugging Face checkpoints
of that family use, and writes ``config.json`` the way those models ship it:
Mistral (Llama names), Qwen2 (attention biases), Gemma (tied embeddings: no
``lm_head``), Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``) and Mixtral (a router
and ``experts`` per layer). ``demo.write_checkpoint`` writes any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .demo import ModelSpec, llama_config

ARCHS = ("llama", "mistral", "qwen2", "gemma", "phi3", "mixtral")


@dataclass(frozen=True, slots=True)
class ArchSpec(ModelSpec):
    arch: str = "llama"
    experts: int = 0  # mixtral: experts per layer

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, v = self.hidden, self.intermediate, self.vocab
        kv = self.head_dim * self.kv_heads
        q = self.head_dim * self.heads
        out = [("model.embed_tokens.weight", (v, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
            if self.arch == "phi3":
                out += [
                    (p + "self_attn.qkv_proj.weight", (q + 2 * kv, h)),
                    (p + "self_attn.o_proj.weight", (h, q)),
                    (p + "mlp.gate_up_proj.weight", (2 * i, h)),
                    (p + "mlp.down_proj.weight", (h, i)),
                ]
                continue
            out += [
                (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)),
            ]
            if self.arch == "qwen2":
                out += [
                    (p + "self_attn.q_proj.bias", (q,)),
                    (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.bias", (kv,)),
                ]
            if self.arch == "mixtral":
                out.append((p + "block_sparse_moe.gate.weight", (self.experts, h)))
                for e in range(self.experts):
                    x = f"{p}block_sparse_moe.experts.{e}."
                    out += [(x + "w1.weight", (i, h)), (x + "w2.weight", (h, i)), (x + "w3.weight", (i, h))]
            else:
                out += [
                    (p + "mlp.gate_proj.weight", (i, h)),
                    (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i)),
                ]
        out.append(("model.norm.weight", (h,)))
        if self.arch != "gemma":  # Gemma ties lm_head to embed_tokens and does not store it
            out.append(("lm_head.weight", (v, h)))
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self) -> dict:
        base = llama_config(self)
        common = {k: base[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_hidden_layers", "num_key_value_heads", "torch_dtype",
                                       "vocab_size")}  # fmt: skip
        return {
            "llama": lambda: base,
            "mistral": lambda: _mistral(common),
            "qwen2": lambda: _qwen2(common),
            "gemma": lambda: _gemma(common, self.head_dim),
            "phi3": lambda: _phi3(common),
            "mixtral": lambda: _mixtral(common, self.experts),
        }[self.arch]()


def _mistral(c: dict) -> dict:
    return {
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", **c, "initializer_range": 0.02,
        "max_position_embeddings": 32768, "model_type": "mistral", "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "transformers_version": "4.42.0", "use_cache": True,
    }  # fmt: skip


def _qwen2(c: dict) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", **c, "initializer_range": 0.02,
        "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2",
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
        "tie_word_embeddings": False, "transformers_version": "4.43.1", "use_cache": True,
        "use_sliding_window": False,
    }  # fmt: skip


def _gemma(c: dict, head_dim: int) -> dict:
    # Gemma's config.json does not spell out tie_word_embeddings: transformers defaults it to true.
    return {
        "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 2, "eos_token_id": 1, "head_dim": head_dim, "hidden_act": "gelu",
        "hidden_activation": "gelu_pytorch_tanh", **c, "initializer_range": 0.02,
        "max_position_embeddings": 8192, "model_type": "gemma", "pad_token_id": 0,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
        "transformers_version": "4.38.0.dev0", "use_cache": True,
    }  # fmt: skip


def _phi3(c: dict) -> dict:
    return {
        "_name_or_path": "Phi-3-mini-4k-instruct", "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "embd_pdrop": 0.0,
        "eos_token_id": 32000, "hidden_act": "silu", **c, "initializer_range": 0.02,
        "max_position_embeddings": 4096, "model_type": "phi3", "original_max_position_embeddings": 4096,
        "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
        "transformers_version": "4.40.2", "use_cache": True,
    }  # fmt: skip


def _mixtral(c: dict, experts: int) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", **c, "initializer_range": 0.02,
        "max_position_embeddings": 32768, "model_type": "mixtral", "num_experts_per_tok": 2,
        "num_local_experts": experts, "output_router_logits": False, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
        "tie_word_embeddings": False, "transformers_version": "4.36.0.dev0", "use_cache": True,
    }  # fmt: skip


def tiny(arch: str, **overrides) -> ArchSpec:
    """A few-MB model of ``arch`` (Mixtral: 4 experts)."""
    dims = dict(layers=2, hidden=128, intermediate=256, vocab=512, heads=4, kv_heads=2)
    dims.update(overrides)
    return ArchSpec(**dims, arch=arch, experts=4 if arch == "mixtral" else 0)
