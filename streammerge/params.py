"""Parameter settings: scalars, gradients over layers, filter lists; resolved per tensor.

A *setting* is what the YAML gives for one parameter name at one level (a model's entry,
a slice, the module, the top level): a scalar, a ``Gradient`` interpolated over a slice's
layers, or ``Rules`` (``filter:`` substring tests, the first match wins). ``resolve``
walks the levels in precedence order and evaluates exactly as mergekit 0.1.5 does
(reference §1.2-§1.3): Python float64, ``s = t * (n - 1)``, linear between the two
nearest anchors; a gradient of booleans is a step function. Pure functions, no torch.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .methods import MethodSpec, Param, Scope

Scalar = float | bool | str  # str: one of a parameter's choices


@dataclass(frozen=True, slots=True)
class Gradient:
    """Values at evenly spaced anchors over a slice's layers (all numbers, or all booleans or
    choices: a step function)."""

    values: tuple[Scalar, ...]


@dataclass(frozen=True, slots=True)
class Rule:
    filter: str | None  # a substring of the tensor name; None or "*" matches every tensor
    value: Scalar | Gradient


@dataclass(frozen=True, slots=True)
class Rules:
    """A filter list: the first rule whose filter matches the tensor name gives the value."""

    rules: tuple[Rule, ...]


Setting = Scalar | Gradient | Rules


@dataclass(frozen=True, slots=True)
class Level:
    """The settings of one precedence level and the key path they sit under."""

    key: str  # e.g. "models[0].parameters", "slices[1].parameters", "parameters"
    settings: Mapping[str, Setting]


def layer_t(index: int, n_layers: int) -> float:
    """The gradient position of layer ``index`` of a slice of ``n_layers`` layers
    (mergekit: a one-layer slice gets t = 1). Non-layer tensors use t = 0."""
    return index / (n_layers - 1) if n_layers > 1 else 1.0


def interpolate(values: Sequence[Scalar], t: float) -> Scalar:
    """mergekit's ``evaluate_setting`` for a list, bit for bit."""
    n = len(values)
    if n == 1:  # mergekit: (1 - 0) * v + 0 * v, the same value (an int stays an int here)
        return values[0]
    if isinstance(values[0], (bool, str)):  # not numbers: a step function
        return values[int(t * (n - 1))]
    scaled = t * (n - 1)
    i0 = int(scaled)
    i1 = min(n - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def matches(rule: Rule, tensor: str) -> bool:
    return rule.filter is None or rule.filter == "*" or (bool(tensor) and rule.filter in tensor)


def evaluate(setting: Setting, tensor: str, t: float) -> Scalar | None:
    """The value of ``setting`` for ``tensor`` at gradient position ``t``; None when no
    filter matches (the lookup then falls through to the next level)."""
    if isinstance(setting, Rules):
        rule = next((r for r in setting.rules if matches(r, tensor)), None)
        return None if rule is None else evaluate(rule.value, tensor, t)
    if isinstance(setting, Gradient):
        return interpolate(setting.values, t)
    return setting


def resolve(name: str, levels: Sequence[Level], tensor: str, t: float) -> tuple[Scalar, str] | None:
    """The first level (highest precedence first) whose setting for ``name`` yields a
    value for ``tensor``: (value, key path of the setting), or None."""
    for level in levels:
        setting = level.settings.get(name)
        if setting is not None:
            value = evaluate(setting, tensor, t)
            if value is not None:
                return value, f"{level.key}.{name}"
    return None


def is_constant(setting: Setting) -> bool:
    """Whether ``setting`` has one value for every tensor and layer."""
    return not isinstance(setting, (Gradient, Rules))


def filters(setting: Setting) -> list[tuple[int, str]]:
    """(rule index, filter) of every rule with a real substring filter."""
    if not isinstance(setting, Rules):
        return []
    return [(i, r.filter) for i, r in enumerate(setting.rules) if r.filter not in (None, "*")]


def to_data(setting: Setting):
    """Plain data for the manifest and plan hash, in mergekit's YAML shape."""
    if isinstance(setting, Gradient):
        return list(setting.values)
    if isinstance(setting, Rules):
        return [
            {"value": to_data(r.value)} | ({} if r.filter is None else {"filter": r.filter})
            for r in setting.rules
        ]
    return setting


# --- parsing: YAML values -> settings, every problem with its key path ---------------------

Fail = Callable[[str, str], ConfigError]
RULE_KEYS = ("filter", "value")


def parse_settings(
    raw: Any, key: str, specs: Sequence[MethodSpec], fail: Fail, *, per_model: bool = False
) -> dict[str, Setting]:
    """A ``parameters:`` mapping at ``key``, for a level that feeds ``specs`` (a model's
    entry or a slice feed one method; the top level every method the config uses)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise fail(key, f"expected a mapping of parameter names to values, got {describe(raw)}")
    out: dict[str, Setting] = {}
    for name, value in raw.items():
        spec, param = next(((s, s.param(name)) for s in specs if s.param(name)), (specs[0], None))
        if param is None:
            names = list(dict.fromkeys(p.name for s in specs for p in s.params))
            methods = "/".join(dict.fromkeys(s.name for s in specs))
            if not names:
                raise fail(f"{key}.{name}", f"merge_method {methods} takes no parameters")
            msg = unknown("parameter", name, names)
            raise fail(f"{key}.{name}", msg.replace("parameter", f"{methods} parameter", 1))
        if per_model and param.scope is Scope.SHARED:
            raise fail(
                f"{key}.{name}",
                f"'{name}' is one value per tensor for {spec.name}; set it under top-level parameters",
            )
        out[name] = parse_setting(value, param, f"{key}.{name}", fail)
    return out


def parse_setting(value: Any, param: Param, key: str, fail: Fail) -> Setting:
    """A scalar, a gradient (a list of scalars) or a filter list (a list of
    ``{filter, value}``; a lone mapping is a one-entry list, as in mergekit 0.1.5)."""
    if isinstance(value, dict):
        return Rules((_rule(value, param, f"{key}[0]", fail),))
    if not isinstance(value, list):
        return parse_scalar(value, param, key, fail)
    if not value:
        raise fail(key, "an empty list gives no value; write a number, a gradient or filter entries")
    if all(isinstance(v, dict) for v in value):
        rules = tuple(_rule(v, param, f"{key}[{i}]", fail) for i, v in enumerate(value))
        for i, r in enumerate(rules[:-1]):
            if r.filter in (None, "*"):
                raise fail(
                    f"{key}[{i + 1}]",
                    f"never used: entry [{i}] has no filter, so it matches every tensor first",
                )
        return Rules(rules)
    if any(isinstance(v, dict) for v in value):
        raise fail(key, "mixes filter entries ({filter, value}) with plain values; use one or the other")
    return _gradient(value, param, key, fail)


def _gradient(values: list, param: Param, key: str, fail: Fail) -> Gradient:
    if param.kind is int and len(values) > 1:
        raise fail(key, f"{param.name} is a whole number, so it takes no gradient; use filters for"
                   " per-tensor values")  # fmt: skip
    for i, v in enumerate(values):
        if isinstance(v, list):
            raise fail(f"{key}[{i}]", "a gradient's anchors must be plain values, got a nested list")
    return Gradient(tuple(parse_scalar(v, param, f"{key}[{i}]", fail) for i, v in enumerate(values)))


def _rule(entry: dict, param: Param, key: str, fail: Fail) -> Rule:
    for k in entry:
        if k not in RULE_KEYS:
            raise fail(f"{key}.{k}", unknown("key", k, RULE_KEYS))
    if "value" not in entry:
        raise fail(f"{key}.value", "required key is missing")
    flt = entry.get("filter")
    if flt is not None and (not isinstance(flt, str) or not flt):
        raise fail(f"{key}.filter", f"expected part of a tensor name (a substring), got {describe(flt)}")
    value = entry["value"]
    if isinstance(value, dict):
        raise fail(f"{key}.value", "expected a value or a gradient, got a mapping (filters do not nest)")
    if isinstance(value, list):
        if not value:
            raise fail(f"{key}.value", "an empty list gives no value")
        return Rule(flt, _gradient(value, param, f"{key}.value", fail))
    return Rule(flt, parse_scalar(value, param, f"{key}.value", fail))


def parse_scalar(value: Any, param: Param, key: str, fail: Fail) -> Scalar:
    if param.kind is bool:
        if isinstance(value, bool):
            return value
        raise fail(key, f"expected true or false, got {describe(value)}")
    if param.kind is str:
        if value in param.choices:
            return value
        raise fail(key, f"expected one of {', '.join(param.choices)}, got {describe(value)}")
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
        number = float(value)  # YAML 1.1 reads 1e-5 as a string; mergekit accepts it
    if number is None or not math.isfinite(number):
        raise fail(key, f"expected a number, got {describe(value)}")
    if param.kind is int:
        if number != int(number):
            raise fail(key, f"expected a whole number, got {describe(value)}")
        number = int(number)
    if param.minimum is not None and number < param.minimum:
        raise fail(key, f"must be >= {param.minimum:g}, got {number:g}")
    if param.maximum is not None and number > param.maximum:
        raise fail(key, f"must be <= {param.maximum:g}, got {number:g}")
    return number


def unknown(what: str, got: Any, choices) -> str:
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(got), choices, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of: {', '.join(choices)}"
    return f"unknown {what} {got!r}{hint}"


def describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__}"
    return f"{value!r}"


Resolved = Mapping[str, tuple[Scalar, str]]  # parameter name -> (value, key path)


def value_problems(
    spec: MethodSpec, shared: Resolved, inputs: Sequence[Resolved], base_index: int | None
) -> list[tuple[str, str]]:
    """(key path, message) for resolved values that mergekit would only reject mid-merge
    or turn into inf/NaN."""
    out = []
    if spec.name == "linear" and shared["normalize"][0]:
        if sum(p["weight"][0] for p in inputs) == 0:
            out.append((shared["normalize"][1], "the weights sum to 0, so normalizing would divide by"
                        " zero; change a weight or set normalize: false"))  # fmt: skip
    if spec.param("epsilon") is not None and spec.param("density") is not None:  # della's window
        for i, p in enumerate(inputs):
            if i == base_index:
                continue
            (density, _), (epsilon, key) = p["density"], p["epsilon"]
            if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
                out.append((key, f"{spec.name} needs 0 < density - epsilon and density + epsilon < 1,"
                            f" got density {density:g} and epsilon {epsilon:g}"))  # fmt: skip
    return out
