"""The bad-input battery: every way a user can hand ``streammerge merge`` a broken model,
config, flag or output directory gives its one exact ``error:`` line, exit 2 (1 for I/O
faults), no traceback, and nothing at OUT that loads as a model.

Each case builds its broken world in ``tmp`` from the tiny demo models and returns the
merge arguments and the expected message (``{cfg}`` is the config path, ``{out}`` OUT).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from conftest import linear_config

from streammerge.demo import TINY, write_checkpoint
from streammerge.journal import Journal, Lock

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def copy(tiny, tmp: Path, name: str = "ft1") -> Path:
    return Path(shutil.copytree(tiny[name], tmp / f"bad-{name}"))


def swap(tiny, path: Path, name: str = "ft1") -> str:
    return linear_config(tiny).replace(str(tiny[name]), str(path))


SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

# -- inputs ----------------------------------------------------------------------------


@case
def missing_model_dir(tiny, tmp):
    return (
        swap(tiny, tmp / "nope"),
        [],
        f"{{cfg}}: models[0].model: {tmp / 'nope'}: no such file or directory",
    )


@case
def truncated_shard(tiny, tmp):
    d = copy(tiny, tmp)
    size = (d / SHARD1).stat().st_size
    os.truncate(d / SHARD1, size - 1)
    return (
        swap(tiny, d),
        [],
        (
            f"{{cfg}}: models[0].model: {d / SHARD1}: file has {size - 1} bytes, header declares"
            f" {size}; truncated or corrupt download"
        ),
    )


@case
def corrupt_header_json(tiny, tmp):
    d = copy(tiny, tmp)
    with open(d / SHARD2, "r+b") as f:
        f.seek(8)
        f.write(b"[")
    return (
        swap(tiny, d),
        [],
        (
            f"{{cfg}}: models[0].model: {d / SHARD2}: corrupt safetensors header: Expecting ','"
            " delimiter: line 1 column 16 (char 15)"
        ),
    )


@case
def huge_header_length(tiny, tmp):
    d = copy(tiny, tmp)
    with open(d / SHARD1, "r+b") as f:
        f.write(struct.pack("<Q", 2**62))
    size = (d / SHARD1).stat().st_size
    return (
        swap(tiny, d),
        [],
        (
            f"{{cfg}}: models[0].model: {d / SHARD1}: header length {2**62} does not fit the file"
            f" ({size} bytes); truncated or not a safetensors file"
        ),
    )


@case
def empty_shard_file(tiny, tmp):
    d = copy(tiny, tmp)
    (d / SHARD2).write_bytes(b"")
    return swap(tiny, d), [], f"{{cfg}}: models[0].model: {d / SHARD2}: not a safetensors file (0 bytes)"


@case
def missing_tensor(tiny, tmp):
    from dataclasses import replace

    d = write_checkpoint(tmp / "short", replace(TINY, layers=3), model_seed=1)
    return (
        swap(tiny, d),
        [],
        # the first model (the donor here) is the shallow one: each deeper model is one line
        f"{{cfg}}: models[1].model: {tiny['ft2']} has 4 layers, {d} has 3 layers; models: merges"
        " models of equal depth (use slices:)\nerror: "
        f"{{cfg}}: models[2].model: {tiny['base']} has 4 layers, {d} has 3 layers; models: merges"
        " models of equal depth (use slices:)",
    )


@case
def shape_mismatch(tiny, tmp):
    from dataclasses import replace

    d = write_checkpoint(tmp / "wide", replace(TINY, intermediate=700), model_seed=2)
    return (
        swap(tiny, d, "ft2"),
        [],
        (
            f"{d / SHARD1}: tensor model.layers.0.mlp.down_proj.weight has shape [256, 700],"
            f" {tiny['ft1']} has [256, 688] (and 11 more tensors)"  # 3 MLP weights x 4 layers
        ),
    )


@case
def shard_missing_from_index(tiny, tmp):
    d = copy(tiny, tmp)
    (d / SHARD2).unlink()
    return (
        swap(tiny, d),
        [],
        (
            f"{{cfg}}: models[0].model: {d / SHARD2}: listed in model.safetensors.index.json but missing"
            " (1 of 2 shards missing)"
        ),
    )


@case
def index_escapes_the_model_dir(tiny, tmp):
    d = copy(tiny, tmp)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../../etc/passwd"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return (
        swap(tiny, d),
        [],
        (
            f"{{cfg}}: models[0].model: {d / 'model.safetensors.index.json'}: shard name"
            " '../../etc/passwd' must be a plain file name"
        ),
    )


@case
def index_disagrees_with_header(tiny, tmp):
    d = copy(tiny, tmp)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = SHARD1
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return (
        swap(tiny, d),
        [],
        (
            f"{{cfg}}: models[0].model: {d / SHARD1}: index lists tensor lm_head.weight in this shard, its header lacks it"
        ),
    )


@case
def unreadable_index(tiny, tmp):
    d = copy(tiny, tmp)
    (d / "model.safetensors.index.json").write_text("{not json")
    return (
        swap(tiny, d),
        [],
        (
            f"{{cfg}}: models[0].model: {d / 'model.safetensors.index.json'}: unreadable index: Expecting"
            " property name enclosed in double quotes: line 1 column 2 (char 1)"
        ),
    )


@case
def bin_that_is_not_a_torch_save_zip(tiny, tmp):
    d = tmp / "empty"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"PK")
    return (
        swap(tiny, d),
        [],
        (
            f"{{cfg}}: models[0].model: {d / 'pytorch_model.bin'}: not a zip-format torch.save file"
            " (legacy .bin format); re-save it with torch>=1.6"
        ),
    )


@case
def no_weights_in_model_dir(tiny, tmp):
    d = tmp / "no-weights"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return (swap(tiny, d), [], f"{{cfg}}: models[0].model: {d}: no .safetensors or .bin weights found")


@case
def model_is_a_text_file(tiny, tmp):
    p = tmp / "weights.txt"
    p.write_text("hello")
    return (
        swap(tiny, p),
        [],
        f"{{cfg}}: models[0].model: {p}: expected a .safetensors or .bin file or a model directory",
    )


@case
def corrupt_config_json(tiny, tmp):
    d = copy(tiny, tmp, "base")
    (d / "config.json").write_text("{")
    return (
        swap(tiny, d, "base"),
        [],
        (
            f"{{cfg}}: models[2].model: {d / 'config.json'}: unreadable config.json: Expecting property"
            " name enclosed in double quotes: line 1 column 2 (char 1)"
        ),
    )


# -- configs ---------------------------------------------------------------------------


@case
def config_missing(tiny, tmp):
    return None, [], "{cfg}: config file not found"


@case
def config_not_utf8(tiny, tmp):
    return b"merge_method: \xff\xfe\n", [], "{cfg}: not a YAML file (not UTF-8 text)"


@case
def config_not_yaml(tiny, tmp):
    return (
        "models: [a\n",
        [],
        "{cfg}: not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'",
    )


@case
def config_typo_key(tiny, tmp):
    return (
        linear_config(tiny) + "dtpye: float16\n",
        [],
        "{cfg}: dtpye: unknown key 'dtpye'; did you mean 'dtype'?",
    )


@case
def config_typo_method(tiny, tmp):
    return (
        linear_config(tiny).replace("linear", "lineer"),
        [],
        ("{cfg}: merge_method: unknown merge method 'lineer'; did you mean 'linear'?"),
    )


@case
def config_bad_dtype(tiny, tmp):
    return (
        linear_config(tiny) + "dtype: float8\n",
        [],
        ("{cfg}: dtype: unknown dtype 'float8'; did you mean 'float64'?"),
    )


@case
def config_param_not_a_number(tiny, tmp):
    return (
        linear_config(tiny).replace("weight: 0.3", "weight: lots"),
        [],
        ("{cfg}: models[1].parameters.weight: expected a number, got 'lots'"),
    )


@case
def config_param_out_of_range(tiny, tmp):
    text = f"merge_method: slerp\nbase_model: {tiny['base']}\nmodels:\n  - model: {tiny['ft1']}\nparameters: {{t: 1.5}}\n"
    return text, [], "{cfg}: parameters.t: must be <= 1, got 1.5"


@case
def config_required_param_missing(tiny, tmp):
    return (
        linear_config(tiny).replace("    parameters: {weight: 0.3}\n", ""),
        [],
        (f"{{cfg}}: models[1].parameters.weight: required by linear for {tiny['ft2']}, but not set"),
    )


@case
def config_duplicate_key(tiny, tmp):
    return (
        linear_config(tiny) + "merge_method: ties\n",
        [],
        ("{cfg}: not valid YAML at line 9, column 1: duplicate key 'merge_method' (first on line 1)"),
    )


@case
def config_no_models(tiny, tmp):
    return "merge_method: linear\nmodels: []\n", [], "{cfg}: models: expected a non-empty list, got a list"


@case
def config_model_listed_twice(tiny, tmp):
    text = linear_config(tiny).replace(str(tiny["ft2"]), str(tiny["ft1"]))
    return text, [], f"{{cfg}}: models[1].model: {tiny['ft1']} is listed twice (also models[0].model)"


@case
def config_nul_in_path(tiny, tmp):
    return (
        'merge_method: passthrough\nmodels:\n  - model: "a\\0b"\n',
        [],
        ("{cfg}: models[0].model: expected a model path, got 'a\\x00b'"),
    )


@case
def config_list_as_key(tiny, tmp):
    return (
        "? [merge_method]\n: linear\n",
        [],
        ("{cfg}: not valid YAML at line 1, column 3: a key must be a plain value, got a list"),
    )


@case
def config_nested_too_deeply(tiny, tmp):
    return "models: " + "[" * 5000 + "]" * 5000 + "\n", [], "{cfg}: not valid YAML: nested too deeply"


@case
def config_ties_without_base(tiny, tmp):
    return (
        linear_config(tiny).replace("linear", "ties"),
        [],
        ("{cfg}: base_model: required by merge_method ties, but not set"),
    )


# -- flags -----------------------------------------------------------------------------


@case
def flag_bad_max_memory(tiny, tmp):
    return (
        linear_config(tiny),
        ["--max-memory", "lots"],
        (
            "Invalid value for '--max-memory': expected a size like 512MiB, 8GiB, 5GB or a byte count, got 'lots'"
        ),
    )


@case
def flag_zero_max_memory(tiny, tmp):
    return (
        linear_config(tiny),
        ["--max-memory", "0"],
        ("Invalid value for '--max-memory': size must be positive, got '0'"),
    )


@case
def flag_too_small_max_memory(tiny, tmp):
    return (
        linear_config(tiny),
        ["--max-memory", "1MiB"],
        "--max-memory 1048576 bytes is too small; use at least 8MiB",
    )


@case
def flag_bad_shard_size(tiny, tmp):
    return (
        linear_config(tiny),
        ["--shard-size", "5 parsecs"],
        (
            "Invalid value for '--shard-size' / '--out-shard-size': expected a size like 512MiB, 8GiB, 5GB or a byte"
            " count, got '5 parsecs'"
        ),
    )


@case
def flag_unknown_device(tiny, tmp):
    return (
        linear_config(tiny),
        ["--device", "tpu"],
        ("Invalid value for '--device': 'tpu' is not one of 'cpu', 'cuda', 'auto'."),
    )


@case
def flag_zero_threads(tiny, tmp):
    return (
        linear_config(tiny),
        ["--threads", "0"],
        ("Invalid value for '--threads': 0 is not in the range x>=1."),
    )


@case
def flag_unknown_option(tiny, tmp):
    return linear_config(tiny), ["--resmue"], "No such option '--resmue'. Did you mean '--resume'?"


@case
def flag_bad_seed(tiny, tmp):
    return linear_config(tiny), ["--seed", "abc"], "Invalid value for '--seed': 'abc' is not a valid integer."


# -- output directory states -----------------------------------------------------------


@case
def out_not_empty(tiny, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "mine.txt").write_text("keep me")
    return linear_config(tiny), [], "{out}: directory exists and is not empty; pass --force to replace it"


@case
def out_is_a_file(tiny, tmp):
    (tmp / "out").write_text("a file")
    return linear_config(tiny), ["--force"], "Invalid value for 'OUT': Directory '{out}' is a file."


@case
def out_parent_missing(tiny, tmp):
    return linear_config(tiny), [], "{parent}: output's parent directory does not exist"


@case
def stale_partial(tiny, tmp):
    partial = tmp / "out.partial"
    partial.mkdir()
    Journal(partial, {"plan_hash": "0"}).close()
    return (
        linear_config(tiny),
        [],
        (
            "{out}.partial: left by an unfinished merge (0 tensors done); rerun with --resume to continue"
            " it or --force to discard it"
        ),
    )


@case
def locked_partial(tiny, tmp):
    partial = tmp / "out.partial"
    partial.mkdir()
    HELD.append(Lock(partial))
    return (
        linear_config(tiny),
        ["--force"],
        (f"{{out}}.partial: another merge is writing here (pid {os.getpid()} on {os.uname().nodename})"),
    )


@case
def disk_too_small(tiny, tmp):
    return (
        linear_config(tiny),
        [],
        "{parent}: not enough free space: the merge writes {need} bytes, 1000 are free",
    )


HELD: list[Lock] = []


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tiny, tmp_path, cli, monkeypatch):
    assert len(CASES) >= 25
    text, flags, line = CASES[name](tiny, tmp_path)
    cfg = tmp_path / "m.yml"
    if isinstance(text, bytes):
        cfg.write_bytes(text)
    elif text is not None:
        cfg.write_text(text)
    out = tmp_path / ("missing-dir/out" if name == "out_parent_missing" else "out")
    need = 0
    if name == "disk_too_small":
        import types

        import streammerge.write
        from streammerge.plan import make_plan

        need = make_plan(cfg).layout.nbytes
        tiny_disk = types.SimpleNamespace(total=1000, used=0, free=1000)
        monkeypatch.setattr(streammerge.write.shutil, "disk_usage", lambda path: tiny_disk)
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        r = cli("merge", cfg, out, "--no-progress", *flags)  # an exception here is a traceback: a bug
    finally:
        while HELD:
            HELD.pop().release()
    expected = line.format(cfg=cfg, out=out, parent=out.parent, need=need)
    assert (r.exit_code, r.stderr, r.stdout) == (2, f"error: {expected}\n", "")
    assert not list(out.glob("*.safetensors")) if out.is_dir() else True
    assert not (out / "config.json").exists() if out.is_dir() else True
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created, nothing removed
