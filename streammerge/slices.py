"""The inputs of a merge: ``models:``, ``slices:`` and ``modules:`` -> ``Slice``s.

mergekit's ``models:`` form is one slice over every layer of every model, with an
unlisted base appended last (reference §3.2). ``slices:`` lists runs of output layers,
each merged from a ``layer_range`` of each source; a slice may name its own
``base_model`` and ``parameters`` and, beyond mergekit, its own ``merge_method``.
Only what the YAML alone can tell is checked here; layer counts come with the headers
(``layers``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .errors import Collector, ConfigError
from .methods import SPECS, MethodSpec
from .params import Setting, describe, parse_settings, unknown

MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters", "merge_method")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODULE_KEYS = ("models", "slices", "parameters")


class ConfigCollector(Collector):
    """Collects one config's problems; ``fail`` words one as ``<file>: <key>: <what>``."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {msg}" if key else f"{self.source}: {msg}")


@dataclass(frozen=True, slots=True)
class InputModel:
    """One input of a slice: a ``models[]`` entry, or a ``slices[].sources[]`` entry."""

    model: str  # a local path, as written in the config
    parameters: dict[str, Setting] = field(default_factory=dict)
    key: str = ""  # key path of this entry, e.g. "models[1]", "slices[0].sources[1]"
    layer_range: tuple[int, int] | None = None  # half-open; None: every layer (models: form)


@dataclass(frozen=True, slots=True)
class Slice:
    """A run of output layers merged from the same layers of each source. mergekit's
    ``models:`` form is one slice over every layer (``layer_range`` None)."""

    sources: tuple[InputModel, ...]  # gather order
    merge_method: str  # the top-level method unless the slice names its own (an extension)
    base_model: str | None  # the slice's own base_model, else the top-level one
    parameters: dict[str, Setting]
    key: str  # "slices[0]", or "models" for the models: form

    @property
    def base_index(self) -> int | None:
        return next((i for i, m in enumerate(self.sources) if m.model == self.base_model), None)

    @property
    def n_layers(self) -> int | None:
        r = self.sources[0].layer_range
        return None if r is None else r[1] - r[0]


def module_body(doc: dict, fail) -> dict:
    """``modules: {default: {...}}``: the one module of a plain (single-stack) LLM."""
    modules = doc["modules"]
    if not isinstance(modules, dict) or not modules:
        raise fail("modules", f"expected a mapping of module names to configs, got {describe(modules)}")
    for name in modules:
        if name != "default":
            raise fail(f"modules.{name}", "streammerge merges single-module models, whose one module"
                       " is 'default'")  # fmt: skip
    body = modules["default"]
    if not isinstance(body, dict):
        raise fail("modules.default", f"expected a mapping with models: or slices:, got {describe(body)}")
    for k in body:
        if k not in MODULE_KEYS:
            raise fail(f"modules.default.{k}", unknown("key", k, MODULE_KEYS))
    return body


def models_slice(raw: Any, key: str, spec: MethodSpec, base: str | None, probs: ConfigCollector) -> Slice:
    """mergekit's ``models:`` form: one slice over every layer, an unlisted base last."""
    fail = probs.fail
    if not isinstance(raw, list) or not raw:
        raise fail(key, f"expected a non-empty list, got {describe(raw)}")
    sources: list[InputModel] = []
    seen: dict[str, str] = {}
    mark = probs.mark()
    for i, entry in enumerate(raw):
        with probs.each():
            ekey = f"{key}[{i}]"
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict):
                raise fail(ekey, f"expected a mapping with a 'model' key, got {describe(entry)}")
            _check_keys(entry, ekey, MODEL_KEYS, fail)
            if "model" not in entry:
                raise fail(f"{ekey}.model", "required key is missing")
            path = model_path(entry["model"], f"{ekey}.model", fail)
            if norm(path) in seen:
                raise fail(f"{ekey}.model", f"{path} is listed twice (also {seen[norm(path)]})")
            seen[norm(path)] = f"{ekey}.model"
            params = parse_settings(
                entry.get("parameters"), f"{ekey}.parameters", [spec], fail, per_model=True
            )
            sources.append(InputModel(path, params, ekey))
    probs.stop_if_new(mark)
    if base is not None and norm(base) not in seen:
        sources.append(InputModel(base, {}, "base_model"))  # mergekit appends it last
    elif base is not None:
        base = next(m.model for m in sources if same(m.model, base))  # as its entry spells it
    _check_inputs(spec, sources, base, key, "base_model", fail)
    return Slice(tuple(sources), spec.name, base, {}, "models")


def parse_slices(
    raw: Any, key: str, top_spec: MethodSpec, top_base: str | None, probs: ConfigCollector
) -> list[Slice]:
    fail = probs.fail
    if not isinstance(raw, list) or not raw:
        raise fail(key, f"expected a non-empty list, got {describe(raw)}")
    out = []
    for i, s in enumerate(raw):
        with probs.each():
            out.append(_slice(s, f"{key}[{i}]", top_spec, top_base, probs))
    return out


