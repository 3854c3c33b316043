"""One output shard as the unit of distributed work (DESIGN.md §5).

A shard task is a pure function of ``(plan, shard index)``: it merges the tensors the
layout puts in that shard into ``OUT.partial/.streammerge/tmp/<file>.<attempt>``, fsyncs,
renames it to ``OUT.partial/<file>`` and drops a done-marker carrying the plan hash.
Output is deterministic, so a retried or duplicated task renames identical bytes over
identical bytes. ``finalize`` checks every marker and commits like a one-process merge
(index, config, manifest, then the rename to ``OUT/``). Saved plans (``--save-plan``)
hold the config and options, not the plan: a worker plans again from the headers and
refuses to run if the hash differs (inputs or streammerge changed).

Work folder, inside ``OUT.partial/``::

    .streammerge/plan.json                  the saved plan; its hash keys everything below
    .streammerge/attempts/<index>/<id>.json one per started attempt (the attempt cap counts these)
    .streammerge/tmp/<file>.<id>            a shard being written
    .streammerge/done/<file>.json           {plan_hash, file, nbytes, tensors: {name: digest}}
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from . import __version__
from .config import DTYPE_TORCH_NAMES, MergeConfig, from_dict, load_config
from .digest import tensor_hasher
from .errors import OutputError, ShardError
from .plan import DEFAULT_SHARD_NBYTES, Plan, make_plan
from .polite import UNLIMITED, IoLimits
from .write import OutputWriter, _fsync_dir, _pwrite_all, _Writeback, partial_dir

log = logging.getLogger(__name__)

WORK = ".streammerge"
PLAN_FORMAT = "streammerge-plan/1"
DEFAULT_MAX_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class ShardOptions:
    """How a shard task runs on its worker (none of it changes the output bytes)."""

    threads: int | None = None
    device: str = "cpu"
    io: IoLimits = UNLIMITED
    max_attempts: int = DEFAULT_MAX_ATTEMPTS


@dataclass(frozen=True, slots=True)
class SavedPlan:
    """A plan file read back and planned again: what ``run-shard`` and ``finalize`` need."""

    plan: Plan
    out: Path
    copy_tokenizer: bool
    force: bool


class WorkDir:
    """The ``OUT.partial/.streammerge`` folder of one output."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.partial = partial_dir(self.out)
        self.root = self.partial / WORK

    def marker(self, plan: Plan, index: int) -> dict | None:
        """The done-marker of shard ``index`` if it belongs to ``plan`` and its file is whole."""
        shard = plan.layout.shards[index]
        try:
            doc = json.loads((self.root / "done" / f"{shard.file_name}.json").read_text())
            size = (self.partial / shard.file_name).stat().st_size
        except (OSError, ValueError):
            return None
        if doc.get("plan_hash") != plan.plan_hash or size != shard.nbytes:
            return None
        return doc

    def done(self, plan: Plan) -> dict[int, dict]:
        markers = {i: self.marker(plan, i) for i in range(len(plan.layout.shards))}
        return {i: m for i, m in markers.items() if m is not None}

    def start_attempt(self, index: int) -> tuple[str, int]:
        """Record an attempt at shard ``index``; returns its id and the attempts so far."""
        folder = self.root / "attempts" / str(index)
        folder.mkdir(parents=True, exist_ok=True)
        attempt = uuid.uuid4().hex[:12]
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        _write_json(folder / f"{attempt}.json", info)
        return attempt, sum(1 for _ in folder.glob("*.json"))

    def attempts(self, index: int) -> int:
        return sum(1 for _ in (self.root / "attempts" / str(index)).glob("*.json"))


def portable(cfg: MergeConfig) -> MergeConfig:
    """The config with absolute model paths, so every worker (any cwd, any node with the
    same mounts) plans the same bytes and the same hash."""

    def absolute(path: str | None) -> str | None:
        return None if path in (None, "base") else os.path.abspath(path)

    models = tuple(replace(m, model=absolute(m.model)) for m in cfg.models)
    return replace(
        cfg,
        models=models,
        base_model=absolute(cfg.base_model),
        tokenizer_source=absolute(cfg.tokenizer_source),
    )


