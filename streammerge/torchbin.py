"""PyTorch ``.bin`` checkpoints -> ``{name: TensorRef}`` without reading their weights.

A ``torch.save`` file is an uncompressed zip: ``data.pkl`` plus one stored record per
storage (``<archive>/data/<key>``). ``torch.load(mmap=True, weights_only=True)`` maps the
file and unpickles only ``data.pkl``; each tensor's storage then points into the mapping,
so its data pointer minus the mapping's base is the record's offset in the file. We
check that against the zip directory and keep plain ``TensorRef``s: the executor reads
them with ``os.preadv`` like safetensors, in bounded memory, and the mapping is dropped.
Accepted: ``pytorch_model.bin``, shards with ``pytorch_model.bin.index.json`` or
without, a single ``.bin`` file. Torch is imported here only.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from .checkpoint import FileFingerprint, TensorRef
from .errors import CheckpointError

BIN_INDEX = "pytorch_model.bin.index.json"


def open_torch_checkpoint(p: Path) -> tuple[dict[str, TensorRef], tuple[FileFingerprint, ...]]:
    if p.is_file():
        files = [p]
    elif (p / BIN_INDEX).is_file():
        try:
            weight_map = json.loads((p / BIN_INDEX).read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{p / BIN_INDEX}: unreadable index: {e}") from None
        files = [p / n for n in names if Path(n).name == n]
        missing = [f for f in files if not f.is_file()]
        if missing or len(files) != len(names):
            raise CheckpointError(f"{missing[0] if missing else p}: listed in {BIN_INDEX} but missing")
    elif (p / "pytorch_model.bin").is_file():
        files = [p / "pytorch_model.bin"]
    else:
        files = sorted(f for f in p.glob("*.bin") if f.name != "training_args.bin")
    tensors: dict[str, TensorRef] = {}
    prints = []
    for f in files:
        st = f.stat()
        prints.append(FileFingerprint(str(f), st.st_size, st.st_mtime_ns, 0))
        for name, ref in read_bin(f).items():
            if name in tensors:
                raise CheckpointError(f"{f}: tensor {name} is also in {tensors[name].path}")
            tensors[name] = ref
    return tensors, tuple(prints)


def read_bin(path: Path) -> dict[str, TensorRef]:
    """The tensors of one ``torch.save`` file, in its own order, as file ranges."""
    import torch

    from .methods.tensors import DTYPES

    codes = {d: c for c, d in DTYPES.items()}
    records = _records(path)
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad or unsafe pickle
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensor names to tensors")
    ptrs = {v.untyped_storage().data_ptr() for v in state.values() if v.numel()}
    # The lowest storage is the lowest record: every saved storage is referenced.
    base = min(ptrs) - min(records.values()) if ptrs else 0
    offsets = set(records.values())
    out = {}
    for name, t in state.items():
        if t.dtype not in codes:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {t.dtype}")
        if not t.is_contiguous():
            raise CheckpointError(f"{path}: tensor {name} is not contiguous; re-save it with .contiguous()")
        storage = t.untyped_storage().data_ptr() - base
        if t.numel() and storage not in offsets:
            raise CheckpointError(f"{path}: tensor {name}: storage not found in the zip records")
        offset = storage + t.storage_offset() * t.element_size()
        out[name] = TensorRef(str(path), offset, codes[t.dtype], tuple(t.shape))
    del state
    return out


def _records(path: Path) -> dict[str, int]:
    """Absolute file offset of each storage record's data (stored zip entries)."""
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            out = {}
            for info in z.infolist():
                parts = info.filename.split("/")
                if len(parts) < 3 or parts[-2] != "data":
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{path}: record {info.filename} is compressed")
                f.seek(info.header_offset)
                local = f.read(30)
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                out[parts[-1]] = info.header_offset + 30 + name_len + extra_len
            return out
    except zipfile.BadZipFile:
        raise CheckpointError(
            f"{path}: not a zip-format torch.save file (legacy .bin format); re-save it with torch>=1.6"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
