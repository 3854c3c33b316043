"""Batches: K merges over shared inputs read once, bytes equal to K separate merges."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import linear_config, tree, write_config

import streammerge
from streammerge.batch import Member, run_batch
from streammerge.checkpoint import open_checkpoint
from streammerge.errors import ConfigError


def configs(models: dict[str, Path], root: Path) -> list[Path]:
    ties = (
        f"merge_method: ties\nbase_model: {models['base']}\nmodels:\n"
        f"  - model: {models['ft1']}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {models['ft2']}\n    parameters: {{weight: 0.4, density: 0.3}}\n"
        "dtype: float32\nout_dtype: bfloat16\n"
    )
    return [
        write_config(root / "lin-a.yml", linear_config(models)),
        write_config(root / "lin-b.yml", linear_config(models).replace("0.5", "0.9")),
        write_config(root / "ties.yml", ties),
    ]


def input_nbytes(models: dict[str, Path]) -> int:
    return sum(t.nbytes for m in models.values() for t in open_checkpoint(m).tensors.values())


# 2 compute threads, each with its own scratch for 256K-element statistics blocks
@pytest.mark.parametrize("budget", [256 << 20, 64 << 20], ids=["resident", "chunked"])
def test_batch_reads_shared_inputs_once_and_matches_separate_merges(small, tmp_path, budget):
    cfgs = configs(small, tmp_path)
    members = [Member(c.stem, str(c)) for c in cfgs] + [Member("missing", str(tmp_path / "missing.yml"))]
    summary = run_batch(members, tmp_path / "batch", max_memory=budget, shard_nbytes=12_000_000)
    assert list(summary.merged) == ["lin-a", "lin-b", "ties"]
    assert summary.failed == {"missing": f"{tmp_path / 'missing.yml'}: config file not found"}
    assert summary.lines()[-2] == f"failed missing: {tmp_path / 'missing.yml'}: config file not found"
    separate_reads = 0
    for c in cfgs:
        one = streammerge.merge(c, tmp_path / f"one-{c.stem}", max_memory=budget, shard_nbytes=12_000_000)
        separate_reads += one.read_nbytes
        assert tree(tmp_path / "batch" / c.stem) == tree(tmp_path / f"one-{c.stem}"), c.stem
    once = input_nbytes(small)
    if budget == 256 << 20:  # every tensor fits one chunk: each input byte is read exactly once
        assert summary.read_nbytes == once
        assert separate_reads == 3 * once
    else:  # chunked: ties re-reads its inputs for its statistics passes, linear shares them
        assert once < summary.read_nbytes < separate_reads


def test_fail_fast_stops_at_the_first_failure(tiny, tmp_path, cli):
    cfg = configs(tiny, tmp_path)[0]
    with pytest.raises(ConfigError):
        run_batch(
            [Member("missing", str(tmp_path / "no.yml")), Member("a", str(cfg))],
            tmp_path / "b",
            fail_fast=True,
        )
    assert not (tmp_path / "b" / "a").exists()
    r = cli("batch", tmp_path / "no.yml", cfg, "--out-root", tmp_path / "b", "--fail-fast")
    assert (r.exit_code, r.stderr) == (2, f"error: {tmp_path / 'no.yml'}: config file not found\n")
    r = cli("batch", tmp_path / "no.yml", cfg, "--out-root", tmp_path / "b", "--max-memory", "64MiB")
    assert r.exit_code == 1
    assert r.stdout.splitlines()[-2:] == [
        f"failed no: {tmp_path / 'no.yml'}: config file not found",
        r.stdout.splitlines()[-1],
    ]
    assert r.stdout.splitlines()[-1].startswith("batch: 1 merged, 1 failed; read ")
    assert (tmp_path / "b" / "lin-a" / "model-00001-of-00002.safetensors").is_file() is False
    assert (tmp_path / "b" / "lin-a" / "model.safetensors").is_file()


def test_sweep_expands_into_named_members_and_sweep_json(tiny, tmp_path, cli):
    cfg = configs(tiny, tmp_path)[0]
    r = cli(
        "batch", cfg, "--out-root", tmp_path / "s", "--max-memory", "64MiB",
        "--sweep", "models[0].parameters.weight=0.2,0.4",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    names = ["lin-a-models0.weight=0.2", "lin-a-models0.weight=0.4"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [*names, "sweep.json"]
    doc = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert doc == {
        n: {"values": {"models[0].parameters.weight": w}, "merged": True} for n, w in zip(names, (0.2, 0.4))
    }
    # Each swept output is the merge of the config with that value written in.
    one = write_config(tmp_path / "one.yml", linear_config(tiny).replace("0.5", "0.4", 1))
    streammerge.merge(one, tmp_path / "one", max_memory=64 << 20)
    assert tree(tmp_path / "one")["model.safetensors"] == tree(tmp_path / "s" / names[1])["model.safetensors"]
    r = cli("batch", cfg, "--out-root", tmp_path / "t", "--sweep", "models[0].parameters.weight")
    assert (r.exit_code, r.stderr) == (
        2, "error: --sweep 'models[0].parameters.weight': expected KEY=VALUE[,VALUE...], e.g. models[1].parameters.weight=0.2,0.4\n"
    )  # fmt: skip


EXAMPLES = [
    "linear",
    "ties",
    "slerp",
    "dare_ties",
    "della",
    "karcher",
    "model_stock",
    "nuslerp_rows",
    "passthrough",
]


def test_methods_side_by_side_in_one_batch_match_their_separate_merges(small, tmp_path, monkeypatch):
    """Example configs with statistics passes, random draws, row blocks and slices in one
    batch: members run side by side on single-threaded workers in sub-chunk steps, and
    each output equals that config merged alone. 160 MiB streams the 2M-element embedding
    in chunks (two compute scratches for slerp's 1M-element statistics blocks, the union
    of inputs, 2 write buffers for each of the 9 members; 180 MiB holds it), so statistics
    passes re-read it; steps of 64K elements split every chunk further."""
    import streammerge.batch_pass

    monkeypatch.setattr(streammerge.batch_pass, "STEP_ELEMS", 1 << 16)
    configs = Path(__file__).parents[1] / "configs"
    members = []
    for stem in EXAMPLES:
        text = (configs / f"{stem}.yml").read_text().replace("demo-out/models/", f"{small['base'].parent}/")
        members.append(Member(stem, str(write_config(tmp_path / f"{stem}.yml", text))))
    summary = run_batch(members, tmp_path / "b", max_memory=160 << 20, threads=2, seed=5)
    assert summary.failed == {}
    assert summary.read_nbytes > input_nbytes(small)  # chunked: statistics passes re-read
    for m in members:
        streammerge.merge(m.config, tmp_path / "one", max_memory=2 << 30, threads=2, seed=5)
        assert tree(tmp_path / "b" / m.name) == tree(tmp_path / "one"), m.name
        shutil.rmtree(tmp_path / "one")
