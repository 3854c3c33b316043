"""Output: shards preallocated in ``OUT.partial/``, bytes ``pwrite``n at planned offsets,
then config/tokenizer/index/manifest, fsync, and an atomic rename to ``OUT/``.

Nothing that loads as a model exists at ``OUT/`` until the merge is complete. The
manifest ``streammerge.json`` records the plan hash, the inputs' fingerprints and a
sha256 of every shard header and a digest (``digest``) of every tensor, which ``verify``
re-checks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from . import __version__
from .checkpoint import open_checkpoint
from .config import DTYPE_TORCH_NAMES
from .derive import Dequant
from .digest import DIGEST, tensor_hasher
from .errors import OutputError, WriteError
from .header import FLOAT_DTYPES
from .journal import JOURNAL, LOCK, Journal, Lock, describe_change, input_prints, read_journal, state

log = logging.getLogger(__name__)

MANIFEST = "streammerge.json"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)  # fmt: skip


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


class OutputWriter:
    """Owns ``OUT.partial/`` for one merge: preflight, lock, shard files, hashes, journal,
    commit.

    With ``resume``, a partial output that a stopped merge of the same plan left is
    continued: its journaled tensors are re-hashed and those that match are skipped
    (``done``); an ``OUT`` this plan already finished is left as it is (``complete``).
    """

    def __init__(
        self, out: Path, plan, *, force: bool = False, resume: bool = False, copy_tokenizer: bool = True
    ):
        self.out, self.plan, self.force, self.copy_tokenizer = out, plan, force, copy_tokenizer
        self.partial = partial_dir(out)
        self.digests: dict[str, str] = {}
        self.done: dict[str, str] = {}  # tensors a resumed merge skips: name -> digest
        self.complete = False
        self.journal: Journal | None = None
        self.lock: Lock | None = None
        self._hashers: dict[str, object] = {}
        self._fds: list[int] = []
        self._writeback = _Writeback()
        self.prints = input_prints(plan)
        self.state = state(plan, self.prints, plan.shard_nbytes)
        self._preflight(resume)
        if self.complete:
            return
        fresh = not self.partial.exists()
        try:
            self._open(resume)
        except BaseException:
            self._release()
            if fresh:
                shutil.rmtree(self.partial, ignore_errors=True)
            raise
        self.digests.update(self.done)

    @classmethod
    def adopt(cls, out: Path, plan, *, force: bool = False, copy_tokenizer: bool = True) -> OutputWriter:
        """A writer for an ``OUT.partial/`` whose shards shard tasks wrote and marked
        (``streammerge finalize``): holds the lock; ``commit`` adds the rest and renames."""
        self = cls.__new__(cls)
        self.out, self.plan, self.force, self.copy_tokenizer = out, plan, force, copy_tokenizer
        self.partial = partial_dir(out)
        self.digests, self.done, self.complete, self.journal = {}, {}, False, None
        self._hashers, self._fds, self._writeback = {}, [], _Writeback()
        self.prints = input_prints(plan)
        self.state = state(plan, self.prints, plan.shard_nbytes)
        self.lock = Lock(self.partial)
        return self

    def _preflight(self, resume: bool) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: exists and is not a directory")
        if resume and not self.partial.exists() and self._finished(out):
            self.complete = True
            return
        if out.is_dir() and any(out.iterdir()) and not self.force:
            raise OutputError(f"{out}: directory exists and is not empty; pass --force to replace it")
        parent = out.absolute().parent
        if not parent.is_dir():
            raise OutputError(f"{parent}: output's parent directory does not exist")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"{parent}: not writable")
        have = 0  # bytes the partial shards already hold on disk
        if resume and self.partial.is_dir():
            for shard in self.plan.layout.shards:
                path = self.partial / shard.file_name
                have += path.stat().st_blocks * 512 if path.is_file() else 0
        need = max(0, self.plan.layout.nbytes - have)
        free = shutil.disk_usage(parent).free
        if free < need + (64 << 20):
            raise OutputError(
                f"{parent}: not enough free space: the merge writes {need} bytes, {free} are free"
            )

    def _finished(self, out: Path) -> bool:
        """``out`` holds this very merge, finished (a resume after the commit's rename)."""
        manifest = _read_json(out / MANIFEST)
        if manifest is None or describe_change(manifest, self.state, "") is not None:
            return False
        try:  # a crash between the rename and the lock's removal leaves the lock file
            Lock(out).release(unlink=out / LOCK)
        except OutputError:
            return False
        return True

    def _open(self, resume: bool) -> None:
        p = self.partial
        head = None
        if p.exists():
            self.lock = Lock(p)
            head, done, good = read_journal(p)
            if not resume and not self.force:
                raise OutputError(
                    f"{p}: left by an unfinished merge ({len(done)} tensors done); rerun with"
                    " --resume to continue it or --force to discard it"
                )
            if resume and head is None:  # stopped between the journal's removal and the rename
                manifest = _read_json(p / MANIFEST)
                if manifest is not None and isinstance(manifest.get("tensors"), dict):
                    head, good = manifest, -1
                    done = {n: t.get(DIGEST) for n, t in manifest["tensors"].items()}
            if resume and head is not None:
                change = describe_change(head, self.state, "since the interrupted merge started")
                if change is not None:
                    raise OutputError(
                        f"{p}: cannot resume: {change}; run without --resume and with --force to start over"
                    )
            else:
                head = None
                for child in p.iterdir():  # --force, or nothing reusable: empty it
                    if child.name != LOCK:
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            p.mkdir()
            self.lock = Lock(p)
        for shard in self.plan.layout.shards:
            path = p / shard.file_name
            reuse = head is not None and path.is_file() and path.stat().st_size == shard.nbytes
            fd = os.open(path, os.O_RDWR | os.O_CREAT | (0 if reuse else os.O_TRUNC), 0o644)
            self._fds.append(fd)
            if not reuse:
                os.ftruncate(fd, shard.nbytes)
            _pwrite_all(fd, memoryview(shard.header), 0, path)
        if head is None:
            self.journal = Journal(p, self.state)
            return
        self.done = self._recheck(done)
        if good >= 0 and self.done == done:
            self.journal = Journal(p, None, keep_nbytes=good)
        else:  # rewrite it with just the tensors that checked out
            self.journal = Journal(p, self.state, done=self.done)
        log.info("resuming: %d of %d tensors already done", len(self.done), len(self.plan.jobs))

    def _recheck(self, done: dict[str, str]) -> dict[str, str]:
        """The journaled tensors whose bytes on disk still hash to their journal entry."""
        ok = {}
        for job in self.plan.jobs:
            if job.name not in done:
                continue
            fd, h, pos, end = self._fds[job.shard], tensor_hasher(), job.offset, job.offset + job.out_nbytes
            while pos < end:
                block = os.pread(fd, min(end - pos, 4 << 20), pos)
                if not block:
                    break
                h.update(block)
                pos += len(block)
            if h.hexdigest() == done[job.name]:
                ok[job.name] = done[job.name]
            else:
                log.warning("%s: journaled but its bytes differ; merging it again", job.name)
        return ok

    def write_chunk(self, job, start: int, end: int, data: memoryview) -> None:
        """Write elements ``[start, end)`` of ``job``'s tensor; chunks come in order."""
        from .header import ITEMSIZE

        fd = self._fds[job.shard]
        shard = self.partial / self.plan.layout.shards[job.shard].file_name
        offset = job.offset + start * ITEMSIZE[job.out_dtype]
        _pwrite_all(fd, data, offset, shard)
        h = self._hashers.get(job.name)
        if h is None:
            h = self._hashers[job.name] = tensor_hasher()
        h.update(data)
        try:
            self._writeback.wrote(fd, offset, len(data))
            if end == job.numel:
                self.digests[job.name] = self._hashers.pop(job.name).hexdigest()
                self.journal.finished(job.name, self.digests[job.name], fd, job.out_nbytes)
        except OSError as e:
            raise WriteError(f"{shard}: write-back failed: {e.strerror}") from None

    def commit(self, digests: dict[str, str]) -> None:
        plan = self.plan
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        now = state(plan, input_prints(plan), plan.shard_nbytes)
        change = describe_change(self.state, now, "during the merge")
        if change is not None:
            raise OutputError(
                f"{self.partial}: refusing to commit: {change}; run again with --force to start over"
            )
        shards = plan.layout.shards
        if len(shards) > 1:
            weight_map = {name: s.file_name for s in shards for name in s.tensors}
            index = {"metadata": {"total_size": plan.estimate.write_nbytes}, "weight_map": weight_map}
            _write_text(self.partial / INDEX, json.dumps(index, indent=2))
        self._write_config()
        if self.copy_tokenizer:
            self._copy_tokenizer()
        _write_text(self.partial / "README.md", self._model_card())
        _write_text(self.partial / MANIFEST, json.dumps(self._manifest(digests), indent=2) + "\n")
        if self.journal is not None:  # None when shard tasks wrote the shards (adopt)
            self.journal.close()
            (self.partial / JOURNAL).unlink()
        _fsync_dir(self.partial)
        old = None
        if self.out.exists():
            old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
            os.rename(self.out, old)
        os.rename(self.partial, self.out)
        _fsync_dir(self.out.absolute().parent)
        self.lock.release(unlink=self.out / LOCK)
        if old is not None:
            shutil.rmtree(old)

    def suspend(self) -> int:
        """Stop without committing: flush the journal, close the files, drop the lock.
        ``OUT.partial/`` stays for ``--resume``; returns how many tensors it will skip."""
        saved = len(self.done)
        if self.journal is not None:
            try:
                self.journal.flush()
            except OSError as e:
                log.warning("%s: journal flush failed: %s", self.partial, e.strerror)
            saved += self.journal.journaled
        self._release()
        return saved

    def _release(self) -> None:
        if self.journal is not None:
            self.journal.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self.lock is not None:
            self.lock.release()

    def _write_config(self) -> None:
        donor = open_checkpoint(self.plan.donor)
        if donor.config is None:
            return
        cfg = dict(donor.config) | self.plan.config_updates
        # config.json describes the tensors written (vocab size, tying, no quantisation).
        shapes = {j.name: j.shape for j in self.plan.jobs}
        if "model.embed_tokens.weight" in shapes and "vocab_size" in cfg:
            cfg["vocab_size"] = shapes["model.embed_tokens.weight"][0]
        if self.plan.untied:
            cfg["tie_word_embeddings"] = False
        if any(isinstance(t.derive, Dequant) for j in self.plan.jobs for t in j.inputs):
            cfg.pop("quantization_config", None)
        dtypes = {j.out_dtype for j in self.plan.jobs if j.out_dtype in FLOAT_DTYPES}
        if len(dtypes) == 1:
            name = DTYPE_TORCH_NAMES[dtypes.pop()]
            cfg["torch_dtype"] = name
            if "dtype" in cfg:  # transformers v5 spelling
                cfg["dtype"] = name
        _write_text(self.partial / "config.json", json.dumps(cfg, indent=2) + "\n")

    def _copy_tokenizer(self) -> None:
        from .vocab import write_tokenizer

        src = open_checkpoint(self.plan.tokenizer_from).directory
        write_tokenizer(self.plan.vocab, self.plan.chat_template, src, self.partial, TOKENIZER_FILES)

    def _model_card(self) -> str:
        cfg = self.plan.config
        models = "\n".join(f"- `{m.model}`" for m in cfg.models)
        return (
            f"---\ntags:\n- merge\n- streammerge\n---\n# Merged model\n\n"
            f"Made with streammerge {__version__} using `{cfg.merge_method}`"
            f"{f' on base `{cfg.base_model}`' if cfg.base_model else ''}.\n\n"
            f"## Models\n\n{models}\n\n## Configuration\n\n```json\n"
            f"{json.dumps(cfg.to_dict(), indent=2)}\n```\n"
        )

    def _manifest(self, digests: dict[str, str]) -> dict:
        plan = self.plan
        return {
            **self.state,
            "tensors": {
                j.name: {"shard": plan.layout.shards[j.shard].file_name, DIGEST: digests[j.name]}
                for j in plan.jobs
            },
        }


class _Writeback:
    """Streams written ranges to disk as the merge goes, instead of one long fsync at the
    end with nothing left to overlap it, and keeps the dirty/cached output (which counts
    against a cgroup's memory) bounded to about ``2 * window`` bytes.

    Each written range gets an asynchronous ``sync_file_range(WRITE)``; once a range is
    ``window`` bytes behind, we wait for it and drop it from the page cache. Where
    ``sync_file_range`` is missing (not Linux), ``fdatasync`` every ``window`` bytes.
    """

    WRITE, WAIT = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER

    def __init__(self, window: int = 128 << 20) -> None:
        self.window = window
        self.pending: list[tuple[int, int, int]] = []  # (fd, offset, nbytes), oldest first
        self.pending_nbytes = 0
        self._sfr = _sync_file_range()

    def wrote(self, fd: int, offset: int, nbytes: int) -> None:
        if self._sfr is not None:
            self._sfr(fd, offset, nbytes, self.WRITE)
        self.pending.append((fd, offset, nbytes))
        self.pending_nbytes += nbytes
        while self.pending_nbytes > self.window:
            fd, offset, nbytes = self.pending.pop(0)
            self.pending_nbytes -= nbytes
            if self._sfr is not None:
                self._sfr(fd, offset, nbytes, self.WAIT)
            else:
                os.fdatasync(fd)
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


def _sync_file_range():
    """libc's sync_file_range via ctypes, or None where it is not available."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def call(fd: int, offset: int, nbytes: int, flags: int) -> None:
        if fn(fd, offset, nbytes, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return call


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as e:
        raise WriteError(f"{path}: write failed at byte {offset + done}: {e.strerror}") from None


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
