"""Layer stacks in tensor names, and the output tensors that a config's slices make.

A layer tensor's name holds its layer index as the first ``.N.`` (``model.layers.7.mlp...``,
``transformer.h.7.attn...``), mergekit's own rule for architectures it infers; the part
before it is the stack's prefix. ``routes`` turns the slices into one ``Route`` per
output tensor (reference §3.2): output layers count up from 0 across slices, the k-th
layer of a slice reads layer ``first + k`` of each source, and its gradient position is
``k / (L - 1)``. Non-layer tensors get t = 0; embeddings come from the first slice's
sources and the other non-layer tensors (final norm, lm_head) from the last slice's, as
mergekit's architecture definitions place them. The ``models:`` form is one slice over
every layer, and keeps the donor's tensor order. Pure functions of names; no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import MergeConfig
from .params import layer_t

LAYER = re.compile(r"^(.*?\.)(\d+)\.(.+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True, slots=True)
class Route:
    """Where one output tensor comes from."""

    name: str  # the output tensor
    slice: int  # index into MergeConfig.slices
    inputs: tuple[str, ...]  # the input tensor's name in each source of the slice
    t: float  # gradient position


@dataclass(frozen=True, slots=True)
class Routing:
    routes: tuple[Route, ...]  # in output order
    layer_sources: tuple[int, ...]  # per output layer: the layer of the slice's first source it reads
    problems: tuple[str, ...]  # "<key path>: <what>" lines
    skip: frozenset[str]  # models whose tensors are not worth checking one by one


def split(name: str) -> tuple[str, int, str] | None:
    """``model.layers.7.mlp.up_proj.weight`` -> ("model.layers.", 7, "mlp.up_proj.weight")."""
    m = LAYER.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def stacks(names) -> dict[str, int]:
    """Layer stack prefix -> number of layers (highest index + 1)."""
    out: dict[str, int] = {}
    for name in names:
        parts = split(name)
        if parts:
            out[parts[0]] = max(out.get(parts[0], 0), parts[1] + 1)
    return out


def is_embedding(name: str) -> bool:
    """Pre-weights: token and position embeddings (Llama ``embed_tokens``, GPT-2 ``wte``)."""
    return "embed" in name or name.split(".")[-2:-1] in (["wte"], ["wpe"])


def routes(cfg: MergeConfig, names: dict[str, list[str]]) -> Routing:
    """The output tensors of ``cfg`` given each opened model's tensor names (in file
    order); models missing from ``names`` failed to open and are skipped."""
    if cfg.frankenmerge:
        return _slice_routes(cfg, names)
    return _model_routes(cfg, names)


def _model_routes(cfg: MergeConfig, names: dict[str, list[str]]) -> Routing:
    sl = cfg.slices[0]
    donor = names[cfg.donor]
    counts = stacks(donor)
    problems, skip = [], set()
    for m in sl.sources:
        if m.model != cfg.donor and m.model in names and stacks(names[m.model]) != counts:
            key = f"{m.key}.model" if m.key != "base_model" else "base_model"
            problems.append(f"{key}: {m.model} has {_layers(stacks(names[m.model]))}, {cfg.donor} has"
                            f" {_layers(counts)}; models: merges models of equal depth (use slices:)")  # fmt: skip
            skip.add(m.model)
    out = []
    for name in donor:
        parts = split(name)
        t = layer_t(parts[1], counts[parts[0]]) if parts else 0.0
        out.append(Route(name, 0, (name,) * len(sl.sources), t))
    layer_sources = tuple(range(max(counts.values(), default=0))) if len(counts) == 1 else ()
    return Routing(tuple(out), layer_sources, tuple(problems), frozenset(skip))


def _slice_routes(cfg: MergeConfig, names: dict[str, list[str]]) -> Routing:
    donor = names[cfg.donor]
    counts = stacks(donor)
    problems: list[str] = []
    if len(counts) != 1:
        what = "no numbered layers" if not counts else f"{len(counts)} layer stacks ({', '.join(counts)})"
        return Routing((), (), (f"slices: {cfg.donor} has {what}; slices need exactly one",), frozenset())
    (prefix,) = counts
    bad = False
    for sl in cfg.slices:
        for m in sl.sources:
            if m.model not in names:
                continue
            n = stacks(names[m.model]).get(prefix, 0)
            a, b = m.layer_range
            if b > n:
                problems.append(f"{m.key}.layer_range: {[a, b]} reaches past the last layer of {m.model},"
                                f" which has {n} layers (0 to {n - 1})")  # fmt: skip
                bad = True
    if bad or any(m.model not in names for sl in cfg.slices for m in sl.sources):
        return Routing((), (), tuple(problems), frozenset())
    layer_names = {model: _by_layer(ns, prefix) for model, ns in names.items()}
    pre = [
        Route(n, 0, (n,) * len(cfg.slices[0].sources), 0.0) for n in donor if not split(n) and is_embedding(n)
    ]
    post = [Route(n, len(cfg.slices) - 1, (n,) * len(cfg.slices[-1].sources), 0.0)
            for n in donor if not split(n) and not is_embedding(n)]  # fmt: skip
    layers, layer_sources = [], []
    for s, sl in enumerate(cfg.slices):
        first = [m.layer_range[0] for m in sl.sources]
        n_layers = sl.n_layers
        for k in range(n_layers):
            out = len(layer_sources)
            for rest in layer_names[sl.sources[0].model].get(first[0] + k, []):
                inputs = tuple(f"{prefix}{a + k}.{rest}" for a in first)
                layers.append(Route(f"{prefix}{out}.{rest}", s, inputs, layer_t(k, n_layers)))
            layer_sources.append(first[0] + k)
    return Routing(tuple(pre + layers + post), tuple(layer_sources), tuple(problems), frozenset())


def _by_layer(names: list[str], prefix: str) -> dict[int, list[str]]:
    """Layer index -> the rest of each of its tensor names, in file order."""
    out: dict[int, list[str]] = {}
    for name in names:
        parts = split(name)
        if parts and parts[0] == prefix:
            out.setdefault(parts[1], []).append(parts[2])
    return out


def _layers(counts: dict[str, int]) -> str:
    if len(counts) == 1:
        return f"{next(iter(counts.values()))} layers"
    return ", ".join(f"{n} layers in {p}" for p, n in counts.items()) or "no layers"


def config_updates(donor_config: dict | None, layer_sources: tuple[int, ...]) -> dict:
    """Keys to change in the donor's config.json so it describes the layers written: the
    layer count (and a per-layer ``layer_types`` list, remapped)."""
    if not donor_config or not layer_sources:
        return {}
    out = {key: len(layer_sources) for key in LAYER_COUNT_KEYS if isinstance(donor_config.get(key), int)}
    types = donor_config.get("layer_types")
    n_donor = next((donor_config[k] for k in LAYER_COUNT_KEYS if isinstance(donor_config.get(k), int)), None)
    if isinstance(types, list) and len(types) == n_donor and all(i < len(types) for i in layer_sources):
        out["layer_types"] = [types[i] for i in layer_sources]
    return out