def _slice(s: Any, key: str, top_spec: MethodSpec, top_base: str | None, probs: ConfigCollector) -> Slice:
    fail = probs.fail
    if not isinstance(s, dict):
        raise fail(key, f"expected a mapping with 'sources', got {describe(s)}")
    _check_keys(s, key, SLICE_KEYS, fail)
    spec = (
        top_spec if "merge_method" not in s else parse_method(s["merge_method"], f"{key}.merge_method", fail)
    )
    base = top_base
    if s.get("base_model") is not None:
        base = model_path(s["base_model"], f"{key}.base_model", fail)
    raw = s.get("sources")
    if not isinstance(raw, list) or not raw:
        raise fail(
            f"{key}.sources", f"expected a non-empty list of {{model, layer_range}}, got {describe(raw)}"
        )
    sources: list[InputModel] = []
    seen: dict[str, str] = {}
    mark = probs.mark()
    for j, entry in enumerate(raw):
        with probs.each():
            ekey = f"{key}.sources[{j}]"
            if not isinstance(entry, dict):
                raise fail(ekey, f"expected a mapping with 'model' and 'layer_range', got {describe(entry)}")
            _check_keys(entry, ekey, SOURCE_KEYS, fail)
            for k in ("model", "layer_range"):
                if k not in entry:
                    raise fail(f"{ekey}.{k}", "required key is missing")
            path = model_path(entry["model"], f"{ekey}.model", fail)
            if norm(path) in seen:
                raise fail(f"{ekey}.model", f"{path} is already a source of this slice ({seen[norm(path)]});"
                           " a slice merges distinct models")  # fmt: skip
            seen[norm(path)] = ekey
            lr = _layer_range(entry["layer_range"], f"{ekey}.layer_range", fail)
            if sources and sources[0].layer_range is not None:
                (a0, b0), (a, b) = sources[0].layer_range, lr
                if b - a != b0 - a0:
                    raise fail(f"{ekey}.layer_range", f"{[a, b]} spans {b - a} layers, {key}.sources[0] spans"
                               f" {b0 - a0}; every source of a slice spans the same number")  # fmt: skip
            params = parse_settings(
                entry.get("parameters"), f"{ekey}.parameters", [spec], fail, per_model=True
            )
            sources.append(InputModel(path, params, ekey, lr))
    params = {}
    with probs.each():
        params = parse_settings(s.get("parameters"), f"{key}.parameters", [spec], fail)
    probs.stop_if_new(mark)
    if base is not None:
        base = next((m.model for m in sources if same(m.model, base)), base)
    _check_inputs(spec, sources, base, f"{key}.sources", f"{key}.base_model", fail)
    if spec.requires_base and base is not None and not any(same(m.model, base) for m in sources):
        raise fail(f"{key}.sources", f"{spec.name} needs the base model {base} among the slice's sources")
    return Slice(tuple(sources), spec.name, base, params, key)


def _layer_range(value: Any, key: str, fail) -> tuple[int, int]:
    ok = isinstance(value, list) and len(value) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok:
        raise fail(key, f"expected [first, end] (two layer indices, end excluded), got {_show(value)}")
    a, b = value
    if a < 0 or b < a:
        raise fail(key, f"expected 0 <= first <= end, got {[a, b]}")
    return a, b


def _check_inputs(spec: MethodSpec, sources, base, key: str, base_key: str, fail) -> None:
    method = spec.name
    if spec.requires_base and base is None:
        raise fail("base_model", f"required by merge_method {method}, but not set")
    n = len(sources)
    if n < spec.min_inputs:
        raise fail(key, f"{method} needs at least {spec.min_inputs} input models, got {n}")
    if spec.max_inputs is not None and n > spec.max_inputs:
        listed = base is not None and any(same(m.model, base) for m in sources)
        extra = " (base_model counts as an input)" if listed else ""
        raise fail(key, f"{method} takes at most {spec.max_inputs} input model(s), got {n}{extra}")
    if method == "nuslerp":
        n_other = n - any(same(m.model, base) for m in sources if base is not None)
        if n_other != 2:
            raise fail(key, f"nuslerp merges exactly 2 models besides the base, got {n_other}")


def _check_keys(entry: dict, key: str, allowed, fail) -> None:
    for k in entry:
        if k not in allowed:
            hint = ""
            if k in ("weight", "density", "t", "scale"):
                hint = f" ('{k}' belongs under {key}.parameters)"
            elif k == "layer_range":
                hint = " (layer ranges belong in slices[].sources[])"
            raise fail(f"{key}.{k}", unknown("key", k, allowed) + hint)


def norm(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def same(a: str, b: str) -> bool:
    return norm(a) == norm(b)


def _show(value: Any) -> str:
    return describe(value) if not isinstance(value, list) else repr(value)


def model_path(value: Any, key: str, fail) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise fail(key, f"expected a model path, got {describe(value)}")
    if value.count("+") > 1 or value.startswith("+") or value.endswith("+"):
        raise fail(key, f"expected MODEL or BASE+ADAPTER (one '+'), got {value!r}")
    return value


def parse_method(value: Any, key: str, fail, *, required: bool = False) -> MethodSpec:
    if value is None and required:
        raise fail(key, "required key is missing")
    if not isinstance(value, str):
        raise fail(key, f"expected a method name, got {describe(value)}")
    if value not in SPECS:
        raise fail(key, unknown("merge method", value, SPECS))
    return SPECS[value]
