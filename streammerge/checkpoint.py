"""A model on disk -> ``{name: TensorRef}``; read a range of one tensor's elements.

Accepted layouts: a directory with ``model.safetensors``; a directory with shards and
``model.safetensors.index.json``; a directory of ``*.safetensors`` shards without an
index; a single ``.safetensors`` file; PyTorch ``.bin`` files (``torchbin``). A model
reference may also be a Hugging Face hub ID in the local cache (``hub``) or
``base+adapter`` for a LoRA/PEFT adapter (``adapter``). F8 weights (and their scale
tensors) become BF16 tensors dequantised on read (``derive.Dequant``). ``config.json``
beside the weights is read for architecture facts. Only headers are read here: a
``Checkpoint`` costs kilobytes.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    derive: object | None = None  # a ``derive`` kind: the bytes are computed on read

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
    root: str = ""  # the local path ``path`` resolved to (a hub ID's snapshot; an adapter's base)

    @property
    def directory(self) -> Path:
        p = Path(self.root or self.path)
        return p if p.is_dir() else p.parent


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read the headers of the model at ``path`` (a directory, a file, a hub ID, or
    ``base+adapter``); every error names the file."""
    from .hub import resolve

    path = str(path)
    if "+" in path and not Path(path).exists():
        from .adapter import apply_adapter

        base_ref, adapter_ref = split_adapter(path)
        base = open_checkpoint(base_ref)
        return apply_adapter(base, path, resolve(adapter_ref))
    p = resolve(path)
    if p.is_file() and p.suffix == ".bin" or p.is_dir() and _is_torch_dir(p):
        from .torchbin import open_torch_checkpoint

        tensors, prints = open_torch_checkpoint(p)
        config = _read_config(p)
        return Checkpoint(path, _dequantised(tensors, config, p), config, prints, str(p))
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{path}: expected a .safetensors or .bin file or a model directory")
        files = [p]
    elif (p / INDEX_NAME).exists():
        files = _files_from_index(p)
    elif (p / "model.safetensors").exists():
        files = [p / "model.safetensors"]
    else:
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors or .bin weights found")
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
    config = _read_config(p)
    return Checkpoint(path, _dequantised(tensors, config, p), config, tuple(prints), str(p))


def split_adapter(ref: str) -> tuple[str, str]:
    """``base+adapter`` -> (base, adapter); mergekit allows exactly one ``+``."""
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise CheckpointError(f"{ref}: expected BASE+ADAPTER with exactly one '+'")
    return parts[0], parts[1]


def _is_torch_dir(p: Path) -> bool:
    return not any(p.glob("*.safetensors")) and any(p.glob("*.bin"))


F8_DTYPES = ("F8_E4M3", "F8_E5M2")


def _dequantised(tensors: dict[str, TensorRef], config: dict | None, where: Path) -> dict[str, TensorRef]:
    """F8 weights -> BF16 refs dequantised on read; their scale tensors (``X_scale``,
    ``X_scale_inv``) and activation scales (``*.input_scale``) are consumed, not merged."""
    if not any(t.dtype in F8_DTYPES for t in tensors.values()):
        return tensors
    from .derive import Dequant

    quant = (config or {}).get("quantization_config") or {}
    block_size = quant.get("weight_block_size")
    out, used = {}, set()
    for name, t in tensors.items():
        if t.dtype not in F8_DTYPES:
            continue
        scale = tensors.get(name + "_scale_inv") or tensors.get(name + "_scale")
        block = None
        if scale is not None:
            used.add(name + ("_scale_inv" if name + "_scale_inv" in tensors else "_scale"))
            block = _scale_block(where, name, t.shape, scale.shape, block_size)
        out[name] = TensorRef(t.path, t.offset, "BF16", t.shape, Dequant(t, scale, block))
    dropped = used | {n for n in tensors if n.endswith(".input_scale")}
    return {n: out.get(n, t) for n, t in tensors.items() if n not in dropped}


def _scale_block(where, name, shape, scale_shape, block_size) -> tuple[int, int] | None:
    """None for a scalar or per-row scale; (rows, cols) per block for a 2-D block grid."""
    n = math.prod(scale_shape)
    if n == 1 or (len(shape) >= 1 and n == shape[0] and len(scale_shape) <= 2):
        return None
    if len(shape) == 2 and len(scale_shape) == 2:
        br, bc = block_size or (-(-shape[0] // scale_shape[0]), -(-shape[1] // scale_shape[1]))
        if (-(-shape[0] // br), -(-shape[1] // bc)) == tuple(scale_shape):
            return (br, bc)
    raise CheckpointError(
        f"{where}: tensor {name}: F8 scale of shape {list(scale_shape)} does not fit weight"
        f" {list(shape)} (expected a scalar, one per row, or a block grid)"
    )


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


_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; Python 3.11 lacks the name


class Reader:
    """Reads element ranges of tensors into caller-owned buffers with ``os.preadv``, or
    maps them (``map``) so that a merge reads the page cache's own pages, with no copy.

    Keeps one read-only descriptor per file; not thread-safe across instances' close.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open: {e.strerror}") from None
        return fd

    def map(self, ref: TensorRef, start: int, stop: int) -> np.ndarray | None:
        """Elements ``[start, stop)`` of ``ref`` as bytes of a private mapping of its file,
        every page faulted in now (MADV_POPULATE_READ, so the merge that reads them does
        not stop on faults); None where the data is not aligned to its dtype in the file
        (``read`` copies those). The mapping goes when the last view of it does."""
        assert ref.derive is None, "derived inputs are read through derive.read_derived"
        itemsize = ITEMSIZE[ref.dtype]
        offset, want = ref.offset + start * itemsize, (stop - start) * itemsize
        if offset % itemsize or want == 0:
            return None
        fd = self._fd(ref.path)
        if os.fstat(fd).st_size < offset + want:  # a mapping past the end would SIGBUS
            raise CheckpointError(
                f"{ref.path}: file ends before byte {offset + want}; it changed or was truncated during the merge"
            )
        page = offset - offset % mmap.ALLOCATIONGRANULARITY
        # copy-on-write: writable views (torch wants them) that never write to the file
        mapped = mmap.mmap(fd, offset + want - page, access=mmap.ACCESS_COPY, offset=page)
        with contextlib.suppress(OSError):  # an older kernel: pages fault in as they are read
            mapped.madvise(_POPULATE_READ)
        return np.frombuffer(mapped, np.uint8, want, offset - page)

    def read(self, ref: TensorRef, start: int, stop: int, out: memoryview) -> None:
        """Fill ``out`` (exactly ``(stop - start) * itemsize`` bytes) with elements
        ``[start, stop)`` of ``ref``."""
        assert ref.derive is None, "derived inputs are read through derive.read_derived"
        itemsize = ITEMSIZE[ref.dtype]
        want = (stop - start) * itemsize
        assert len(out) == want, (len(out), want)
        fd = self._fd(ref.path)
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
