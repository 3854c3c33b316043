"""mergekit-compatible YAML -> a frozen ``MergeConfig``, every key and type checked.

mergekit ignores unknown keys and typos; we reject them with the key path and a
"did you mean" suggestion. Errors read ``<file>: <key path>: <what>, got <value>``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError
from .methods import SPECS, Param, Scope
from .vocab import TokenizerSpec, parse_chat_template, parse_tokenizer

Scalar = float | bool

# config spelling -> safetensors code
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
DTYPE_TORCH_NAMES = {code: name for name, code in DTYPE_NAMES.items()}

TOP_KEYS = (
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template",
)  # fmt: skip
# mergekit keys we know but do not handle yet: a clear error beats a silent ignore.
NOT_YET = {
    "slices": "slices/layer_range (frankenmerges)",
    "modules": "per-module configs",
}
MODEL_KEYS = ("model", "parameters")


@dataclass(frozen=True, slots=True)
class InputModel:
    model: str  # a local path, as written in the config
    parameters: dict[str, Scalar] = field(default_factory=dict)
    key: str = ""  # key path of this entry, e.g. "models[1]"


@dataclass(frozen=True, slots=True)
class MergeConfig:
    merge_method: str
    models: tuple[InputModel, ...]  # gather order; an unlisted base is appended last
    base_model: str | None
    parameters: dict[str, Scalar]
    dtype: str | None  # safetensors code, e.g. "BF16"
    out_dtype: str | None
    tokenizer_source: str | None  # "base", a model path, or None (the donor's files)
    source: str = "<config>"  # where the config came from, for error messages
    tokenizer: TokenizerSpec | None = None  # the tokenizer: block or tokenizer_source (vocab)
    chat_template: str | None = None

    @property
    def base_index(self) -> int | None:
        if self.base_model is None:
            return None
        return next(i for i, m in enumerate(self.models) if m.model == self.base_model)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (for the manifest and plan_hash)."""
        return {
            "merge_method": self.merge_method,
            "base_model": self.base_model,
            "models": [{"model": m.model, "parameters": m.parameters} for m in self.models],
            "parameters": self.parameters,
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "tokenizer_source": self.tokenizer_source,
            "tokenizer": self.tokenizer.to_dict() if self.tokenizer else None,
            "chat_template": self.chat_template,
        }


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
    """Validate an already-parsed config mapping."""

    def fail(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: {msg}" if key else f"{source}: {msg}")

    if not isinstance(doc, dict):
        raise fail("", f"expected a mapping of config keys, got {_describe(doc)}")
    for key in doc:
        if key in NOT_YET:
            raise fail(str(key), f"{NOT_YET[key]} is not supported yet")
        if key not in TOP_KEYS:
            raise fail(str(key), _unknown("key", key, TOP_KEYS))
    if "merge_method" not in doc:
        raise fail("merge_method", "required key is missing")
    method = doc["merge_method"]
    if not isinstance(method, str):
        raise fail("merge_method", f"expected a method name, got {_describe(method)}")
    if method not in SPECS:
        raise fail("merge_method", _unknown("merge method", method, SPECS))
    spec = SPECS[method]

    base = doc.get("base_model")
    if base is not None:
        base = _model_path(base, "base_model", fail)
    if "models" not in doc:
        raise fail("models", "required key is missing (a list of {model: PATH})")
    raw_models = doc["models"]
    if not isinstance(raw_models, list) or not raw_models:
        raise fail("models", f"expected a non-empty list, got {_describe(raw_models)}")

    models: list[InputModel] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(raw_models):
        key = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            raise fail(key, f"expected a mapping with a 'model' key, got {_describe(entry)}")
        for k in entry:
            if k not in MODEL_KEYS:
                hint = ""
                if k in ("weight", "density", "t", "scale"):
                    hint = f" ('{k}' belongs under {key}.parameters)"
                raise fail(f"{key}.{k}", _unknown("key", k, MODEL_KEYS) + hint)
        if "model" not in entry:
            raise fail(f"{key}.model", "required key is missing")
        path = _model_path(entry["model"], f"{key}.model", fail)
        norm = os.path.normpath(os.path.abspath(path))
        if norm in seen:
            raise fail(f"{key}.model", f"{path} is listed twice (also {seen[norm]})")
        seen[norm] = f"{key}.model"
        params = _parameters(entry.get("parameters", {}), f"{key}.parameters", spec, fail)
        models.append(InputModel(path, params, key))

    if base is not None and os.path.normpath(os.path.abspath(base)) not in seen:
        models.append(InputModel(base, {}, "base_model"))  # mergekit appends it last
    elif base is not None:
        # Refer to the base by exactly the string its models[] entry uses.
        base = next(m.model for m in models if _same(m.model, base))

    if spec.requires_base and base is None:
        raise fail("base_model", f"required by merge_method {method}, but not set")
    n = len(models)
    if n < spec.min_inputs:
        raise fail("models", f"{method} needs at least {spec.min_inputs} input models, got {n}")
    if spec.max_inputs is not None and n > spec.max_inputs:
        extra = " (base_model counts as an input)" if base is not None else ""
        raise fail("models", f"{method} takes at most {spec.max_inputs} input model(s), got {n}{extra}")

    top = _parameters(doc.get("parameters", {}), "parameters", spec, fail)
    dtype = _dtype(doc.get("dtype"), "dtype", fail)
    out_dtype = _dtype(doc.get("out_dtype"), "out_dtype", fail)
    tok = doc.get("tokenizer_source")
    tokenizer = parse_tokenizer(doc.get("tokenizer"), tok, fail)
    template = parse_chat_template(doc.get("chat_template"), fail)
    cfg = MergeConfig(method, tuple(models), base, top, dtype, out_dtype, tok, source, tokenizer, template)
    _check_required(cfg, spec, fail)
    _check_values(cfg, spec, fail)
    return cfg


def _resolved(cfg: MergeConfig, m: InputModel, spec, name: str):
    """A parameter's value for model ``m`` (its own, else top-level, else the default),
    and the key path it came from."""
    if name in m.parameters:
        return m.parameters[name], f"{m.key}.parameters.{name}"
    if name in cfg.parameters:
        return cfg.parameters[name], f"parameters.{name}"
    return spec.param(name).default, f"{m.key}.parameters.{name}"


def _check_values(cfg: MergeConfig, spec, fail) -> None:
    """Combinations mergekit would only reject mid-merge, or turn into inf/NaN."""
    if spec.name == "linear" and cfg.parameters.get("normalize", True):
        total = sum(_resolved(cfg, m, spec, "weight")[0] for m in cfg.models)
        if total == 0:
            raise fail("parameters.normalize", "the weights sum to 0, so normalizing would divide by"
                       " zero; change a weight or set normalize: false")  # fmt: skip
    if spec.name == "nuslerp":
        n_other = len(cfg.models) - (cfg.base_index is not None)
        if n_other != 2:
            raise fail("models", f"nuslerp merges exactly 2 models besides the base, got {n_other}")
    if spec.param("epsilon") is not None and spec.param("density") is not None:  # della's window
        for i, m in enumerate(cfg.models):
            if i == cfg.base_index:
                continue
            density, _ = _resolved(cfg, m, spec, "density")
            epsilon, key = _resolved(cfg, m, spec, "epsilon")
            if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
                raise fail(key, f"{spec.name} needs 0 < density - epsilon and density + epsilon < 1,"
                           f" got density {density:g} and epsilon {epsilon:g}")  # fmt: skip


def _same(a: str, b: str) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def _model_path(value: Any, key: str, fail) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise fail(key, f"expected a model path, got {_describe(value)}")
    if value.count("+") > 1 or value.startswith("+") or value.endswith("+"):
        raise fail(key, f"expected MODEL or BASE+ADAPTER (one '+'), got {value!r}")
    return value


def _parameters(raw: Any, key: str, spec, fail) -> dict[str, Scalar]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise fail(key, f"expected a mapping of parameter names to values, got {_describe(raw)}")
    names = [p.name for p in spec.params]
    out: dict[str, Scalar] = {}
    for name, value in raw.items():
        param = spec.param(name)
        if param is None:
            if not names:
                raise fail(f"{key}.{name}", f"merge_method {spec.name} takes no parameters")
            msg = _unknown("parameter", name, names)
            raise fail(f"{key}.{name}", msg.replace("parameter", f"{spec.name} parameter", 1))
        if key.startswith("models[") and param.scope is Scope.SHARED:
            raise fail(
                f"{key}.{name}",
                f"'{name}' is one value per tensor for {spec.name}; set it under top-level parameters",
            )
        out[name] = _scalar(value, param, f"{key}.{name}", fail)
    return out


def _scalar(value: Any, param: Param, key: str, fail) -> Scalar:
    if isinstance(value, (list, dict)):
        raise fail(
            key, "gradients and filtered values (lists/mappings) are not supported yet; use a single number"
        )
    if param.kind is bool:
        if isinstance(value, bool):
            return value
        raise fail(key, f"expected true or false, got {_describe(value)}")
    if param.kind is str:
        if value in param.choices:
            return value
        raise fail(key, f"expected one of {', '.join(param.choices)}, got {_describe(value)}")
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
        number = float(value)  # YAML 1.1 reads 1e-5 as a string; mergekit accepts it
    if number is None or not math.isfinite(number):
        raise fail(key, f"expected a number, got {_describe(value)}")
    if param.kind is int:
        if number != int(number):
            raise fail(key, f"expected a whole number, got {_describe(value)}")
        number = int(number)
    if param.minimum is not None and number < param.minimum:
        raise fail(key, f"must be >= {param.minimum:g}, got {number:g}")
    if param.maximum is not None and number > param.maximum:
        raise fail(key, f"must be <= {param.maximum:g}, got {number:g}")
    return number


def _dtype(value: Any, key: str, fail) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in DTYPE_NAMES:
        raise fail(key, _unknown("dtype", value, DTYPE_NAMES))
    return DTYPE_NAMES[name]


def _check_required(cfg: MergeConfig, spec, fail) -> None:
    """Every required per-model parameter must be set for every model that needs it."""
    for param in spec.params:
        if not param.required:
            continue
        if param.scope is Scope.SHARED:
            if param.name not in cfg.parameters:
                raise fail(f"parameters.{param.name}", f"required by {spec.name}, but not set")
            continue
        for i, m in enumerate(cfg.models):
            if param.scope is Scope.NON_BASE and i == cfg.base_index:
                continue
            if param.name not in m.parameters and param.name not in cfg.parameters:
                where = (
                    f"{m.key}.parameters.{param.name}"
                    if m.key != "base_model"
                    else (f"parameters.{param.name}")
                )
                raise fail(where, f"required by {spec.name} for {m.model}, but not set")


def _unknown(what: str, got: Any, choices) -> str:
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(got), choices, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of: {', '.join(choices)}"
    return f"unknown {what} {got!r}{hint}"


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__}"
    return f"{value!r}"


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
