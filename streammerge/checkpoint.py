"""A model on disk -> ``{name: TensorRef}``; read a range of one tensor's elements.

Accepted layouts: a directory with ``model.safetensors``; a directory with shards and
``model.safetensors.index.json``; a directory of ``*.safetensors`` shards without an
index; a single ``.safetensors`` file. ``config.json`` beside the weights is read for
architecture facts. Only headers are read here: a ``Checkpoint`` costs kilobytes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .header import ITEMSIZE, read_header

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class TensorRef:
    """Where one tensor's bytes live: ``nbytes`` bytes at absolute ``offset`` in ``path``."""

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass(frozen=True, slots=True)
class FileFingerprint:
    path: str
    nbytes: int
    mtime_ns: int
    header_nbytes: int


@dataclass(frozen=True, slots=True)
class Checkpoint:
    path: str  # the directory (or file) as given
    tensors: dict[str, TensorRef]  # in the model's own order: shard by shard, by offset
    config: dict | None  # config.json, if present
    files: tuple[FileFingerprint, ...]

    @property
    def directory(self) -> Path:
        p = Path(self.path)
        return p if p.is_dir() else p.parent


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read the headers of the model at ``path``; every error names the file."""
    path = str(path)
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{path}: expected a .safetensors file or a model directory")
        files = [p]
    elif (p / INDEX_NAME).exists():
        files = _files_from_index(p)
    elif (p / "model.safetensors").exists():
        files = [p / "model.safetensors"]
    else:
        files = sorted(p.glob("*.safetensors"))
        if not files:
            bins = sorted(q.name for q in p.glob("*.bin"))
            hint = f" (found {bins[0]}: .bin checkpoints are not supported yet)" if bins else ""
            raise CheckpointError(f"{path}: no .safetensors weights found{hint}")
    tensors: dict[str, TensorRef] = {}
    prints = []
    for f in files:
        header = read_header(f)
        st = f.stat()
        prints.append(FileFingerprint(str(f), st.st_size, st.st_mtime_ns, header.data_offset))
        for name, info in header.tensors.items():
            if name in tensors:
                raise CheckpointError(f"{f}: tensor {name} is also in {tensors[name].path}")
            tensors[name] = TensorRef(str(f), header.data_offset + info.begin, info.dtype, info.shape)
    index_map = _index_map(p) if p.is_dir() and (p / INDEX_NAME).exists() else None
    if index_map is not None:
        for name, shard in index_map.items():
            ref = tensors.get(name)
            if ref is None or Path(ref.path).name != shard:
                raise CheckpointError(
                    f"{p / shard}: index lists tensor {name} in this shard, its header lacks it"
                )
    return Checkpoint(path, tensors, _read_config(p), tuple(prints))


def _index_map(directory: Path) -> dict[str, str]:
    index = directory / INDEX_NAME
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: unreadable index: {e}") from None
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ("..", "."):
            raise CheckpointError(f"{index}: shard name {shard!r} must be a plain file name")
    return weight_map


def _files_from_index(directory: Path) -> list[Path]:
    shards = sorted(set(_index_map(directory).values()))
    missing = [s for s in shards if not (directory / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{directory / missing[0]}: listed in {INDEX_NAME} but missing"
            f" ({len(missing)} of {len(shards)} shards missing)"
        )
    return [directory / s for s in shards]


def _read_config(p: Path) -> dict | None:
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    if not cfg.is_file():
        return None
    try:
        doc = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg}: unreadable config.json: {e}") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object")
    return doc


class Reader:
    """Reads element ranges of tensors into caller-owned buffers with ``os.preadv``.

    Keeps one read-only descriptor per file; not thread-safe across instances' close.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def read(self, ref: TensorRef, start: int, stop: int, out: memoryview) -> None:
        """Fill ``out`` (exactly ``(stop - start) * itemsize`` bytes) with elements
        ``[start, stop)`` of ``ref``."""
        itemsize = ITEMSIZE[ref.dtype]
        want = (stop - start) * itemsize
        assert len(out) == want, (len(out), want)
        fd = self._fds.get(ref.path)
        if fd is None:
            try:
                fd = self._fds[ref.path] = os.open(ref.path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{ref.path}: cannot open: {e.strerror}") from None
        offset = ref.offset + start * itemsize
        done = 0
        while done < want:
            n = os.preadv(fd, [out[done:]], offset + done)
            if n == 0:
                raise CheckpointError(
                    f"{ref.path}: file ended at byte {offset + done}, expected {offset + want};"
                    " it changed or was truncated during the merge"
                )
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
