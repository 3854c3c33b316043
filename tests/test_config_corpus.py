"""The config corpus: every tests/configs/*.yml plans and merges end to end on the demo
checkpoints, its output checked (names, shapes, dtypes, config.json, and the values of
chosen tensors against a hand-derived computation); every tests/configs/invalid/*.yml
fails with exactly the ``# expect:`` lines it lists, exit 2, and no output.

Expected values: each check names the output tensor, the input tensors it must come from
(the layer renumbering, by hand) and the parameters it must get (the precedence, filter
and gradient arithmetic, by hand, derivation in the comment), then runs the method kernel
on those inputs (``execute.merge_tensors``, itself checked against mergekit in
test_methods and ``make parity``) or plain arithmetic.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import streammerge
from streammerge.demo import TINY, make_demo_models, write_checkpoint
from streammerge.execute import merge_tensors

HERE = Path(__file__).parent / "configs"
VALID = sorted(p for p in HERE.glob("*.yml") if not p.name.startswith("io_"))  # io_*: test_io_configs
INVALID = sorted((HERE / "invalid").glob("*.yml"))
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SUFFIXES = [name.split(".", 3)[3] for name, _ in TINY.tensors() if name.startswith("model.layers.0.")]
L = "model.layers.{}."  # L.format(i) + suffix


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """demo-out/models/{base,ft1,ft2} as `make demo` writes them, plus odd models for the
    invalid corpus: another architecture, a shallower model, a wider MLP, a missing tensor."""
    root = tmp_path_factory.mktemp("corpus")
    models = root / "demo-out" / "models"
    make_demo_models(root / "demo-out")
    d = write_checkpoint(models / "mistral", TINY, model_seed=4)  # Mistral shares Llama's names
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(
        json.dumps(cfg | {"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    )
    write_checkpoint(models / "shallow", replace(TINY, layers=2), model_seed=5)
    write_checkpoint(models / "wide", replace(TINY, intermediate=700), model_seed=6)
    d = write_checkpoint(models / "lacking", TINY, model_seed=7, n_shards=1)
    tensors = safetensors.torch.load_file(d / "model.safetensors")
    del tensors["model.layers.2.self_attn.q_proj.weight"]
    safetensors.torch.save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return root


def test_corpus_size():
    assert len(VALID) >= 30 and len(INVALID) >= 15
    text = "".join(p.read_text() for p in VALID)
    for key in (
        "slices:",
        "layer_range",
        "filter:",
        "modules:",
        "base_model:",
        "merge_method:",
        "out_dtype:",
    ):
        assert key in text


# --- valid configs: (output layers, [(output tensor, expected value)]) ----------------------


class E:
    """An expected tensor: ``E("slerp", "base:model.norm.weight", "ft1:...", base=0, t=0.5)``
    runs the kernel on those inputs in the config's working dtype; ``E.copy(src, scale)``
    is a passthrough (``src * scale``)."""

    def __init__(self, method, *inputs, base=None, **params):
        self.method, self.inputs, self.base, self.params = method, inputs, base, params

    @classmethod
    def copy(cls, src, scale=None):
        return cls("passthrough", src, **({"scale": [scale]} if scale is not None else {}))


def gradient(values, t):
    """The anchors' interpolation, written out for the comments below."""
    s = t * (len(values) - 1)
    i0 = int(s)
    f = s - i0
    return (1 - f) * values[i0] + f * values[min(i0 + 1, len(values) - 1)]


