"""End to end: merges of generated checkpoints through the library and the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import linear_config, write_config

import streammerge
from streammerge.execute import merge_tensors


def load(model: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(f))
    return out


def file_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def test_linear_merge_equals_save_file_of_the_whole_tensor_result(tiny, tmp_path):
    cfg = write_config(tmp_path / "m.yml", linear_config(tiny))
    summary = streammerge.merge(cfg, tmp_path / "out", max_memory=16 << 20)
    ins = [load(tiny[k]) for k in ("ft1", "ft2", "base")]
    expected = {n: merge_tensors("linear", [m[n] for m in ins], weight=[0.5, 0.3, 0.2]) for n in ins[0]}
    reference = tmp_path / "reference.safetensors"
    safetensors.torch.save_file(expected, reference, metadata={"format": "pt"})
    # The streamed shard is byte for byte what save_file writes for the in-memory result.
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == reference.read_bytes()
    # And the values are the weighted mean to bf16 precision (independent of the kernel).
    got = load(tmp_path / "out")
    for n, x in got.items():
        want = 0.5 * ins[0][n].double() + 0.3 * ins[1][n].double() + 0.2 * ins[2][n].double()
        assert torch.allclose(x.double(), want, rtol=2**-7, atol=1e-6), n
    assert summary.tensors == len(expected) and summary.shards == 1


def test_task_arithmetic_out_dtype_config_and_tokenizer(tiny, tmp_path):
    cfg = write_config(
        tmp_path / "ta.yml",
        f"merge_method: task_arithmetic\nbase_model: {tiny['base']}\nmodels:\n"
        f"  - model: {tiny['ft1']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {tiny['ft2']}\n    parameters: {{weight: 0.5}}\n"
        "parameters: {lambda: 0.8}\nout_dtype: float16\n",
    )
    streammerge.merge(cfg, tmp_path / "out", max_memory=16 << 20)
    got, base, ft1, ft2 = (load(p) for p in (tmp_path / "out", tiny["base"], tiny["ft1"], tiny["ft2"]))
    for n, x in got.items():
        assert x.dtype == torch.float16
        want = base[n].double() + 0.8 * (
            (ft1[n].double() - base[n].double()) + 0.5 * (ft2[n].double() - base[n].double())
        )
        assert torch.allclose(x.double(), want, rtol=2**-7, atol=1e-4), n
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["num_hidden_layers"] == 4
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tiny["base"] / name).read_bytes()
    manifest = json.loads((tmp_path / "out" / "streammerge.json").read_text())
    assert set(manifest["tensors"]) == set(got)


def test_passthrough_copies_bits(tiny, tmp_path):
    cfg = write_config(tmp_path / "p.yml", f"merge_method: passthrough\nmodels:\n  - model: {tiny['ft2']}\n")
    streammerge.merge(cfg, tmp_path / "out")
    got, src = load(tmp_path / "out"), load(tiny["ft2"])
    assert all(torch.equal(got[n].view(torch.uint16), src[n].view(torch.uint16)) for n in src)


def test_shards_and_index(tiny, tmp_path, cli):
    cfg = write_config(tmp_path / "m.yml", linear_config(tiny))
    r = cli("merge", cfg, tmp_path / "out", "--shard-size", "2MB", "--no-progress")
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged = load(out)
    assert set(index["weight_map"]) == set(merged)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    for p in out.glob("*.safetensors"):  # each shard is bounded (no single tensor is > 2 MB here)
        assert p.stat().st_size <= 2_000_000 + 4096
    assert "merged" in r.stdout and "GB/s" in r.stdout and "peak memory" in r.stdout


@pytest.mark.parametrize("variant", [["--threads", "1"], ["--threads", "2"], ["--max-memory", "8MiB"],
                                     ["--max-memory", "64MiB"], ["--max-memory", "2GiB"]])  # fmt: skip
def test_output_bytes_do_not_depend_on_threads_or_budget(small, tmp_path_factory, cli, variant):
    tmp = tmp_path_factory.mktemp("det")
    cfg = write_config(tmp / "m.yml", linear_config(small, dtype="float32", out_dtype="bfloat16"))
    r = cli("merge", cfg, tmp / "out", "--no-progress", "--max-memory", "32MiB", *variant)
    assert r.exit_code == 0, r.output
    digests = file_digests(tmp / "out")
    ref_dir = tmp_path_factory.getbasetemp() / "det-reference"
    if not ref_dir.exists():
        streammerge.merge(cfg, ref_dir, max_memory=1 << 30, threads=2)
    assert digests == file_digests(ref_dir)


def test_small_budget_really_chunks(small):
    plan = streammerge.plan(streammerge.config.parse_config(linear_config(small)), max_memory=8 << 20)
    biggest = max(j.numel for j in plan.jobs)
    assert plan.estimate.chunk_elems <= biggest / 4  # the embedding is read in >= 4 chunks


def test_verify_names_the_damaged_tensor(tiny, tmp_path, cli):
    cfg = write_config(tmp_path / "m.yml", linear_config(tiny))
    streammerge.merge(cfg, tmp_path / "out")
    assert cli("verify", tmp_path / "out").exit_code == 0
    shard = tmp_path / "out" / "model.safetensors"
    header = streammerge.header.read_header(shard)
    name, info = list(header.tensors.items())[5]
    raw = bytearray(shard.read_bytes())
    raw[header.data_offset + info.begin + 3] ^= 0x40
    shard.write_bytes(bytes(raw))
    r = cli("verify", tmp_path / "out")
    assert r.exit_code == 1
    assert r.stderr == f"error: {shard}: tensor {name} is damaged (its digest differs from the manifest)\n"


def test_force_replaces_an_existing_output(tiny, tmp_path, cli):
    cfg = write_config(tmp_path / "m.yml", linear_config(tiny))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    r = cli("merge", cfg, out, "--force", "--no-progress")
    assert r.exit_code == 0, r.output
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert not list(tmp_path.glob("out.*"))  # no partial or old directory left behind


def test_plan_json_and_inspect(tiny, tmp_path, cli):
    cfg = write_config(tmp_path / "m.yml", linear_config(tiny))
    r = cli("plan", cfg, "--json", "--max-memory", "64MiB")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["tensors"] == 39 and doc["max_memory"] == 64 << 20
    assert doc["estimated_peak_nbytes"] <= 64 << 20
    r = cli("inspect", tiny["base"], "--json")
    assert json.loads(r.stdout)["tensors"]["lm_head.weight"] == {
        "dtype": "BF16", "shape": [1024, 256], "file": "model-00002-of-00002.safetensors"}  # fmt: skip
    r = cli("inspect", tiny["base"])
    assert "LlamaForCausalLM (4 layers, hidden 256)" in r.stdout


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _scenarios(tiny: dict[str, Path], tmp: Path):
    """(name, config text, OUT, expected stderr line), each broken in one way."""
    out = tmp / "out"
    good = linear_config(tiny)
    yield (
        "missing model",
        good.replace(str(tiny["ft2"]), str(tmp / "nope")),
        out,
        (f"{{cfg}}: models[1].model: {tmp / 'nope'}: no such file or directory"),
    )

    trunc = _broken_copy(tiny["ft1"], tmp / "trunc")
    shard = trunc / "model-00001-of-00002.safetensors"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    yield (
        "truncated shard",
        good.replace(str(tiny["ft1"]), str(trunc)),
        out,
        (
            f"{{cfg}}: models[0].model: {shard}: file has {size - 100} bytes, header declares {size};"
            " truncated or corrupt download"
        ),
    )

    corrupt = _broken_copy(tiny["ft1"], tmp / "corrupt")
    shard = corrupt / "model-00002-of-00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[8:12] = b"\x00{{["
    shard.write_bytes(bytes(raw))
    yield (
        "corrupt header",
        good.replace(str(tiny["ft1"]), str(corrupt)),
        out,
        (
            f"{{cfg}}: models[0].model: {shard}: corrupt safetensors header: Expecting value: line 1 column 1 (char 0)"
        ),
    )

    from dataclasses import replace

    from streammerge.demo import TINY, write_checkpoint

    wide = write_checkpoint(tmp / "wide", replace(TINY, intermediate=700), model_seed=3)
    yield (
        "shape mismatch",
        good.replace(str(tiny["ft2"]), str(wide)) + f"base_model: {tiny['base']}\n",
        out,
        (
            f"{wide}/model-00001-of-00002.safetensors: tensor model.layers.0.mlp.down_proj.weight"
            " has shape [256, 700], base has [256, 688] (and 11 more tensors)"  # 3 MLP weights x 4 layers
        ),
    )

    lacking = tmp / "lacking"
    lacking.mkdir()
    tensors = load(tiny["ft1"])
    del tensors["model.layers.2.self_attn.q_proj.weight"]
    safetensors.torch.save_file(tensors, lacking / "model.safetensors", metadata={"format": "pt"})
    yield (
        "missing tensor",
        good.replace(str(tiny["ft1"]), str(lacking)),
        out,
        (f"{lacking}: tensor model.layers.2.self_attn.q_proj.weight is missing (it is in {tiny['ft2']})"),
    )
    yield (
        "unknown method",
        good.replace("linear", "linera"),
        out,
        ("{cfg}: merge_method: unknown merge method 'linera'; did you mean 'linear'?"),
    )
    yield (
        "typo key",
        good + "out_dtyp: bfloat16\n",
        out,
        ("{cfg}: out_dtyp: unknown key 'out_dtyp'; did you mean 'out_dtype'?"),
    )
    yield (
        "wrong type",
        good.replace("weight: 0.3", "weight: heavy"),
        out,
        ("{cfg}: models[1].parameters.weight: expected a number, got 'heavy'"),
    )
    yield (
        "not yaml",
        "merge_method: [linear\n  : : :\n",
        out,
        ("{cfg}: not valid YAML at line 2, column 3: expected ',' or ']', but got ':'"),
    )
    full = tmp / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    yield (
        "non-empty OUT",
        good,
        full,
        f"{full}: directory exists and is not empty; pass --force to replace it",
    )


SCENARIOS = ["missing model", "truncated shard", "corrupt header", "shape mismatch", "missing tensor",
             "unknown method", "typo key", "wrong type", "not yaml", "non-empty OUT"]  # fmt: skip


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_bad_input_is_one_error_line_and_exit_2(tiny, tmp_path, cli, scenario):
    cases = {name: rest for name, *rest in _scenarios(tiny, tmp_path)}
    text, out, line = cases[scenario]
    cfg = write_config(tmp_path / "m.yml", text)
    r = cli("merge", cfg, out, "--no-progress")
    assert r.exit_code == 2
    assert r.stderr == "error: " + line.format(cfg=cfg) + "\n"
    assert r.stdout == ""
    assert not list(out.glob("*.safetensors")) and not (out / "config.json").exists()
    assert not list(tmp_path.glob("out.partial"))


def test_the_program_exits_with_its_code_and_all_its_output(tiny, tmp_path):
    """The real program leaves by os._exit (no interpreter teardown): its output is flushed,
    its files are complete, and its exit codes are the commands' own."""
    import subprocess
    import sys

    def program(*args):
        cmd = [sys.executable, "-m", "streammerge.cli", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    cfg = write_config(tmp_path / "m.yml", linear_config(tiny))
    r = program("merge", cfg, tmp_path / "out", "--no-progress")
    assert r.returncode == 0 and r.stdout.startswith("merged ") and r.stdout.endswith("\n")
    r = program("verify", tmp_path / "out")
    assert (r.returncode, r.stderr) == (0, "") and r.stdout.startswith("ok: ")
    r = program("merge", tmp_path / "missing.yml", tmp_path / "out2")
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'missing.yml'}: config file not found\n"
    assert program("merge", "--bogus").returncode == 2
