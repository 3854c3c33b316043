"""verify: any flipped byte of any shard is found and named; --against ties an output to a
config and to the inputs as they are now."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from conftest import linear_config, write_config

import streammerge
from streammerge.header import read_header


@pytest.fixture(scope="module")
def merged(tiny, tmp_path_factory):
    """A 6-shard linear merge of the TINY models and its config."""
    root = tmp_path_factory.mktemp("verify")
    cfg = write_config(root / "m.yml", linear_config(tiny))
    streammerge.merge(cfg, root / "out", shard_nbytes=1_000_000)
    return cfg, root / "out"


def flip(path: Path, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ 0x01]))


def test_a_flipped_byte_anywhere_in_any_shard_names_the_tensor(merged, cli):
    _, out = merged
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert cli("verify", out).exit_code == 0
    rng = random.Random(3)
    for shard in shards:  # 3 random data bytes per shard, the first and the last, one header byte
        header = read_header(shard)
        size = shard.stat().st_size
        positions = [
            header.data_offset,
            size - 1,
            *(rng.randrange(header.data_offset, size) for _ in range(3)),
        ]
        for pos in positions:
            name = next(n for n, t in header.tensors.items() if t.begin <= pos - header.data_offset < t.end)
            flip(shard, pos)
            r = cli("verify", out)
            flip(shard, pos)
            assert r.exit_code == 1
            assert (
                r.stderr
                == f"error: {shard}: tensor {name} is damaged (its digest differs from the manifest)\n"
            )
        pos = rng.randrange(8, header.data_offset)
        flip(shard, pos)
        r = cli("verify", out)
        flip(shard, pos)
        assert (r.exit_code, r.stderr) == (1, f"error: {shard}: header does not match the manifest\n")
    assert cli("verify", out).exit_code == 0


def test_a_truncated_or_missing_shard(merged, cli, tmp_path):
    _, out = merged
    shard = sorted(out.glob("model-*.safetensors"))[1]
    raw = shard.read_bytes()
    try:
        shard.write_bytes(raw[:-10])
        r = cli("verify", out)
        assert (r.exit_code, r.stderr) == (
            1,
            f"error: {shard}: shard has {len(raw) - 10} bytes, manifest says {len(raw)}\n",
        )
        shard.unlink()
        r = cli("verify", out)
        assert (r.exit_code, r.stderr) == (1, f"error: {shard}: shard is missing\n")
    finally:
        shard.write_bytes(raw)
    r = cli("verify", tmp_path)
    assert (r.exit_code, r.stderr) == (
        1,
        f"error: {tmp_path}: no streammerge.json; not a streammerge output\n",
    )


def test_verify_against_the_config_and_the_inputs(merged, tiny, cli, tmp_path):
    cfg, out = merged
    r = cli("verify", out, "--against", cfg)
    assert r.exit_code == 0, r.output
    assert r.stdout == f"ok: 39 tensors in {out} match the manifest and {cfg}\n"
    other = write_config(tmp_path / "o.yml", cfg.read_text().replace("weight: 0.5", "weight: 0.6"))
    r = cli("verify", out, "--against", other)
    assert (r.exit_code, r.stderr) == (
        1,
        f"error: {out}: does not match {other}: the config changed at models[0].parameters.weight: 0.5 -> 0.6\n",
    )
    shard = next(Path(tiny["base"]).glob("*00001*.safetensors"))
    st = shard.stat()
    try:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        r = cli("verify", out, "--against", cfg)
        assert (r.exit_code, r.stderr) == (
            1,
            f"error: {out}: does not match {cfg}: input {shard} was modified since the merge\n",
        )
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_manifest_with_sha256_tensor_digests_still_verifies(merged, cli, tmp_path):
    """Outputs written before xxh3-128 digests (0.1) carry sha256 per tensor."""
    import hashlib
    import json
    import shutil

    _, out = merged
    old = tmp_path / "old"
    shutil.copytree(out, old)
    manifest = json.loads((old / "streammerge.json").read_text())
    for shard in sorted(old.glob("model-*.safetensors")):
        header, data = read_header(shard), shard.read_bytes()
        for name, t in header.tensors.items():
            body = data[header.data_offset + t.begin : header.data_offset + t.end]
            manifest["tensors"][name] = {"shard": shard.name, "sha256": hashlib.sha256(body).hexdigest()}
    (old / "streammerge.json").write_text(json.dumps(manifest))
    assert cli("verify", old).exit_code == 0
    shard = sorted(old.glob("model-*.safetensors"))[0]
    flip(shard, shard.stat().st_size - 1)
    r = cli("verify", old)
    assert r.exit_code == 1 and "is damaged" in r.stderr