EXPECTED = {
    "filter_gradient_layernorm": (4, [
        # layer 3 of 4: t = 1; 'layernorm' matches input_layernorm -> gamma [0, 0.1] -> 0.1
        (L.format(3) + "input_layernorm.weight", E("breadcrumbs", "ft1:" + L.format(3) + "input_layernorm.weight",
         "base:" + L.format(3) + "input_layernorm.weight", base=1, weight=[1.0, None], density=[0.8, None],
         gamma=[0.1, None])),
        # q_proj matches no filter before the catch-all: gamma 0.01
        (L.format(1) + "self_attn.q_proj.weight", E("breadcrumbs", "ft1:" + L.format(1) + "self_attn.q_proj.weight",
         "base:" + L.format(1) + "self_attn.q_proj.weight", base=1, weight=[1.0, None], density=[0.8, None],
         gamma=[0.01, None])),
    ]),
    "filter_linear_weights": (4, [
        (L.format(2) + "self_attn.k_proj.weight", E("linear", "ft1:" + L.format(2) + "self_attn.k_proj.weight",
         "ft2:" + L.format(2) + "self_attn.k_proj.weight", weight=[0.8, 0.2])),
        (L.format(2) + "mlp.up_proj.weight", E("linear", "ft1:" + L.format(2) + "mlp.up_proj.weight",
         "ft2:" + L.format(2) + "mlp.up_proj.weight", weight=[0.2, 0.8])),
        ("model.norm.weight", E("linear", "ft1:model.norm.weight", "ft2:model.norm.weight", weight=[0.5, 0.5])),
    ]),
    "filter_passthrough_scale": (4, [
        (L.format(1) + "self_attn.o_proj.weight", E.copy("ft1:" + L.format(1) + "self_attn.o_proj.weight", 0.5)),
        (L.format(1) + "self_attn.q_proj.weight", E.copy("ft1:" + L.format(1) + "self_attn.q_proj.weight", 1.0)),
    ]),
    "filter_single_conditional": (4, [
        # ft1's {filter: mlp} matches: 0.9; ft2 has no entry: top-level 0.5
        (L.format(0) + "mlp.up_proj.weight", E("task_arithmetic", "ft1:" + L.format(0) + "mlp.up_proj.weight",
         "ft2:" + L.format(0) + "mlp.up_proj.weight", "base:" + L.format(0) + "mlp.up_proj.weight",
         base=2, weight=[0.9, 0.5, None])),
        # no filter matches q_proj: ft1 falls through to the top level too
        (L.format(0) + "self_attn.q_proj.weight", E("task_arithmetic", "ft1:" + L.format(0) + "self_attn.q_proj.weight",
         "ft2:" + L.format(0) + "self_attn.q_proj.weight", "base:" + L.format(0) + "self_attn.q_proj.weight",
         base=2, weight=[0.5, 0.5, None])),
    ]),
    "filter_slerp_attn_mlp": (4, [
        # layer 2 of 4: t = 2/3; 5 anchors: s = 8/3, between anchors 2 (0.7) and 3 (0.3)
        (L.format(2) + "mlp.down_proj.weight", E("slerp", "ft2:" + L.format(2) + "mlp.down_proj.weight",
         "base:" + L.format(2) + "mlp.down_proj.weight", base=1, t=gradient([1, 0.5, 0.7, 0.3, 0], 2 / 3))),
        (L.format(2) + "self_attn.v_proj.weight", E("slerp", "ft2:" + L.format(2) + "self_attn.v_proj.weight",
         "base:" + L.format(2) + "self_attn.v_proj.weight", base=1, t=gradient([0, 0.5, 0.3, 0.7, 1], 2 / 3))),
        ("lm_head.weight", E("slerp", "ft2:lm_head.weight", "base:lm_head.weight", base=1, t=0.5)),  # catch-all
    ]),
    "filter_star_first_match": (4, [
        # q_proj matches 'q_proj' first (0.1), v_proj 'self_attn' (0.9); ft2 0.5; no normalize
        (L.format(0) + "self_attn.q_proj.weight", E("linear", "ft1:" + L.format(0) + "self_attn.q_proj.weight",
         "ft2:" + L.format(0) + "self_attn.q_proj.weight", weight=[0.1, 0.5], normalize=False)),
        (L.format(0) + "self_attn.v_proj.weight", E("linear", "ft1:" + L.format(0) + "self_attn.v_proj.weight",
         "ft2:" + L.format(0) + "self_attn.v_proj.weight", weight=[0.9, 0.5], normalize=False)),
        ("model.embed_tokens.weight", E("linear", "ft1:model.embed_tokens.weight", "ft2:model.embed_tokens.weight",
         weight=[0.5, 0.5], normalize=False)),
    ]),
    "filter_ram_epsilon": (4, [
        ("model.embed_tokens.weight", E("ram", "ft1:model.embed_tokens.weight", "ft2:model.embed_tokens.weight",
         "base:model.embed_tokens.weight", base=2, epsilon=0.001)),
        (L.format(1) + "mlp.gate_proj.weight", E("ram", "ft1:" + L.format(1) + "mlp.gate_proj.weight",
         "ft2:" + L.format(1) + "mlp.gate_proj.weight", "base:" + L.format(1) + "mlp.gate_proj.weight",
         base=2, epsilon=1e-5)),
    ]),
    "grad_bool_step": (4, [
        # [true, false] as a step: v[int(t)], false only at t = 1 (layer 3)
        (L.format(3) + "mlp.up_proj.weight", E("linear", "ft1:" + L.format(3) + "mlp.up_proj.weight",
         "ft2:" + L.format(3) + "mlp.up_proj.weight", weight=[0.6, 0.6], normalize=False)),
        (L.format(2) + "mlp.up_proj.weight", E("linear", "ft1:" + L.format(2) + "mlp.up_proj.weight",
         "ft2:" + L.format(2) + "mlp.up_proj.weight", weight=[0.6, 0.6], normalize=True)),
    ]),
    "grad_lambda_shared": (4, [
        # layer 1 of 4: t = 1/3 -> lambda = 2/3 * 0.5 + 1/3 * 1.5
        (L.format(1) + "self_attn.q_proj.weight", E("task_arithmetic", "ft1:" + L.format(1) + "self_attn.q_proj.weight",
         "base:" + L.format(1) + "self_attn.q_proj.weight", base=1, weight=[1.0, None],
         **{"lambda": (1 - 1 / 3) * 0.5 + 1 / 3 * 1.5})),
    ]),
    "grad_linear_crossfade": (4, [
        # layer 1 of 4: t = 1/3 -> ft1 1 - 1/3, ft2 1/3
        (L.format(1) + "mlp.gate_proj.weight", E("linear", "ft1:" + L.format(1) + "mlp.gate_proj.weight",
         "ft2:" + L.format(1) + "mlp.gate_proj.weight", weight=[1 - 1 / 3, 1 / 3])),
        # lm_head: t = 0 -> weights 1 and 0: exactly ft1's
        ("lm_head.weight", E.copy("ft1:lm_head.weight")),
    ]),
    "grad_nearswap_t": (4, [
        (L.format(3) + "mlp.gate_proj.weight", E("nearswap", "ft1:" + L.format(3) + "mlp.gate_proj.weight",
         "base:" + L.format(3) + "mlp.gate_proj.weight", base=1, t=0.005)),  # t = 1: last anchor
        ("model.norm.weight", E("nearswap", "ft1:model.norm.weight", "base:model.norm.weight", base=1, t=0.0005)),
    ]),
    "grad_nuslerp_weight": (4, [
        (L.format(0) + "mlp.down_proj.weight", E("nuslerp", "ft1:" + L.format(0) + "mlp.down_proj.weight",
         "ft2:" + L.format(0) + "mlp.down_proj.weight", "base:" + L.format(0) + "mlp.down_proj.weight",
         base=2, weight=[3.0, 1.0, None])),  # t = 0: first anchors
        (L.format(3) + "mlp.down_proj.weight", E("nuslerp", "ft1:" + L.format(3) + "mlp.down_proj.weight",
         "ft2:" + L.format(3) + "mlp.down_proj.weight", "base:" + L.format(3) + "mlp.down_proj.weight",
         base=2, weight=[1.0, 3.0, None])),  # t = 1: last anchors
    ]),
    "grad_single_anchor": (4, [
        ("model.norm.weight", E("linear", "ft1:model.norm.weight", "ft2:model.norm.weight", weight=[0.7, 0.3])),
    ]),
    "grad_slerp_t": (4, [
        ("lm_head.weight", E("slerp", "ft1:lm_head.weight", "base:lm_head.weight", base=1, t=0.2)),  # t = 0
        # layer 1 of 4: t = 1/3, s = 2/3 between anchors 0.2 and 0.5
        (L.format(1) + "self_attn.o_proj.weight", E("slerp", "ft1:" + L.format(1) + "self_attn.o_proj.weight",
         "base:" + L.format(1) + "self_attn.o_proj.weight", base=1, t=(1 - 2 / 3) * 0.2 + 2 / 3 * 0.5)),
    ]),
    "grad_ta_five_anchors": (4, [
        # layer 1 of 4: t = 1/3, s = 4/3 between anchors 1 (0.3) and 2 (0.2)
        (L.format(1) + "self_attn.v_proj.weight", E("task_arithmetic", "ft1:" + L.format(1) + "self_attn.v_proj.weight",
         "ft2:" + L.format(1) + "self_attn.v_proj.weight", "base:" + L.format(1) + "self_attn.v_proj.weight",
         base=2, weight=[gradient([0.1, 0.3, 0.2, 0.8, 1.0], 1 / 3), 0.5, None])),
    ]),
    "grad_ties_density": (4, [
        (L.format(3) + "mlp.up_proj.weight", E("ties", "ft1:" + L.format(3) + "mlp.up_proj.weight",
         "ft2:" + L.format(3) + "mlp.up_proj.weight", "base:" + L.format(3) + "mlp.up_proj.weight",
         base=2, weight=[1.0, 1.0, None], density=[0.8, 0.5, None])),  # t = 1
        ("model.embed_tokens.weight", E("ties", "ft1:model.embed_tokens.weight", "ft2:model.embed_tokens.weight",
         "base:model.embed_tokens.weight", base=2, weight=[1.0, 1.0, None], density=[0.2, 0.5, None])),  # t = 0
    ]),
    "modules_default_models": (4, [
        (L.format(2) + "self_attn.q_proj.weight", E("linear", "ft1:" + L.format(2) + "self_attn.q_proj.weight",
         "ft2:" + L.format(2) + "self_attn.q_proj.weight", weight=[0.75, 0.25])),  # module beats top
    ]),
    "modules_default_slices": (4, [
        # output layer 1 = ft2 layer 1, output layer 2 = ft1 layer 1: 'layers.1.' in the input name
        (L.format(1) + "self_attn.q_proj.weight", E.copy("ft2:" + L.format(1) + "self_attn.q_proj.weight", 0.5)),
        (L.format(2) + "self_attn.q_proj.weight", E.copy("ft1:" + L.format(1) + "self_attn.q_proj.weight", 0.5)),
        (L.format(3) + "self_attn.q_proj.weight", E.copy("ft1:" + L.format(2) + "self_attn.q_proj.weight")),
        ("model.embed_tokens.weight", E.copy("ft2:model.embed_tokens.weight")),  # first slice
        ("lm_head.weight", E.copy("ft1:lm_head.weight")),  # last slice
    ]),
    "slices_as_models": (4, [
        (L.format(3) + "mlp.down_proj.weight", E("linear", "ft1:" + L.format(3) + "mlp.down_proj.weight",
         "ft2:" + L.format(3) + "mlp.down_proj.weight", "base:" + L.format(3) + "mlp.down_proj.weight",
         weight=[0.5, 0.3, 0.2])),
    ]),
    "slices_base_per_slice": (4, [
        # slice 1's base is ft2: task vector of ft1 against ft2
        (L.format(3) + "mlp.up_proj.weight", E("task_arithmetic", "ft2:" + L.format(3) + "mlp.up_proj.weight",
         "ft1:" + L.format(3) + "mlp.up_proj.weight", base=0, weight=[None, 0.7])),
        ("lm_head.weight", E("task_arithmetic", "ft2:lm_head.weight", "ft1:lm_head.weight", base=0,
         weight=[None, 0.7])),
        ("model.embed_tokens.weight", E("task_arithmetic", "base:model.embed_tokens.weight",
         "ft1:model.embed_tokens.weight", base=0, weight=[None, 0.7])),
    ]),
    "slices_dare_ties_filter": (4, [
        (L.format(1) + "self_attn.q_proj.weight", E("dare_ties", "base:" + L.format(1) + "self_attn.q_proj.weight",
         "ft1:" + L.format(1) + "self_attn.q_proj.weight", "ft2:" + L.format(1) + "self_attn.q_proj.weight",
         base=0, weight=[None, 1.0, 0.5], density=[None, 0.3, 0.5])),
        (L.format(1) + "mlp.up_proj.weight", E("dare_ties", "base:" + L.format(1) + "mlp.up_proj.weight",
         "ft1:" + L.format(1) + "mlp.up_proj.weight", "ft2:" + L.format(1) + "mlp.up_proj.weight",
         base=0, weight=[None, 1.0, 0.5], density=[None, 0.9, 0.5])),
    ]),
    "slices_linear_slice_params": (4, [
        (L.format(1) + "mlp.up_proj.weight", E("linear", "ft1:" + L.format(1) + "mlp.up_proj.weight",
         "ft2:" + L.format(1) + "mlp.up_proj.weight", weight=[0.5, 0.5])),
        # slice 1: ft1 0.25 (its own entry), ft2 0.75 (the slice)
        (L.format(3) + "mlp.up_proj.weight", E("linear", "ft1:" + L.format(3) + "mlp.up_proj.weight",
         "ft2:" + L.format(3) + "mlp.up_proj.weight", weight=[0.25, 0.75])),
        ("lm_head.weight", E("linear", "ft1:lm_head.weight", "ft2:lm_head.weight", weight=[0.25, 0.75])),
    ]),
    "slices_model_stock": (5, [
        # output layers 0-2 = inputs 0-2, 3-4 = inputs 2-3
        (L.format(3) + "self_attn.o_proj.weight", E("model_stock", "ft1:" + L.format(2) + "self_attn.o_proj.weight",
         "ft2:" + L.format(2) + "self_attn.o_proj.weight", "base:" + L.format(2) + "self_attn.o_proj.weight",
         base=2)),
    ]),
    "slices_one_layer_t": (2, [
        # one-layer slices: t = 1 -> ft1 0.3 (last anchor), ft2 0.5 (top); output layer 1 = input 3
        (L.format(1) + "mlp.gate_proj.weight", E("linear", "ft1:" + L.format(3) + "mlp.gate_proj.weight",
         "ft2:" + L.format(3) + "mlp.gate_proj.weight", weight=[0.3, 0.5])),
        ("lm_head.weight", E("linear", "ft1:lm_head.weight", "ft2:lm_head.weight", weight=[0.9, 0.5])),  # t = 0
    ]),
    "slices_out_dtype": (4, [
        # base 0 | ft1 1, 2 | ft2 1; read as float32, written as float16
        (L.format(3) + "self_attn.k_proj.weight", E.copy("ft2:" + L.format(1) + "self_attn.k_proj.weight")),
        (L.format(0) + "self_attn.k_proj.weight", E.copy("base:" + L.format(0) + "self_attn.k_proj.weight")),
    ]),
    "slices_passthrough_frankenmerge": (6, [
        (L.format(2) + "mlp.down_proj.weight", E.copy("ft1:" + L.format(2) + "mlp.down_proj.weight")),
        (L.format(3) + "mlp.down_proj.weight", E.copy("ft2:" + L.format(1) + "mlp.down_proj.weight")),
        ("model.embed_tokens.weight", E.copy("ft1:model.embed_tokens.weight")),
        ("model.norm.weight", E.copy("ft2:model.norm.weight")),
        ("lm_head.weight", E.copy("ft2:lm_head.weight")),
    ]),
    "slices_passthrough_overlap": (6, [
        (L.format(4) + "self_attn.o_proj.weight", E.copy("ft2:" + L.format(2) + "self_attn.o_proj.weight", 0.5)),
        (L.format(4) + "self_attn.q_proj.weight", E.copy("ft2:" + L.format(2) + "self_attn.q_proj.weight", 1.0)),
        (L.format(2) + "self_attn.o_proj.weight", E.copy("ft1:" + L.format(2) + "self_attn.o_proj.weight")),
    ]),
    "slices_passthrough_repeat": (6, [
        (L.format(2) + "self_attn.q_proj.weight", E.copy("base:" + L.format(0) + "self_attn.q_proj.weight")),
        (L.format(5) + "post_attention_layernorm.weight", E.copy("base:" + L.format(3) + "post_attention_layernorm.weight")),
    ]),
    "slices_per_slice_method": (4, [
        (L.format(1) + "mlp.up_proj.weight", E.copy("ft1:" + L.format(1) + "mlp.up_proj.weight")),
        (L.format(2) + "mlp.up_proj.weight", E("slerp", "base:" + L.format(2) + "mlp.up_proj.weight",
         "ft2:" + L.format(2) + "mlp.up_proj.weight", base=0, t=0.4)),
        ("model.embed_tokens.weight", E.copy("ft1:model.embed_tokens.weight")),
        ("lm_head.weight", E("slerp", "base:lm_head.weight", "ft2:lm_head.weight", base=0, t=0.4)),
    ]),
    "slices_precedence": (4, [
        ("model.norm.weight", E("linear", "ft1:model.norm.weight", "ft2:model.norm.weight", "base:model.norm.weight",
         weight=[0.6, 0.1, 0.1])),
        (L.format(1) + "mlp.up_proj.weight", E("linear", "ft1:" + L.format(1) + "mlp.up_proj.weight",
         "ft2:" + L.format(1) + "mlp.up_proj.weight", "base:" + L.format(1) + "mlp.up_proj.weight",
         weight=[0.6, 0.3, 0.3])),
    ]),
    "slices_slerp_gradient_restarts": (5, [
        # outputs: (input layer, t) = (0, 0) (1, 1) | (1, 0) (2, 0.5) (3, 1)
        (L.format(1) + "self_attn.k_proj.weight", E("slerp", "base:" + L.format(1) + "self_attn.k_proj.weight",
         "ft1:" + L.format(1) + "self_attn.k_proj.weight", base=0, t=1.0)),
        (L.format(3) + "self_attn.k_proj.weight", E("slerp", "base:" + L.format(2) + "self_attn.k_proj.weight",
         "ft1:" + L.format(2) + "self_attn.k_proj.weight", base=0, t=0.5)),
    ]),
    "slices_zero_length_last": (4, [
        (L.format(3) + "mlp.up_proj.weight", E.copy("ft1:" + L.format(3) + "mlp.up_proj.weight")),
        ("model.norm.weight", E.copy("ft2:model.norm.weight")),
        ("lm_head.weight", E.copy("ft2:lm_head.weight")),
        ("model.embed_tokens.weight", E.copy("ft1:model.embed_tokens.weight")),
    ]),
    "top_level_weight": (4, [
        (L.format(0) + "mlp.up_proj.weight", E("linear", "ft1:" + L.format(0) + "mlp.up_proj.weight",
         "ft2:" + L.format(0) + "mlp.up_proj.weight", "base:" + L.format(0) + "mlp.up_proj.weight",
         weight=[1.0, 1.0, 1.0])),
    ]),
}  # fmt: skip


