"""The safetensors format: dtype table, parse + validate a header, encode one.

A file is ``u64 little-endian N`` + ``N`` bytes of JSON + the tensor data. Everything a
file can get wrong is checked here, once, so later rooms can trust a ``Header``.
``encode_header`` produces the bytes ``safetensors.torch.save_file`` writes for the same
tensors and metadata: tensors sorted by dtype (the Rust enum order, widest first) then
name, compact JSON with ``__metadata__`` first, space-padded to a multiple of 8.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from .errors import CheckpointError

# code -> itemsize in bytes
ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "F64": 8, "I64": 8, "U64": 8,
}  # fmt: skip
# Position in safetensors' Rust ``Dtype`` enum; save_file writes higher ranks first.
_RANK = {code: i for i, code in enumerate(
    ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
     "I32", "U32", "F32", "F64", "I64", "U64"]
)}  # fmt: skip
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
MAX_HEADER_NBYTES = 100_000_000  # the limit safetensors itself enforces


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor as the header declares it; offsets are relative to the data start."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class Header:
    metadata: dict[str, str] | None
    tensors: dict[str, TensorInfo]  # in file (offset) order
    data_offset: int  # 8 + N: where tensor data starts in the file
    file_nbytes: int


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of the safetensors file at ``path``."""
    try:
        with open(path, "rb") as f:
            file_nbytes = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({file_nbytes} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_NBYTES or 8 + n > file_nbytes:
                raise CheckpointError(
                    f"{path}: header length {n} does not fit the file ({file_nbytes} bytes);"
                    " truncated or not a safetensors file"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None
    return parse_header(raw, file_nbytes, str(path))


def _no_duplicates(pairs: list) -> dict:
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name}")


def parse_header(raw: bytes, file_nbytes: int, where: str) -> Header:
    """Validate header JSON ``raw`` of a file of ``file_nbytes`` bytes; errors name ``where``."""
    try:
        obj = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: corrupt safetensors header: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header: not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    infos = [(name, _tensor_info(where, name, entry)) for name, entry in obj.items()]
    infos.sort(key=lambda item: (item[1].begin, item[1].end))
    data_offset = 8 + len(raw)
    expected = 0
    for name, info in infos:
        if info.begin != expected:
            raise CheckpointError(
                f"{where}: tensor {name} starts at byte {info.begin}, expected {expected}"
                " (offsets must be contiguous)"
            )
        expected = info.end
    if data_offset + expected != file_nbytes:
        raise CheckpointError(
            f"{where}: file has {file_nbytes} bytes, header declares"
            f" {data_offset + expected}; truncated or corrupt download"
        )
    return Header(metadata, dict(infos), data_offset, file_nbytes)


def _tensor_info(where: str, name: str, entry: object) -> TensorInfo:
    bad = f"{where}: tensor {name}:"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{bad} expected keys dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEMSIZE:
        raise CheckpointError(f"{bad} unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise CheckpointError(f"{bad} shape must be a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_uint(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{bad} data_offsets must be [begin, end] with begin <= end")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    if info.numel * ITEMSIZE[dtype] != info.nbytes:
        raise CheckpointError(
            f"{bad} shape {list(shape)} of {dtype} needs {info.numel * ITEMSIZE[dtype]}"
            f" bytes, data_offsets span {info.nbytes}"
        )
    return info


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


def encode_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, dict[str, TensorInfo]]:
    """Lay out ``(name, dtype, shape)`` tensors as ``save_file`` would.

    Returns the full prefix (8-byte length + padded JSON) and each tensor's
    ``TensorInfo`` in file order. Data offsets are relative to the end of the prefix.
    """
    ordered = sorted(tensors, key=lambda t: (-_RANK[t[1]], t[0]))
    infos: dict[str, TensorInfo] = {}
    doc: dict[str, object] = {}
    if metadata is not None:
        doc["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in ordered:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        infos[name] = TensorInfo(dtype, tuple(shape), offset, offset + nbytes)
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, infos
