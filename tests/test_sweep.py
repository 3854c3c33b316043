"""sweep: KEY=V1,V2 specs parsed exactly, grids expanded without touching the original."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streammerge.config import from_dict
from streammerge.errors import ConfigError, StreamMergeError
from streammerge.sweep import Sweep, expand, format_path, parse_sweep, set_value

DOC = {
    "merge_method": "ties",
    "base_model": "base",
    "models": [
        {"model": "ft1", "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": "ft2"},
    ],
    "parameters": {"weight": 0.5},
    "dtype": "float32",
}


def test_parse_gives_path_and_typed_values():
    s = parse_sweep("models[1].parameters.weight=0.2, 0.4,1,true,bfloat16")
    assert s.path == ("models", 1, "parameters", "weight")
    assert s.values == (0.2, 0.4, 1, True, "bfloat16")
    assert [type(v) for v in s.values] == [float, float, int, bool, str]
    assert parse_sweep(" models[0] . parameters.t =1").key == "models[0].parameters.t"
    assert (s.key, s.label) == ("models[1].parameters.weight", "models1.weight")
    assert parse_sweep("parameters.t=0.3").label == "t"
    assert parse_sweep("models[*].parameters.weight=1").label == "models.weight"


@pytest.mark.parametrize(
    "spec, line",
    [
        (
            "weight",
            "--sweep 'weight': expected KEY=VALUE[,VALUE...], e.g. models[1].parameters.weight=0.2,0.4",
        ),
        (
            "models[x].weight=1",
            "--sweep 'models[x].weight=1': bad key path 'models[x].weight';"
            " expected names and [index] like models[1].parameters.weight",
        ),
        (
            "a..b=1",
            "--sweep 'a..b=1': bad key path 'a..b'; expected names and [index] like models[1].parameters.weight",
        ),
        ("t=0.1,,0.2", "--sweep 't=0.1,,0.2': empty value (values are separated by single commas)"),
        ("t=", "--sweep 't=': empty value (values are separated by single commas)"),
        ("t=0.5,0.50", "--sweep 't=0.5,0.50': value 0.50 is listed twice"),
        ("t=nan", "--sweep 't=nan': value nan is not a finite number"),
    ],
)
def test_parse_errors_are_one_line(spec, line):
    with pytest.raises(ConfigError) as e:
        parse_sweep(spec)
    assert str(e.value) == line


def test_set_value_creates_mappings_and_leaves_the_original():
    out = set_value(DOC, parse_sweep("models[1].parameters.density=0.7"), 0.7)
    assert out["models"][1] == {"model": "ft2", "parameters": {"density": 0.7}}
    assert DOC["models"][1] == {"model": "ft2"}
    every = set_value(DOC, parse_sweep("models[*].parameters.weight=2"), 2)
    assert [m["parameters"]["weight"] for m in every["models"]] == [2, 2]


@pytest.mark.parametrize(
    "spec, line",
    [
        (
            "models[2].parameters.weight=1",
            "--sweep 'models[2].parameters.weight=1': models: index 2 is out of range (the list has 2 items)",
        ),
        (
            "base_model.x=1",
            "--sweep 'base_model.x=1': base_model: expected a mapping to hold 'x', got str 'base'",
        ),
        ("dtype[0]=1", "--sweep 'dtype[0]=1': dtype: expected a list to index, got str 'float32'"),
        ("slices[0].x=1", "--sweep 'slices[0].x=1': the config: has no 'slices' list to index"),
    ],
)
def test_set_value_errors_name_the_key(spec, line):
    s = parse_sweep(spec)
    with pytest.raises(ConfigError) as e:
        set_value(DOC, s, s.values[0])
    assert str(e.value) == line


def test_expand_is_a_grid_with_readable_unique_names():
    sweeps = [
        parse_sweep("models[0].parameters.weight=0.2,0.4"),
        parse_sweep("models[0].parameters.density=0.3,1"),
    ]
    vs = expand(DOC, sweeps)
    # 2 x 2 grid, the last sweep varies fastest
    assert [v.name for v in vs] == [
        "models0.weight=0.2_models0.density=0.3",
        "models0.weight=0.2_models0.density=1",
        "models0.weight=0.4_models0.density=0.3",
        "models0.weight=0.4_models0.density=1",
    ]
    assert vs[2].settings == (("models[0].parameters.weight", 0.4), ("models[0].parameters.density", 0.3))
    assert vs[2].doc["models"][0]["parameters"] == {"weight": 0.4, "density": 0.3}
    assert from_dict(vs[3].doc).models[0].parameters == {"weight": 0.4, "density": 1.0}
    assert DOC["models"][0]["parameters"] == {"weight": 0.5, "density": 0.5}


def test_expand_without_sweeps_is_the_config_itself():
    (v,) = expand(DOC, [])
    assert (v.name, v.doc, v.settings) == ("config", DOC, ())
    assert v.doc is not DOC


def test_expand_rejects_a_key_swept_twice():
    with pytest.raises(ConfigError) as e:
        expand(DOC, [parse_sweep("parameters.t=1"), parse_sweep("parameters . t=2")])
    assert str(e.value) == "--sweep 'parameters . t=2': key parameters.t is already swept"


def test_names_stay_unique_when_strings_read_the_same():
    vs = expand(DOC, [parse_sweep("base_model=a/b,a b,a:b")])
    assert [v.name for v in vs] == ["base_model=a-b", "base_model=a-b~1", "base_model=a-b~2"]


NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
STEPS = st.lists(st.one_of(st.integers(0, 99), st.none()), max_size=2)
PATHS = st.lists(st.tuples(NAMES, STEPS), min_size=1, max_size=4).map(
    lambda segs: tuple(x for name, idx in segs for x in (name, *idx))
)
VALUES = st.lists(
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(-(10**6), 10**6),
        st.booleans(),
        st.from_regex(r"[A-Za-z/][A-Za-z0-9_./-]{0,8}", fullmatch=True).filter(
            lambda s: s.lower() not in ("true", "false", "inf", "nan", "infinity")
        ),
    ),
    min_size=1,
    max_size=5,
    unique_by=lambda v: (type(v), v),
)


def _spell(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v)


@given(PATHS, VALUES)
def test_parse_round_trips(path, values):
    s = parse_sweep(f"{format_path(path)}={','.join(map(_spell, values))}")
    assert s.path == path
    assert len(s.values) == len(values)
    for got, want in zip(s.values, values):
        assert type(got) is type(want) and (got == want or math.isclose(got, want))


@given(st.text(max_size=40))
def test_parse_fails_only_with_a_one_line_error(text):
    try:
        s = parse_sweep(text)
    except StreamMergeError as e:
        assert "\n" not in str(e) or "\n" in text
    else:
        assert isinstance(s, Sweep) and s.values


@given(st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_grid_size_is_the_product(lengths):
    sweeps = [
        parse_sweep(f"parameters.k{i}={','.join(str(j) for j in range(n))}") for i, n in enumerate(lengths)
    ]
    vs = expand(DOC, sweeps)
    assert len(vs) == math.prod(lengths)
    assert len({v.name for v in vs}) == len(vs)
    assert {tuple(v.doc["parameters"][f"k{i}"] for i in range(len(lengths))) for v in vs} == {
        tuple(v for _, v in x.settings) for x in vs
    }
