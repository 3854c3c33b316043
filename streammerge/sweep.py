"""Sweeps: ``models[1].parameters.weight=0.2,0.4,0.6`` -> a grid of config variants.

Used by ``streammerge tune`` (and batches of merges). A sweep works on the parsed YAML
mapping (plain dicts and lists) before validation; each variant is then validated by
``config.from_dict`` like any config, so a swept value out of range fails with its key path.

Key paths are names joined by dots, each name optionally followed by ``[i]`` (one list
item) or ``[*]`` (every item): ``parameters.t``, ``models[0].parameters.density``,
``models[*].parameters.weight``. Values are split on commas; ``true``/``false`` are booleans,
numbers are ints or floats, anything else is a string. Missing mapping keys on the way are
created (``models[1].parameters`` may be absent); list indices must exist.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

Value = bool | int | float | str
Step = str | int | None  # a mapping key, a list index, or None for [*] (every item)

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_SEGMENT = re.compile(rf"({_NAME})((?:\[(?:\d+|\*)\])*)")
_INDEX = re.compile(r"\[(\d+|\*)\]")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")
EXAMPLE = "models[1].parameters.weight=0.2,0.4"


@dataclass(frozen=True, slots=True)
class Sweep:
    """One swept key and the values it takes, in the order given."""

    path: tuple[Step, ...]
    values: tuple[Value, ...]
    spec: str  # as the user wrote it, for error messages

    @property
    def key(self) -> str:
        """The key path in canonical spelling, e.g. ``models[1].parameters.weight``."""
        return format_path(self.path)

    @property
    def label(self) -> str:
        """A short name for variant names: ``models1.weight``, ``models.weight``, ``t``."""
        parts: list[str] = []
        for step in self.path:
            if isinstance(step, str):
                if step != "parameters":
                    parts.append(step)
            elif parts and step is not None:
                parts[-1] += str(step)
        return ".".join(parts) or _safe(self.key)


@dataclass(frozen=True, slots=True)
class Variant:
    """One point of the grid: a readable unique name, the config mapping, what was set."""

    name: str
    doc: dict[str, Any]
    settings: tuple[tuple[str, Value], ...]  # (key path, value) in sweep order


def format_path(path: tuple[Step, ...]) -> str:
    out = ""
    for step in path:
        if isinstance(step, str):
            out += f".{step}" if out else step
        else:
            out += "[*]" if step is None else f"[{step}]"
    return out


def parse_sweep(spec: str) -> Sweep:
    """``KEY=V1,V2,...`` -> Sweep; a malformed spec is a one-line ConfigError."""

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"--sweep {spec!r}: {msg}")

    key, eq, raw = spec.partition("=")
    key = key.strip()
    if not eq:
        raise fail(f"expected KEY=VALUE[,VALUE...], e.g. {EXAMPLE}")
    path: list[Step] = []
    for part in key.split("."):
        m = _SEGMENT.fullmatch(part.strip())
        if not m:
            raise fail(f"bad key path {key!r}; expected names and [index] like models[1].parameters.weight")
        path.append(m.group(1))
        for idx in _INDEX.findall(m.group(2)):
            path.append(None if idx == "*" else int(idx))
    values: list[Value] = []
    for token in raw.split(","):
        value = _value(token.strip(), fail)
        if any(type(v) is type(value) and v == value for v in values):
            raise fail(f"value {token.strip()} is listed twice")
        values.append(value)
    return Sweep(tuple(path), tuple(values), spec)


def _value(token: str, fail) -> Value:
    if not token:
        raise fail("empty value (values are separated by single commas)")
    if token.lower() in ("true", "false"):
        return token.lower() == "true"
    try:
        return int(token)
    except ValueError:
        pass
    try:
        x = float(token)
    except ValueError:
        return token
    if not math.isfinite(x):
        raise fail(f"value {token} is not a finite number")
    return x


def set_value(doc: dict[str, Any], sweep: Sweep, value: Value) -> dict[str, Any]:
    """A deep copy of ``doc`` with ``sweep``'s key set to ``value`` (``doc`` is untouched)."""
    if not isinstance(doc, dict):
        raise ConfigError(f"--sweep {sweep.spec!r}: the config is not a mapping of keys")
    out = copy.deepcopy(doc)
    _set(out, sweep.path, value, sweep, 0)
    return out


def _set(node: Any, path: tuple[Step, ...], value: Value, sweep: Sweep, depth: int) -> None:
    step, last = path[depth], depth == len(path) - 1
    where = format_path(path[:depth]) or "the config"

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"--sweep {sweep.spec!r}: {where}: {msg}")

    if isinstance(step, str):
        if not isinstance(node, dict):
            raise fail(f"expected a mapping to hold {step!r}, got {type(node).__name__} {node!r}")
        if last:
            node[step] = value
            return
        if step not in node or node[step] is None:
            if not isinstance(path[depth + 1], str):
                raise fail(f"has no {step!r} list to index")
            node[step] = {}
        _set(node[step], path, value, sweep, depth + 1)
        return
    if not isinstance(node, list):
        raise fail(f"expected a list to index, got {type(node).__name__} {node!r}")
    if step is not None and step >= len(node):
        raise fail(f"index {step} is out of range (the list has {len(node)} items)")
    for i in range(len(node)) if step is None else (step,):
        if last:
            node[i] = value
        else:
            _set(node[i], path, value, sweep, depth + 1)


def expand(doc: dict[str, Any], sweeps: list[Sweep] | tuple[Sweep, ...]) -> list[Variant]:
    """Every combination of the sweeps' values (the last sweep varies fastest), each with
    a unique readable name such as ``models1.weight=0.4_t=0.3`` (``~N`` is appended when
    two string values read the same once made safe for a file name). No sweeps: one variant,
    the config as written, named ``config``."""
    keys = [s.key for s in sweeps]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise ConfigError(f"--sweep {sweeps[i].spec!r}: key {key} is already swept")
    labels = [s.label for s in sweeps]
    if len(set(labels)) < len(labels):
        labels = [_safe(k) for k in keys]
    variants = []
    for combo in itertools.product(*(s.values for s in sweeps)):
        out = doc
        for s, v in zip(sweeps, combo):
            out = set_value(out, s, v)
        if not sweeps:
            out = copy.deepcopy(doc)
        name = "_".join(f"{lab}={_safe(_text(v))}" for lab, v in zip(labels, combo)) or "config"
        seen = sum(1 for v in variants if v.name == name or v.name.startswith(f"{name}~"))
        variants.append(Variant(f"{name}~{seen}" if seen else name, out, tuple(zip(keys, combo))))
    return variants


def _text(v: Value) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def _safe(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-") or "-"