def prepare(
    plan: Plan, out: str | os.PathLike, *, force: bool, copy_tokenizer: bool, plan_options: dict
) -> WorkDir:
    """Create (or reopen, for the same plan) ``OUT.partial/.streammerge`` and write the
    plan file there. A partial output of another plan, or a non-empty ``OUT`` without
    ``force``, is an error."""
    out = Path(out).absolute()
    work = WorkDir(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"{out}: directory exists and is not empty; pass --force to replace it")
    if work.partial.exists():
        saved = _read_plan_doc(work.root / "plan.json") if (work.root / "plan.json").is_file() else None
        if saved is not None and saved.get("plan_hash") == plan.plan_hash:
            shutil.rmtree(work.root / "attempts", ignore_errors=True)  # a new run, a fresh attempt budget
        elif force:
            shutil.rmtree(work.partial)
        else:
            raise OutputError(
                f"{work.partial}: left by an unfinished merge of another plan;"
                " rerun with --force to discard it"
            )
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: output's parent directory does not exist")
    done = work.done(plan)
    need = sum(s.nbytes for i, s in enumerate(plan.layout.shards) if i not in done)
    free = shutil.disk_usage(parent).free
    if free < need + (64 << 20):
        raise OutputError(f"{parent}: not enough free space: the merge writes {need} bytes, {free} are free")
    for sub in ("done", "tmp", "attempts"):
        (work.root / sub).mkdir(parents=True, exist_ok=True)
    doc = {
        "format": PLAN_FORMAT,
        "streammerge_version": __version__,
        "plan_hash": plan.plan_hash,
        "out": str(out),
        "config": config_doc(plan.config),
        "source": plan.config.source,
        "seed": plan.seed,
        "copy_tokenizer": copy_tokenizer,
        "force": force,
        "shards": [s.file_name for s in plan.layout.shards],
        **plan_options,
    }
    _write_json(work.root / "plan.json", doc)
    return work


def config_doc(cfg: MergeConfig) -> dict:
    """``cfg`` as a mapping ``config.from_dict`` accepts (dtypes spelled as in YAML)."""
    doc = cfg.to_dict()
    for key in ("dtype", "out_dtype"):
        if doc[key] is not None:
            doc[key] = DTYPE_TORCH_NAMES[doc[key]]
    return doc


def save_plan(
    config,
    out: str | os.PathLike,
    path: str | os.PathLike,
    *,
    max_memory: int = 0,
    shard_nbytes: int = DEFAULT_SHARD_NBYTES,
    seed: int = 0,
    copy_tokenizer: bool = True,
    force: bool = False,
) -> Plan:
    """Plan ``config`` for output ``out`` (absolute paths), prepare ``OUT.partial/`` and
    write the plan file to ``path`` as well, for ``run-shard`` and ``finalize``."""
    cfg = portable(config if isinstance(config, MergeConfig) else load_config(config))
    plan = make_plan(cfg, max_memory=max_memory, shard_nbytes=shard_nbytes, seed=seed)
    options = {"max_memory": plan.estimate.max_memory, "shard_nbytes": shard_nbytes}
    work = prepare(plan, out, force=force, copy_tokenizer=copy_tokenizer, plan_options=options)
    if Path(path).absolute() != (work.root / "plan.json").absolute():
        Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work.root / "plan.json", path)
    return plan


def load_plan(path: str | os.PathLike, *, max_memory: int = 0) -> SavedPlan:
    """Read a plan file and plan again from the inputs' headers; the hash must match."""
    doc = _read_plan_doc(path)
    if doc is None:
        raise ShardError(
            f"{path}: not a streammerge plan file (made by: streammerge plan CONFIG OUT --save-plan)"
        )
    try:
        cfg = from_dict(doc["config"], doc.get("source", str(path)))
        plan = make_plan(
            cfg,
            max_memory=max_memory or doc["max_memory"],
            shard_nbytes=doc["shard_nbytes"],
            seed=doc["seed"],
        )
        saved = SavedPlan(plan, Path(doc["out"]), bool(doc["copy_tokenizer"]), bool(doc["force"]))
    except KeyError as e:
        raise ShardError(f"{path}: plan file lacks {e}") from None
    if plan.plan_hash != doc["plan_hash"]:
        raise ShardError(
            f"{path}: the inputs or streammerge changed since this plan was saved"
            f" (plan {plan.plan_hash}, saved {doc['plan_hash']}); plan again"
        )
    return saved


def _read_plan_doc(path) -> dict | None:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path}: plan file not found") from None
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == PLAN_FORMAT else None


