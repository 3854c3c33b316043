"""header: byte-identical encoding to safetensors.torch.save_file, strict parsing."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge.errors import CheckpointError
from streammerge.header import encode_header, parse_header, read_header

CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
         torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8",
         torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}  # fmt: skip

# "__metadata__" is the header's metadata key, never a tensor name
names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12).filter(
    lambda n: n != "__metadata__"
)
tensors = st.dictionaries(
    names,
    st.tuples(st.sampled_from(list(CODES)), st.lists(st.integers(0, 4), max_size=3)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(tensors)
def test_encode_header_matches_save_file(tmp_path_factory, spec):
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    data = {n: torch.zeros(shape, dtype=dt) for n, (dt, shape) in spec.items()}
    safetensors.torch.save_file(data, path, metadata={"format": "pt"})
    prefix, infos = encode_header(
        [(n, CODES[dt], tuple(shape)) for n, (dt, shape) in spec.items()], {"format": "pt"}
    )
    raw = path.read_bytes()
    assert raw[: len(prefix)] == prefix
    assert read_header(path).tensors == infos


def _file(tmp_path, doc, data: bytes = b"", pad: bytes = b"") -> str:
    raw = json.dumps(doc).encode() + pad
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(p)


def entry(dtype="F32", shape=(2,), begin=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    "doc, data, message",
    [
        ({"a": entry()}, b"\0" * 4, "file has 73 bytes, header declares 77; truncated or corrupt download"),
        ({"a": entry(dtype="Q8")}, b"\0" * 8, "tensor a: unknown dtype 'Q8'"),
        ({"a": entry(end=6)}, b"\0" * 6, "tensor a: shape [2] of F32 needs 8 bytes, data_offsets span 6"),
        ({"a": entry(), "b": entry(begin=4, end=12)}, b"\0" * 12,
         "tensor b starts at byte 4, expected 8 (offsets must be contiguous)"),
        ({"a": entry(begin=8, end=16)}, b"\0" * 16, "tensor a starts at byte 8, expected 0 (offsets must be contiguous)"),
        ({"a": entry(shape=(-1,))}, b"", "tensor a: shape must be a list of non-negative integers"),
        ({"a": {"dtype": "F32"}}, b"", "tensor a: expected keys dtype, shape, data_offsets"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__ must map strings to strings"),
        ([1, 2], b"", "corrupt safetensors header: not a JSON object"),
    ],
)  # fmt: skip
def test_bad_headers_name_the_file_and_the_problem(tmp_path, doc, data, message):
    path = _file(tmp_path, doc, data)
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    assert str(e.value) == f"{path}: {message}"


def test_corrupt_json_and_lengths(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 10) + b'{"a": [1,,' + b"\0" * 8)
    with pytest.raises(
        CheckpointError, match=r"bad.safetensors: corrupt safetensors header: Expecting value"
    ):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(
        CheckpointError, match=r"header length 1099511627776 does not fit the file \(10 bytes\)"
    ):
        read_header(p)
    p.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"not a safetensors file \(3 bytes\)"):
        read_header(p)


def test_duplicate_names_and_nan_rejected():
    raw = b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    with pytest.raises(CheckpointError, match="duplicate key 'a'"):
        parse_header(raw, 8 + len(raw), "f")
    raw = b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}'
    with pytest.raises(CheckpointError, match="non-finite number NaN"):
        parse_header(raw, 8 + len(raw), "f")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 10_000))
def test_random_bytes_never_crash(raw, extra):
    try:
        parse_header(raw, 8 + len(raw) + extra, "fuzz")
    except CheckpointError:
        pass


def test_deeply_nested_json_is_an_error_not_a_crash():
    raw = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(CheckpointError):
        parse_header(raw, 8 + len(raw), "deep")
