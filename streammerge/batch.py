"""K merges over shared inputs in one read pass (``streammerge batch``, DESIGN.md §5).

Each member config is planned on its own; one whose config or inputs are wrong fails
alone (the summary names it) unless ``fail_fast``. Members whose plans list the same
tensors in the same order form a group. For every tensor the group reads the union of
its members' inputs once per chunk, and every member merges that chunk into its own
output, so K merges cost one read of the inputs plus K writes. One ``max_memory`` bounds
the whole batch: two read sets of the union, two write buffers per member, and one
compute scratch per compute thread (members merge side by side, ``streammerge.batch_pass``).
Output bytes are those of ``streammerge merge`` on each config alone: kernels are
chunk-, block- and thread-count independent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .batch_pass import Slot, run_group
from .config import MergeConfig, from_dict, load_config
from .errors import ConfigError, OutputError, StreamMergeError
from .execute import MergeSummary, _device, peak_rss
from .methods import parallel
from .plan import DEFAULT_SHARD_NBYTES, Plan, default_max_memory, make_plan
from .polite import UNLIMITED, IoLimits, be_nice
from .write import OutputWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Member:
    """One merge of a batch: an output name, its config (or config path), sweep values."""

    name: str
    config: MergeConfig | str | tuple  # a config, a YAML path, or (source, parsed mapping)
    values: dict = field(default_factory=dict)  # sweep key path -> value; {} if not swept

    def load(self) -> MergeConfig:
        if isinstance(self.config, MergeConfig):
            return self.config
        if isinstance(self.config, tuple):
            return from_dict(self.config[1], self.config[0])
        return load_config(self.config)


def members_from(configs: list[str], sweeps: list[str] | tuple[str, ...] = ()) -> list[Member]:
    """Batch members for config paths, each expanded by the ``--sweep`` specs into a grid
    (``streammerge.sweep``). Outputs are named after the config file, plus the swept
    values: ``linear-models1.weight=0.4``. A config that cannot be read stays one member,
    which fails when it is planned."""
    stems = [Path(c).stem for c in configs]
    names = [s if stems.count(s) == 1 else f"{s}-{i + 1}" for i, s in enumerate(stems)]
    if not sweeps:
        return [Member(n, str(c)) for n, c in zip(names, configs)]
    from .sweep import expand, parse_sweep

    parsed = [parse_sweep(s) for s in sweeps]
    members = []
    for name, path in zip(names, configs):
        try:
            doc = _yaml_doc(path)
        except ConfigError:
            members.append(Member(name, str(path)))
            continue
        for v in expand(doc, parsed):
            members.append(Member(f"{name}-{v.name}", (f"{path} [{v.name}]", v.doc), dict(v.settings)))
    return members


def _yaml_doc(path: str):
    """The parsed YAML mapping of a config file; errors are the config module's lines."""
    import yaml

    from .config import _UniqueKeyLoader, parse_config

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return load_config(path)  # raises its one-line ConfigError
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError:
        return parse_config(text, source=path)  # raises its one-line ConfigError


@dataclass(frozen=True, slots=True)
class BatchSummary:
    merged: dict[str, MergeSummary]  # name -> summary, in member order
    failed: dict[str, str]  # name -> the one-line error
    read_nbytes: int  # input bytes actually read (every group's shared passes)
    write_nbytes: int
    seconds: float

    def lines(self) -> list[str]:
        rows = [s.line() for s in self.merged.values()]
        rows += [f"failed {name}: {err}" for name, err in self.failed.items()]
        gb = 1e9
        rows.append(
            f"batch: {len(self.merged)} merged, {len(self.failed)} failed; read {self.read_nbytes / gb:.2f} GB"
            f" once, wrote {self.write_nbytes / gb:.2f} GB in {self.seconds:.1f} s"
        )
        return rows


def run_batch(
    members: list[Member],
    out_root: str | os.PathLike,
    *,
    max_memory: int = 0,
    shard_nbytes: int = DEFAULT_SHARD_NBYTES,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    copy_tokenizer: bool = True,
    fail_fast: bool = False,
    io: IoLimits = UNLIMITED,
) -> BatchSummary:
    """Merge every member into ``out_root/<name>``; members sharing tensors share reads."""
    started = time.perf_counter()
    if io.nice:
        be_nice()
    if threads:
        parallel.set_threads(threads)
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    budget = max_memory or default_max_memory()
    failed: dict[str, str] = {}

    def fail(name: str, e: BaseException) -> None:
        if fail_fast:
            raise e
        failed[name] = str(e)
        log.info("batch: %s failed: %s", name, e)

    plans: dict[str, Plan] = {}
    for m in members:
        try:
            cfg = m.load()
            plans[m.name] = make_plan(cfg, max_memory=budget, shard_nbytes=shard_nbytes, seed=seed)
        except StreamMergeError as e:
            fail(m.name, e)
    need = sum(p.layout.nbytes for p in plans.values())
    free = shutil.disk_usage(root).free
    if plans and free < need + (64 << 20):
        raise OutputError(f"{root}: not enough free space: the batch writes {need} bytes, {free} are free")
    groups: dict[tuple, list[str]] = {}
    for name, p in plans.items():
        groups.setdefault(tuple(j.name for j in p.jobs), []).append(name)
    dev = _device(device)
    merged: dict[str, MergeSummary] = {}
    read_total = 0
    for names in groups.values():
        slots = []
        for name in names:
            try:
                writer = OutputWriter(root / name, plans[name], force=force, copy_tokenizer=copy_tokenizer)
            except StreamMergeError as e:
                fail(name, e)
                continue
            slots.append(Slot(name, plans[name], writer, dev, time.perf_counter(), _rss()))
        if not slots:
            continue
        try:
            read_total += run_group(slots, budget, io, fail_fast, threads)
        except BaseException as e:
            for s in slots:
                _discard(s.writer)
            if fail_fast or not isinstance(e, (StreamMergeError, OSError)):
                raise
            for s in slots:
                s.error = s.error or str(e)
        for s in slots:
            if s.error is None:
                try:
                    s.writer.commit(s.writer.digests)
                    merged[s.name] = _summary(s, root)
                    continue
                except (StreamMergeError, OSError) as e:
                    s.error = str(e)
                    _discard(s.writer)
            fail(s.name, StreamMergeError(s.error))
    order = [m.name for m in members]
    return BatchSummary(
        {n: merged[n] for n in order if n in merged},
        {n: failed[n] for n in order if n in failed},
        read_total,
        sum(s.nbytes for s in merged.values()),
        time.perf_counter() - started,
    )


def _summary(s: Slot, root: Path) -> MergeSummary:
    p = s.plan
    return MergeSummary(
        str(root / s.name), p.estimate.write_nbytes, p.estimate.read_nbytes, time.perf_counter() - s.started,
        len(p.jobs), len(p.layout.shards), peak_rss(), s.start_rss, p.estimate.peak_nbytes, p.plan_hash,
    )  # fmt: skip


def _discard(writer: OutputWriter) -> None:
    """Drop a failed member's partial output (a batch has no --resume)."""
    writer.suspend()
    shutil.rmtree(writer.partial, ignore_errors=True)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def write_sweep_index(
    out_root: str | os.PathLike, members: list[Member], summary: BatchSummary
) -> Path | None:
    """``out_root/sweep.json``: each swept output's name -> its values (and whether it merged)."""
    swept = [m for m in members if m.values]
    if not swept:
        return None
    doc = {m.name: {"values": m.values, "merged": m.name in summary.merged} for m in swept}
    path = Path(out_root) / "sweep.json"
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path