def run_shard(plan: Plan, out: str | os.PathLike, index: int, options: ShardOptions | None = None) -> dict:
    """Write shard ``index`` of ``plan`` under ``OUT.partial/`` and return its done-marker.
    A shard already done for this plan is not written again."""
    options = options or ShardOptions()
    from .execute import _device, _run, peak_rss
    from .polite import be_nice

    if not 0 <= index < len(plan.layout.shards):
        raise ShardError(f"--shard {index}: the plan has shards 0 to {len(plan.layout.shards) - 1}")
    work = WorkDir(out)
    shard = plan.layout.shards[index]
    done = work.marker(plan, index)
    if done is not None:
        return done
    if finished(plan, out):
        return {"plan_hash": plan.plan_hash, "shard": index, "file": shard.file_name, "nbytes": shard.nbytes}
    attempt, n = work.start_attempt(index)
    if n > options.max_attempts:
        raise ShardError(
            f"shard {index} ({shard.file_name}): {n - 1} attempts already failed (cap {options.max_attempts});"
            f" see {work.root / 'attempts' / str(index)}, delete it to try again"
        )
    if options.io.nice:
        be_nice()
    if options.threads:
        from .methods import parallel

        parallel.set_threads(options.threads)
    started, start_rss = time.perf_counter(), _rss()
    sub = replace(plan, jobs=tuple(j for j in plan.jobs if j.shard == index))
    (work.root / "tmp").mkdir(parents=True, exist_ok=True)
    tmp = work.root / "tmp" / f"{shard.file_name}.{attempt}"
    target = _ShardFile(tmp, shard)
    try:
        _run(sub, target, _device(options.device), False, options.io)
        target.close()
        os.replace(tmp, work.partial / shard.file_name)
        _fsync_dir(work.partial)
    except BaseException:
        target.close(sync=False)
        tmp.unlink(missing_ok=True)
        raise
    marker = {
        "plan_hash": plan.plan_hash,
        "shard": index,
        "file": shard.file_name,
        "nbytes": shard.nbytes,
        "attempt": attempt,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "seconds": round(time.perf_counter() - started, 3),
        "start_rss": start_rss,
        "peak_rss": peak_rss(),
        "tensors": target.digests,
    }
    _write_json(work.root / "done" / f"{shard.file_name}.json", marker)
    return marker


def finalize(plan: Plan, out: str | os.PathLike, *, copy_tokenizer: bool = True, force: bool = False) -> None:
    """Check every shard's marker and header, then commit ``OUT.partial/`` to ``OUT/``."""
    out = Path(out).absolute()
    work = WorkDir(out)
    if not work.partial.is_dir() and finished(plan, out):
        return
    if not work.partial.is_dir():
        raise ShardError(f"{work.partial}: missing; nothing to finalize (was the plan saved for {out}?)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"{out}: directory exists and is not empty; pass --force to replace it")
    shards = plan.layout.shards
    done = work.done(plan)
    missing = [i for i in range(len(shards)) if i not in done]
    if missing:
        i = missing[0]
        raise ShardError(
            f"{out}: {len(missing)} of {len(shards)} shards are not done, first shard {i}"
            f" ({shards[i].file_name}); run streammerge run-shard PLAN --shard {i}"
        )
    digests: dict[str, str] = {}
    for i, shard in enumerate(shards):
        with open(work.partial / shard.file_name, "rb") as f:
            if f.read(len(shard.header)) != shard.header:
                raise ShardError(f"{work.partial / shard.file_name}: header differs from the plan's")
        digests.update(done[i]["tensors"])
    OutputWriter.adopt(out, plan, force=force, copy_tokenizer=copy_tokenizer).commit(digests)
    shutil.rmtree(out / WORK, ignore_errors=True)


def finished(plan: Plan, out: str | os.PathLike) -> bool:
    """Whether ``out`` already holds this plan's finished merge (so reruns are no-ops)."""
    from .write import MANIFEST

    try:
        return json.loads((Path(out) / MANIFEST).read_text())["plan_hash"] == plan.plan_hash
    except (OSError, ValueError, KeyError, TypeError):
        return False


class _ShardFile:
    """One shard written whole by one task: the ``write_chunk``/``digests`` side of
    ``OutputWriter`` for a single preallocated temp file."""

    def __init__(self, path: Path, shard) -> None:
        self.path = path
        self.done: dict[str, str] = {}  # tensors to skip (a shard task always writes them all)
        self.digests: dict[str, str] = {}
        self._hashers: dict[str, object] = {}
        self._writeback = _Writeback()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, shard.nbytes)
        _pwrite_all(self._fd, memoryview(shard.header), 0, path)

    def write_chunk(self, job, start: int, end: int, data: memoryview) -> None:
        from .header import ITEMSIZE

        offset = job.offset + start * ITEMSIZE[job.out_dtype]
        _pwrite_all(self._fd, data, offset, self.path)
        h = self._hashers.get(job.name) or self._hashers.setdefault(job.name, tensor_hasher())
        h.update(data)
        if end == job.numel:
            self.digests[job.name] = self._hashers.pop(job.name).hexdigest()
        try:
            self._writeback.wrote(self._fd, offset, len(data))
        except OSError as e:
            raise OutputError(f"{self.path}: write-back failed: {e.strerror}") from None

    def close(self, sync: bool = True) -> None:
        if self._fd < 0:
            return
        try:
            if sync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` to ``path`` atomically (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
