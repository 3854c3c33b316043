"""config: mergekit YAML in, one exact error line per mistake out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streammerge.config import load_config, parse_config, parse_size
from streammerge.errors import ConfigError

GOOD = """\
merge_method: task_arithmetic
base_model: base
models:
  - model: ft1
    parameters: {weight: 0.7}
  - model: ft2
    parameters:
      weight: "1e-5"   # YAML 1.1 reads this as a string; mergekit accepts it, so do we
parameters: {lambda: 0.5}
dtype: torch.bfloat16
out_dtype: float16
"""


def test_good_config_resolves_base_last_and_types():
    cfg = parse_config(GOOD)
    assert [m.model for m in cfg.models] == ["ft1", "ft2", "base"]  # base appended last
    assert cfg.base_index == 2
    assert cfg.models[1].parameters == {"weight": 1e-5}
    assert cfg.parameters == {"lambda": 0.5}
    assert (cfg.dtype, cfg.out_dtype) == ("BF16", "F16")


def test_listed_base_keeps_its_place():
    cfg = parse_config(
        "merge_method: linear\nbase_model: b\nmodels:\n"
        " - {model: a, parameters: {weight: 1}}\n - {model: b, parameters: {weight: 1}}\n"
    )
    assert [m.model for m in cfg.models] == ["a", "b"] and cfg.base_index == 1


LIN = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"


@pytest.mark.parametrize(
    "text, line",
    [
        ("merge_method: lineer\nmodels: [a]\n", "merge_method: unknown merge method 'lineer'; did you mean 'linear'?"),
        (LIN + "base-model: a\n", "base-model: unknown key 'base-model'; did you mean 'base_model'?"),
        ("merge_method: linear\nmodels:\n  - model: a\n    weight: 1\n",
         "models[0].weight: unknown key 'weight'; expected one of: model, parameters"
         " ('weight' belongs under models[0].parameters)"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {wieght: 1}\n",
         "models[0].parameters.wieght: unknown linear parameter 'wieght'; did you mean 'weight'?"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: abc}\n",
         "models[0].parameters.weight: expected a number, got 'abc'"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: []}\n",
         "models[0].parameters.weight: an empty list gives no value; write a number, a gradient or filter entries"),
        (LIN + "parameters: {normalize: 3}\n", "parameters.normalize: expected true or false, got 3"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {normalize: true, weight: 1}\n",
         "models[0].parameters.normalize: 'normalize' is one value per tensor for linear;"
         " set it under top-level parameters"),
        ("merge_method: linear\nmodels:\n  - model: a\n  - model: b\n    parameters: {weight: 1}\n",
         "models[0].parameters.weight: required by linear for a, but not set"),
        ("merge_method: task_arithmetic\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
         "base_model: required by merge_method task_arithmetic, but not set"),
        ("merge_method: passthrough\nmodels: [a, b]\n", "models: passthrough takes at most 1 input model(s), got 2"),
        ("merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\n  - {model: ./a, parameters: {weight: 1}}\n",
         "models[1].model: ./a is listed twice (also models[0].model)"),
        (LIN + "dtype: float8\n", "dtype: unknown dtype 'float8'; did you mean 'float64'?"),
        (LIN + "slices: []\n", "slices: use either models: or slices:, not both"),
        (LIN + "merge_method: ties\n", "not valid YAML at line 5, column 1: duplicate key 'merge_method' (first on line 1)"),
        ("models: [a]\n", "merge_method: required key is missing"),
        ("merge_method: linear\n", "models: required key is missing (a list of {model: PATH})"),
        ("- just\n- a list\n", "expected a mapping of config keys, got a list"),
        ("merge_method: linear\nmodels: [\n", "not valid YAML at line 3, column 1: expected the node content, but found '<stream end>'"),
        ("merge_method: linear\nmodels:\n  - model: a+b+lora\n", "models[0].model: expected MODEL or BASE+ADAPTER (one '+'), got 'a+b+lora'"),
        (LIN + "parameters: {weight: .inf}\n", "parameters.weight: expected a number, got inf"),
        ("merge_method: nuslerp\nmodels:\n  - {model: a, parameters: {weight: 1}}\n  - {model: b, parameters: {weight: 1}}\n"
         "  - {model: c, parameters: {weight: 1}}\n",
         "models: nuslerp merges exactly 2 models besides the base, got 3"),
        ("merge_method: karcher\nmodels: [a, b]\nparameters: {max_iter: 2.5}\n",
         "parameters.max_iter: expected a whole number, got 2.5"),
        ("merge_method: sce\nbase_model: b\nmodels: [a]\nparameters: {select_topk: 1.5}\n",
         "parameters.select_topk: must be <= 1, got 1.5"),
        ("merge_method: ties\nbase_model: b\nmodels: [a]\nparameters: {sign_election: paper}\n",
         "parameters.sign_election: expected one of weighted, unweighted, got 'paper'"),
        ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 1.5}\n",
         "models[0].parameters.density: must be <= 1, got 1.5"),
        ("merge_method: slerp\nbase_model: b\nmodels: [a]\nparameters: {t: -0.2}\n",
         "parameters.t: must be >= 0, got -0.2"),
        ("merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
         "base_model: required by merge_method ties, but not set"),
        ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, t: 0.5}\n",
         "models[0].parameters.t: unknown ties parameter 't'; expected one of: weight, normalize, lambda,"
         " int8_mask, density, rescale, rescale_mode, sign_election"),
        ("merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 0.5}\n",
         "models[0].parameters.density: unknown task_arithmetic parameter 'density'; expected one of:"
         " weight, normalize, lambda, int8_mask"),
        ("merge_method: della\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 0.5}\n"
         "parameters: {epsilon: 0.6}\n",
         "parameters.epsilon: della needs 0 < density - epsilon and density + epsilon < 1, got density 0.5"
         " and epsilon 0.6"),
        ("merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\n  - {model: b, parameters: {weight: -1}}\n",
         "parameters.normalize: the weights sum to 0, so normalizing would divide by zero; change a weight"
         " or set normalize: false"),
        ("merge_method: slerp\nbase_model: b\nmodels: [a, c]\nparameters: {t: 0.5}\n",
         "models: slerp takes at most 2 input model(s), got 3 (base_model counts as an input)"),
    ],
)  # fmt: skip
def test_config_errors_are_one_exact_line(text, line):
    with pytest.raises(ConfigError) as e:
        parse_config(text, source="m.yml")
    assert str(e.value) == f"m.yml: {line}"
    assert "\n" not in str(e.value)


def test_missing_and_binary_config_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yml: config file not found$"):
        load_config(tmp_path / "nope.yml")
    (tmp_path / "bin.yml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"bin.yml: not a YAML file \(not UTF-8 text\)$"):
        load_config(tmp_path / "bin.yml")


@pytest.mark.parametrize(
    "text, nbytes",
    [("512MiB", 512 << 20), ("8GiB", 8 << 30), ("5GB", 5_000_000_000), ("1024", 1024),
     ("1.5G", 3 << 29), ("64mib", 64 << 20), ("2 GB", 2_000_000_000), ("100kb", 100_000)],
)  # fmt: skip
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "abc", "-5MB", "5XB", "0", "1e9", "5 G B"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="expected a size like 512MiB|must be positive"):
        parse_size(text)


@given(st.text(max_size=30))
def test_parse_size_never_crashes(text):
    try:
        assert parse_size(text) > 0
    except ValueError:
        pass


@given(st.text(max_size=200))
def test_parse_config_only_raises_config_errors(text):
    try:
        parse_config(text)
    except ConfigError:  # one, or several at once (ConfigErrors)
        pass
