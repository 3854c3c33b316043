"""Per-tensor parameter resolution and layer routing: pure functions, hand-derived values."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streammerge.config import parse_config, resolve_all
from streammerge.layers import config_updates, routes, split, stacks
from streammerge.params import Gradient, Level, Rule, Rules, evaluate, interpolate, layer_t, resolve


@pytest.mark.parametrize(
    "values, n_layers, expected",
    [
        # 3 anchors over 5 layers: t = j/4, s = t*2 -> 0, 0.5, 1, 1.5, 2
        ([0, 10, 30], 5, [0.0, 5.0, 10.0, 20.0, 30.0]),
        # 2 anchors over 3 layers: t = 0, 0.5, 1
        ([1, 0], 3, [1.0, 0.5, 0.0]),
        # 5 anchors over 5 layers: each layer sits on an anchor
        ([0.1, 0.3, 0.2, 0.8, 1.0], 5, [0.1, 0.3, 0.2, 0.8, 1.0]),
        # a single anchor is a constant
        ([0.7], 4, [0.7] * 4),
        # booleans step, v[int(t * (n - 1))]: only t = 1 reaches the last value
        ([True, False], 4, [True, True, True, False]),
        ([False, True, False], 5, [False, False, True, True, False]),
    ],
)
def test_gradient_over_layers(values, n_layers, expected):
    got = [interpolate(values, layer_t(j, n_layers)) for j in range(n_layers)]
    assert got == expected


def test_gradient_between_anchors_is_mergekits_float64_formula():
    # t = 1/3 over [0.2, 0.5]: s = 1/3, f = 1/3 -> (1 - 1/3) * 0.2 + 1/3 * 0.5 = 0.30000000000000004
    assert interpolate([0.2, 0.5], 1 / 3) == 0.30000000000000004
    # 5 anchors over 40 layers sit at layers 0, 9.75, 19.5, 29.25, 39: layer 10 (t = 10/39,
    # s = 40/39) is 1/39 of the way from anchor 1 (value 1) to anchor 2 (value 0)
    assert interpolate([0, 1, 0, 1, 0], layer_t(10, 40)) == pytest.approx(1 - (40 / 39 - 1), abs=1e-15)


def test_one_layer_slice_gets_t_1_and_non_layer_tensors_t_0():
    assert layer_t(0, 1) == 1.0
    assert evaluate(Gradient((0.2, 0.5, 1.0)), "lm_head.weight", 0.0) == 0.2


RULES = Rules((Rule("q_proj", 0.1), Rule("self_attn", Gradient((0.0, 1.0))), Rule("*", 0.5)))


@pytest.mark.parametrize(
    "tensor, t, expected",
    [
        ("model.layers.0.self_attn.q_proj.weight", 1.0, 0.1),  # first match wins
        ("model.layers.0.self_attn.k_proj.weight", 0.25, 0.25),  # a gradient inside a filter
        ("model.layers.0.mlp.up_proj.weight", 0.25, 0.5),  # "*" catches the rest
    ],
)
def test_filter_lists(tensor, t, expected):
    assert evaluate(RULES, tensor, t) == expected


def test_filters_are_substrings_not_globs_and_can_miss():
    rules = Rules((Rule("layers.1.", 1.0), Rule("mlp.*", 2.0)))
    assert evaluate(rules, "model.layers.1.mlp.up_proj.weight", 0) == 1.0
    assert evaluate(rules, "model.layers.10.mlp.up_proj.weight", 0) is None  # neither matches
    assert evaluate(Rules((Rule(None, 3.0),)), "anything", 0) == 3.0


def test_resolve_takes_the_first_level_that_yields_a_value():
    levels = [
        Level("models[0].parameters", {"weight": Rules((Rule("mlp", 0.9),))}),
        Level("slices[0].parameters", {"weight": 0.3}),
        Level("parameters", {"weight": 0.1, "lambda": 2.0}),
    ]
    assert resolve("weight", levels, "model.layers.0.mlp.up_proj.weight", 0) == (
        0.9,
        "models[0].parameters.weight",
    )
    assert resolve("weight", levels, "model.norm.weight", 0) == (0.3, "slices[0].parameters.weight")
    assert resolve("lambda", levels, "model.norm.weight", 0) == (2.0, "parameters.lambda")
    assert resolve("density", levels, "model.norm.weight", 0) is None


def test_resolve_all_per_model_uses_input_names_and_exempts_the_base():
    cfg = parse_config(
        "merge_method: ties\nbase_model: b\nslices:\n"
        "  - sources:\n"
        "      - {model: b, layer_range: [2, 4]}\n"
        "      - {model: a, layer_range: [0, 2], parameters: {density: [{filter: layers.0., value: 0.2}]}}\n"
        "parameters: {weight: [0, 1], density: 0.7, lambda: [1, 3]}\n"
    )
    sl = cfg.slices[0]
    # output layer 1 of a 2-layer slice: t = 1; it reads b's layer 3 and a's layer 1
    shared, inputs = resolve_all(cfg, sl, "model.layers.1.mlp.weight", 1.0,
                                 ["model.layers.3.mlp.weight", "model.layers.1.mlp.weight"])  # fmt: skip
    assert shared["lambda"] == (3.0, "parameters.lambda")
    assert inputs[0] == {}  # the base gets no weight or density (mergekit 0.1.5)
    assert inputs[1]["weight"] == (1.0, "parameters.weight")
    assert inputs[1]["density"] == (0.7, "parameters.density")  # its filter misses layers.1.
    _, inputs = resolve_all(cfg, sl, "model.layers.0.mlp.weight", 0.0,
                            ["model.layers.2.mlp.weight", "model.layers.0.mlp.weight"])  # fmt: skip
    assert inputs[1]["density"] == (0.2, "slices[0].sources[1].parameters.density")


NAMES = ["model.embed_tokens.weight"] + [
    f"model.layers.{i}.{s}" for i in range(4) for s in ("mlp.w.weight", "norm.weight")
] + ["model.norm.weight", "lm_head.weight"]  # fmt: skip


def test_layer_names():
    assert split("model.layers.12.mlp.experts.3.w1.weight") == (
        "model.layers.",
        12,
        "mlp.experts.3.w1.weight",
    )
    assert split("transformer.h.0.attn.c_attn.weight") == ("transformer.h.", 0, "attn.c_attn.weight")
    assert split("lm_head.weight") is None
    assert stacks(NAMES) == {"model.layers.": 4}


def test_frankenmerge_routes_renumber_layers_and_place_non_layer_tensors():
    cfg = parse_config(
        "merge_method: passthrough\nslices:\n"
        "  - sources: [{model: x, layer_range: [0, 3]}]\n"
        "  - sources: [{model: y, layer_range: [1, 4]}]\n"
    )
    r = routes(cfg, {"x": NAMES, "y": NAMES})
    assert r.problems == ()
    got = [(x.name, x.slice, x.inputs[0], x.t) for x in r.routes]
    assert got[0] == ("model.embed_tokens.weight", 0, "model.embed_tokens.weight", 0.0)  # first slice
    assert got[-2:] == [
        ("model.norm.weight", 1, "model.norm.weight", 0.0),
        ("lm_head.weight", 1, "lm_head.weight", 0.0),
    ]
    layer_w = [(n, i, t) for n, _, i, t in got if n.endswith("mlp.w.weight")]
    assert layer_w == [
        ("model.layers.0.mlp.w.weight", "model.layers.0.mlp.w.weight", 0.0),
        ("model.layers.1.mlp.w.weight", "model.layers.1.mlp.w.weight", 0.5),
        ("model.layers.2.mlp.w.weight", "model.layers.2.mlp.w.weight", 1.0),
        ("model.layers.3.mlp.w.weight", "model.layers.1.mlp.w.weight", 0.0),  # slice 2 restarts t
        ("model.layers.4.mlp.w.weight", "model.layers.2.mlp.w.weight", 0.5),
        ("model.layers.5.mlp.w.weight", "model.layers.3.mlp.w.weight", 1.0),
    ]
    assert r.layer_sources == (0, 1, 2, 1, 2, 3)
    donor = {"num_hidden_layers": 4, "layer_types": ["full", "sliding", "full", "sliding"], "hidden_size": 8}
    assert config_updates(donor, r.layer_sources) == {
        "num_hidden_layers": 6,
        "layer_types": ["full", "sliding", "full", "sliding", "full", "sliding"],
    }


def test_layer_range_past_the_end_is_reported_with_its_key_path():
    cfg = parse_config("merge_method: passthrough\nslices:\n  - sources: [{model: x, layer_range: [2, 5]}]\n")
    assert routes(cfg, {"x": NAMES}).problems == (
        "slices[0].sources[0].layer_range: [2, 5] reaches past the last layer of x, which has 4 layers (0 to 3)",
    )


def test_planning_a_frankenmerge_with_gradients_and_filters_never_imports_torch(tmp_path):
    from streammerge.demo import make_demo_models

    make_demo_models(tmp_path / "demo-out")
    probe = textwrap.dedent("""
        import sys, streammerge
        plan = streammerge.plan(sys.argv[1], max_memory=64 << 20)
        assert "torch" not in sys.modules, "planning imported torch"
        print(len(plan.jobs))
    """)
    for config in ("slices_passthrough_overlap.yml", "filter_slerp_attn_mlp.yml"):
        path = Path(__file__).parent / "configs" / config
        r = subprocess.run(
            [sys.executable, "-c", probe, str(path)], cwd=tmp_path, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
