"""checkpoint.Reader: mapped ranges are the bytes preadv reads; what it cannot map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from streammerge.checkpoint import Reader, TensorRef, open_checkpoint
from streammerge.errors import CheckpointError


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "m.safetensors"
    t = torch.arange(300_000, dtype=torch.float32).to(torch.bfloat16)
    save_file({"a": torch.ones(3, dtype=torch.int8), "t": t}, str(path))
    return path, t


def _ref(path, name="t") -> TensorRef:
    return open_checkpoint(path).tensors[name]


def test_mapped_bytes_are_the_read_bytes(shard):
    path, t = shard
    ref, reader = _ref(path), Reader()
    for start, stop in [(0, 300_000), (1, 2), (4095, 70_001), (299_999, 300_000)]:
        mapped = reader.map(ref, start, stop)
        copied = np.empty((stop - start) * 2, np.uint8)
        reader.read(ref, start, stop, memoryview(copied))
        assert mapped is not None and mapped.tobytes() == copied.tobytes()
        assert torch.equal(torch.from_numpy(mapped).view(torch.bfloat16), t[start:stop])
    reader.close()


def test_unaligned_data_is_not_mapped(shard):
    path, _ = shard
    ref = _ref(path)
    odd = TensorRef(ref.path, ref.offset + 1, ref.dtype, ref.shape)  # a bf16 at an odd byte
    assert Reader().map(odd, 0, 10) is None


def test_a_truncated_file_is_an_error_not_a_bus_error(shard):
    path, _ = shard
    ref = _ref(path)
    with open(path, "r+b") as f:
        f.truncate(ref.offset + 1000)
    with pytest.raises(CheckpointError, match="truncated"):
        Reader().map(ref, 0, 300_000)