def _load(root: Path, ref: str) -> torch.Tensor:
    model, name = ref.split(":")
    d = root / "demo-out" / "models" / model
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            if name in st.keys():
                return st.get_tensor(name)
    raise KeyError(ref)


def _expected(e: E, root: Path, work: torch.dtype, out: torch.dtype, name: str) -> torch.Tensor:
    xs = [_load(root, ref).to(work) for ref in e.inputs]
    return merge_tensors(e.method, xs, base_index=e.base, name=name, **e.params).to(out)


def test_every_valid_config_has_expectations():
    assert sorted(EXPECTED) == sorted(p.stem for p in VALID)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_config_merges_as_computed_by_hand(path, root, tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(root)  # configs use demo-out/models/... relative paths
    n_layers, checks = EXPECTED[path.stem]
    plan = streammerge.plan(path, max_memory=64 << 20)
    out = tmp_path / "out"
    streammerge.merge(path, out, max_memory=64 << 20)
    doc = yaml.safe_load(path.read_text())
    work = DTYPES.get(doc.get("dtype"), torch.bfloat16)  # the demo models are bf16
    out_dtype = DTYPES.get(doc.get("out_dtype"), work)

    got = safetensors.torch.load_file(out / "model.safetensors")
    base = safetensors.torch.load_file(root / "demo-out/models/base/model-00001-of-00002.safetensors")
    base |= safetensors.torch.load_file(root / "demo-out/models/base/model-00002-of-00002.safetensors")
    layers = {f"model.layers.{i}.{s}": base[f"model.layers.{min(i, 3)}.{s}"].shape
              for i in range(n_layers) for s in SUFFIXES}  # fmt: skip
    want = {
        n: base[n].shape for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    } | layers
    assert {n: t.shape for n, t in got.items()} == want
    assert {t.dtype for t in got.values()} == {out_dtype}
    assert len(plan.jobs) == len(want)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == n_layers
    assert config["torch_dtype"] == {v: k for k, v in DTYPES.items()}[out_dtype]
    for name, e in checks:
        expected = _expected(e, root, work, out_dtype, name)
        differing = int((got[name].view(torch.int16 if out_dtype != torch.float32 else torch.int32)
                         != expected.view(torch.int16 if out_dtype != torch.float32 else torch.int32)).sum())  # fmt: skip
        assert differing == 0, f"{name}: {differing} of {expected.numel()} elements differ"


# --- invalid configs: the exact lines, exit 2, nothing written ------------------------------


def _expect(path: Path) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^# expect: (.*)$", path.read_text(), re.M)]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_config_fails_with_one_line_per_problem(path, root, tmp_path, monkeypatch, cli):
    monkeypatch.chdir(root)
    lines = [line.replace("{cfg}", str(path)) for line in _expect(path)]
    assert lines, f"{path.name} lists no '# expect:' line"
    for args in (("plan", path), ("merge", path, tmp_path / "out", "--no-progress")):
        r = cli(*args)
        assert (r.exit_code, r.stdout) == (2, "")
        assert r.stderr.splitlines() == [f"error: {line}" for line in lines]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
