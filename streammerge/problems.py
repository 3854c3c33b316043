"""What is wrong with a plan's inputs, found in one pass and reported together.

Architectures that differ from the donor's, layer counts, tensors missing or shaped
differently, parameters no filter resolves, filters that match nothing. Problems of
one kind in one place are grouped: the first found speaks for the group and a count
says how many more tensors share it, so a missing layer is one line, not nine.
"""

from __future__ import annotations

from .checkpoint import Checkpoint
from .config import MergeConfig
from .errors import ConfigError, ShapeError, StreamMergeError
from .params import filters


class Findings:
    """Problems grouped by kind and place: the first one found speaks for the group, and
    a count says how many more tensors share it (a missing layer is one line, not nine)."""

    def __init__(self, cfg: MergeConfig) -> None:
        self.cfg = cfg
        self.groups: dict[tuple, list[str]] = {}

    def add(self, group: tuple, line: str) -> None:
        self.groups.setdefault(group, []).append(line)

    def errors(self) -> list[StreamMergeError]:
        out = []
        for (kind, *_), lines in self.groups.items():
            n = len(lines) - 1
            more = f" (and {n} more tensor{'s' if n > 1 else ''})" if n else ""
            cls = ConfigError if kind in ("layers", "param", "filter") else ShapeError
            out.append(cls(lines[0] + more))
        return out


def architecture_problems(cfg: MergeConfig, ckpts: dict[str, Checkpoint], checks: Findings) -> list[str]:
    """Models whose config.json names another architecture than the donor's."""
    want = (ckpts[cfg.donor].config or {}).get("architectures")
    bad = []
    for m in cfg.models:
        c = ckpts.get(m.model)
        got = (c.config or {}).get("architectures") if c else None
        if want and got and got != want:
            key = f"{m.key}.model" if m.key != "base_model" else "base_model"
            checks.add(("arch", m.model), f"{cfg.source}: {key}: {m.model} is a {'/'.join(got)}, {cfg.donor}"
                       f" is a {'/'.join(want)}; merge models of one architecture")  # fmt: skip
            bad.append(m.model)
    return bad


def extra_tensor_problems(cfg, ckpts, skip, checks) -> None:
    """models: form: a tensor some model has and the donor lacks would be dropped."""
    ref = ckpts[cfg.donor].tensors
    first_holder: dict[str, str] = {}
    for m in cfg.models:
        if m.model in ckpts and m.model not in skip:
            for name in ckpts[m.model].tensors:
                if name not in ref:
                    first_holder.setdefault(name, m.model)
    for name, holder in first_holder.items():
        checks.add(("missing", cfg.donor), f"{cfg.donor}: tensor {name} is missing (it is in {holder})")


def unmatched_filters(cfg: MergeConfig, routing, checks: Findings) -> None:
    """A filter that matches no tensor of the merge is a typo (mergekit ignores it)."""
    names = {n for r in routing.routes for n in (r.name, *r.inputs)}
    if not names:
        return
    levels = {lv.key: lv for sl in cfg.slices for m in (None, *sl.sources) for lv in cfg.levels(sl, m)}
    for lv in levels.values():
        for pname, setting in lv.settings.items():
            for i, flt in filters(setting):
                if not any(flt in n for n in names):
                    key = f"{lv.key}.{pname}[{i}].filter"
                    checks.add(
                        ("filter", key), f"{cfg.source}: {key}: {flt!r} matches no tensor of this merge"
                    )
