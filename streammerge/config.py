"""mergekit-compatible YAML -> a frozen ``MergeConfig``, every key and type checked.

mergekit ignores unknown keys and typos; we reject them with the key path and a
"did you mean" suggestion. Errors read ``<file>: <key path>: <what>, got <value>``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError
from .methods import SPECS, Scope
from .params import (
    Level,
    Scalar,
    Setting,
    describe,
    is_constant,
    parse_settings,
    resolve,
    to_data,
    unknown,
    value_problems,
)
from .slices import (
    ConfigCollector,
    InputModel,
    Slice,
    model_path,
    models_slice,
    module_body,
    norm,
    parse_method,
    parse_slices,
    same,
)
from .vocab import TokenizerSpec, parse_chat_template, parse_tokenizer

__all__ = ["MergeConfig", "InputModel", "Slice", "Scalar", "Setting", "load_config", "parse_config"]

# config spelling -> safetensors code
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
DTYPE_TORCH_NAMES = {code: name for name, code in DTYPE_NAMES.items()}

TOP_KEYS = (
    "merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class MergeConfig:
    merge_method: str
    models: tuple[InputModel, ...]  # every model once, in order of first mention; base included
    base_model: str | None
    parameters: dict[str, Setting]
    dtype: str | None  # safetensors code, e.g. "BF16"
    out_dtype: str | None
    tokenizer_source: str | None  # "base", a model path, or None (the donor's files)
    source: str = "<config>"  # where the config came from, for error messages
    tokenizer: TokenizerSpec | None = None  # the tokenizer: block or tokenizer_source (vocab)
    chat_template: str | None = None
    slices: tuple[Slice, ...] = ()
    module_parameters: dict[str, Setting] = field(default_factory=dict)  # modules.default

    @property
    def base_index(self) -> int | None:
        if self.base_model is None:
            return None
        return next(i for i, m in enumerate(self.models) if m.model == self.base_model)

    @property
    def frankenmerge(self) -> bool:
        """Written with ``slices:`` (layer ranges), not ``models:``."""
        return self.slices[0].sources[0].layer_range is not None

    @property
    def donor(self) -> str:
        """The model whose config.json the output gets: the base, else the first listed."""
        return self.base_model or self.models[0].model

    def levels(self, sl: Slice, source: InputModel | None) -> list[Level]:
        """Parameter levels in precedence order (reference §1.2): the model's own entry
        (per-model parameters only), the slice, the module, the top level."""
        out = [Level(f"{source.key}.parameters", source.parameters)] if source is not None else []
        if sl.key != "models":
            out.append(Level(f"{sl.key}.parameters", sl.parameters))
        if self.module_parameters:
            out.append(Level("modules.default.parameters", self.module_parameters))
        return out + [Level("parameters", self.parameters)]

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (for the manifest and plan_hash)."""

        def params(settings):
            return {k: to_data(v) for k, v in settings.items()}

        def entry(m):
            return {"model": m.model, "parameters": params(m.parameters)} | (
                {"layer_range": list(m.layer_range)} if m.layer_range is not None else {}
            )

        doc = {
            "merge_method": self.merge_method,
            "base_model": self.base_model,
            "models": [entry(m) for m in self.models],
            "parameters": params(self.parameters),
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "tokenizer_source": self.tokenizer_source,
            "tokenizer": self.tokenizer.to_dict() if self.tokenizer else None,
            "chat_template": self.chat_template,
        }
        if self.slices and self.frankenmerge:
            doc["slices"] = [
                {"sources": [entry(m) for m in sl.sources], "merge_method": sl.merge_method,
                 "base_model": sl.base_model, "parameters": params(sl.parameters)}
                for sl in self.slices
            ]  # fmt: skip
        if self.module_parameters:
            doc["module_parameters"] = params(self.module_parameters)
        return doc


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool, type(None))):
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value, got a {type(key).__name__}", key_node.start_mark
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str | os.PathLike) -> MergeConfig:
    """Read and validate the YAML merge config at ``path``."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a YAML config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML file (not UTF-8 text)") from None
    return parse_config(text, source=path)


def parse_config(text: str, source: str = "<config>") -> MergeConfig:
    """Validate YAML ``text``; errors are prefixed with ``source``."""
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    return from_dict(doc, source)


def from_dict(doc: Any, source: str = "<config>") -> MergeConfig:
    """Validate an already-parsed config mapping; every problem found is reported."""
    probs = ConfigCollector(source)
    fail = probs.fail
    if not isinstance(doc, dict):
        raise fail("", f"expected a mapping of config keys, got {describe(doc)}")
    for key in doc:
        with probs.each():
            if key not in TOP_KEYS:
                raise fail(str(key), unknown("key", key, TOP_KEYS))
    with probs.each():
        spec = parse_method(doc.get("merge_method"), "merge_method", fail, required=True)
    probs.check()  # nothing below means anything without a method

    base = None
    with probs.each():
        base = (
            model_path(doc["base_model"], "base_model", fail) if doc.get("base_model") is not None else None
        )
    body, prefix, module_params_raw = doc, "", None
    if "modules" in doc:
        body, prefix = module_body(doc, fail), "modules.default."
        module_params_raw = body.get("parameters")
    forms = [k for k in ("models", "slices") if k in body]
    top_forms = [k for k in ("models", "slices") if k in doc]
    if "modules" in doc and top_forms:
        raise fail(top_forms[0], "use either modules: or top-level models:/slices:, not both")
    if len(forms) != 1:
        if forms:
            raise fail("slices", "use either models: or slices:, not both")
        raise fail(f"{prefix}models", "required key is missing (a list of {model: PATH})")

    slices = []
    with probs.each():
        if forms == ["models"]:
            slices = [models_slice(body["models"], f"{prefix}models", spec, base, probs)]
        else:
            slices = parse_slices(body["slices"], f"{prefix}slices", spec, base, probs)
    probs.check()
    specs = list(dict.fromkeys(SPECS[sl.merge_method] for sl in slices))
    top = module_params = {}
    with probs.each():
        top = parse_settings(doc.get("parameters"), "parameters", specs, fail)
    with probs.each():
        module_params = parse_settings(module_params_raw, "modules.default.parameters", specs, fail)
    dtype = out_dtype = tokenizer = template = None
    tok = doc.get("tokenizer_source")
    with probs.each():
        dtype = _dtype(doc.get("dtype"), "dtype", fail)
    with probs.each():
        out_dtype = _dtype(doc.get("out_dtype"), "out_dtype", fail)
    with probs.each():
        tokenizer = parse_tokenizer(doc.get("tokenizer"), tok, fail)
    with probs.each():
        template = parse_chat_template(doc.get("chat_template"), fail)
    probs.check()

    models: dict[str, InputModel] = {}
    for sl in slices:
        for m in sl.sources:
            models.setdefault(norm(m.model), InputModel(m.model, m.parameters, m.key))
    if base is not None:
        base = next((m.model for m in models.values() if same(m.model, base)), base)
        models.setdefault(norm(base), InputModel(base, {}, "base_model"))
    cfg = MergeConfig(
        spec.name, tuple(models.values()), base, top, dtype, out_dtype, tok, source, tokenizer,
        template, tuple(slices), module_params,
    )  # fmt: skip
    for sl in cfg.slices:
        with probs.each():
            _check_required(cfg, sl, fail)
            _check_constant_values(cfg, sl, fail)
    probs.check()
    return cfg


def _check_required(cfg: MergeConfig, sl: Slice, fail) -> None:
    """Every required parameter must be set at some level for every input that needs it
    (whether a filter list yields a value for each tensor is checked by the plan)."""
    spec = SPECS[sl.merge_method]
    top = "parameters" if sl.key == "models" else f"{sl.key}.parameters"
    for param in spec.params:
        if not param.required:
            continue
        if param.scope is Scope.SHARED:
            if not any(param.name in lv.settings for lv in cfg.levels(sl, None)):
                raise fail(f"{top}.{param.name}", f"required by {spec.name}, but not set")
            continue
        for i, m in enumerate(sl.sources):
            if param.scope is Scope.NON_BASE and i == sl.base_index:
                continue
            if not any(param.name in lv.settings for lv in cfg.levels(sl, m)):
                where = f"{m.key}.parameters.{param.name}" if m.key != "base_model" else f"{top}.{param.name}"
                raise fail(where, f"required by {spec.name} for {m.model}, but not set")


def _check_constant_values(cfg: MergeConfig, sl: Slice, fail) -> None:
    """Value combinations that break the merge, when no gradient or filter is involved
    (otherwise the plan checks every tensor)."""
    spec = SPECS[sl.merge_method]
    levels = [cfg.levels(sl, m) for m in sl.sources] + [cfg.levels(sl, None)]
    if not all(is_constant(s) for lv in levels for level in lv for s in level.settings.values()):
        return
    shared, inputs = resolve_all(cfg, sl, "", 0.0, [""] * len(sl.sources))
    for key, msg in value_problems(spec, shared, inputs, sl.base_index):
        raise fail(key, msg)


def resolve_all(cfg: MergeConfig, sl: Slice, tensor: str, t: float, input_names) -> tuple[dict, list[dict]]:
    """Every parameter of slice ``sl``'s method for one output tensor: shared ones looked up
    with the output name, per-model ones with each input's own name; values missing at
    every level take the default (None for a required one). (value, key path) pairs."""
    spec = SPECS[sl.merge_method]
    top = "parameters" if sl.key == "models" else f"{sl.key}.parameters"

    def one(param, levels, name, default_key):
        return resolve(param.name, levels, name, t) or (param.default, default_key)

    shared_levels = cfg.levels(sl, None)
    shared = {
        p.name: one(p, shared_levels, tensor, f"{top}.{p.name}")
        for p in spec.params
        if p.scope is Scope.SHARED
    }
    inputs = []
    for i, m in enumerate(sl.sources):
        levels = cfg.levels(sl, m)
        own = f"{m.key}.parameters" if m.key != "base_model" else top
        inputs.append({
            p.name: one(p, levels, input_names[i], f"{own}.{p.name}")
            for p in spec.params
            if p.scope is Scope.INPUT or (p.scope is Scope.NON_BASE and i != sl.base_index)
        })  # fmt: skip
    return shared, inputs


def _dtype(value: Any, key: str, fail) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in DTYPE_NAMES:
        raise fail(key, unknown("dtype", value, DTYPE_NAMES))
    return DTYPE_NAMES[name]


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
    "T": 2**40,
}


def parse_size(text: str | int) -> int:
    """``512MiB``, ``8GiB``, ``5GB``, ``1.5G`` or plain bytes -> bytes. ValueError if bad."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"expected a size like 512MiB, 8GiB, 5GB or a byte count, got {text!r}")
    nbytes = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if nbytes <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return nbytes
