"""The io_* config corpus: every valid config merges end to end on generated models and
is checked (names, shapes, config.json, one tensor by hand); every io_bad_* config fails
at plan time with exactly the line in its first comment, exit 2 and no output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import streammerge
from streammerge.arch import tiny
from streammerge.demo import write_checkpoint
from streammerge.demo_formats import f8_expected, write_bin_copy, write_f8_copy, write_lora_adapter

DIR = Path(__file__).parent / "configs"
VALID = sorted(p for p in DIR.glob("io_*.yml") if not p.name.startswith("io_bad_"))
INVALID = sorted(DIR.glob("io_bad_*.yml"))
SPEC = tiny("llama")  # vocab 512, hidden 128


def load(model: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(f))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("io-models")
    for name, seed in (("base", None), ("ftA", 1), ("ftB", 2)):
        write_checkpoint(root / name, SPEC, model_seed=seed)
    write_bin_copy(root / "ftA", root / "ftA-bin")
    write_bin_copy(root / "ftB", root / "ftB-bin", n_shards=2)
    write_f8_copy(root / "ftA", root / "ftA-f8", scheme="block")
    write_f8_copy(root / "ftB", root / "ftB-f8t", scheme="tensor")
    bad = write_f8_copy(root / "ftB", root / "f8-badscale", scheme="block")
    t = safetensors.torch.load_file(bad / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(3, 3)
    safetensors.torch.save_file(t, bad / "model.safetensors")
    write_lora_adapter(root / "adapter", SPEC, r=4, alpha=8)
    write_lora_adapter(root / "adapter-other", tiny("llama", hidden=64))
    write_checkpoint(
        root / "ft1v", tiny("llama", vocab=514), model_seed=1, added_tokens=("<tool>", "<think>")
    )
    write_checkpoint(root / "ft2v", tiny("llama", vocab=513), model_seed=2, added_tokens=("<think>",))
    write_checkpoint(root / "tied", tiny("gemma"), n_shards=1)
    untied = write_checkpoint(root / "untied", tiny("gemma"), model_seed=1, n_shards=1)
    t = safetensors.torch.load_file(untied / "model.safetensors")
    t["lm_head.weight"] = (t["model.embed_tokens.weight"].float() * 0.5).to(torch.bfloat16)
    safetensors.torch.save_file(t, untied / "model.safetensors", metadata={"format": "pt"})
    return root


def materialise(path: Path, models: Path, tmp: Path) -> Path:
    out = tmp / path.name
    out.write_text(path.read_text().replace("$MODELS", str(models)))
    return out


def expected_rows(stem: str) -> int:
    wide = (
        "io_union_linear",
        "io_tokenizer_named",
        "io_tokens_zero",
        "io_tokens_model_token",
        "io_tokenizer_outside",
    )
    return 576 if stem == "io_union_pad" else 514 if stem in wide else 512


def test_corpus_size():
    assert len(VALID) >= 12 and len(INVALID) >= 10


def test_a_vocabulary_kept_as_it_is_reads_the_tensors_plainly(models, tmp_path):
    """tokenizer_source naming a model whose vocabulary every input shares: the token
    tensors are read as stored (no row map, so no derivation and no torch on the reader);
    where the vocabularies differ, or the dtype changes, they are re-laid out."""
    from streammerge.plan import make_plan

    def derived(text: str) -> set[str]:
        cfg = tmp_path / "v.yml"
        cfg.write_text(text.replace("$MODELS", str(models)))
        plan = make_plan(cfg, max_memory=64 << 20)
        return {f"{j.name}:{k}" for j in plan.jobs for k, r in enumerate(j.inputs) if r.derive is not None}

    same = "merge_method: linear\nbase_model: $MODELS/base\nmodels:\n" + "".join(
        f"  - model: $MODELS/{m}\n    parameters: {{weight: 0.5}}\n" for m in ("ftA", "ftB", "base")
    )
    assert derived(same + "tokenizer_source: base\n") == set()
    assert derived(same + "tokenizer_source: $MODELS/ftA\n") == set()
    # a dtype change: the map converts
    assert derived(same + "tokenizer_source: $MODELS/ftA\ndtype: float32\n") == {
        f"{name}:{k}" for name in ("model.embed_tokens.weight", "lm_head.weight") for k in (0, 1, 2)
    }
    # ft1v has two more tokens than base: base's token tensors gain rows, ft1v's keep their own
    other = materialise(DIR / "io_tokenizer_named.yml", models, tmp_path).read_text()
    assert derived(other)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_config_merges_and_checks_out(path, models, tmp_path):
    cfg = materialise(path, models, tmp_path)
    plan = streammerge.plan(cfg, max_memory=16 << 20)
    streammerge.merge(cfg, tmp_path / "out", max_memory=16 << 20)
    out = tmp_path / "out"
    got = load(out)
    rows = expected_rows(path.stem)
    spec = tiny("gemma") if path.stem == "io_tied_mixed" else SPEC
    want_shapes = {
        n: ((rows, *s[1:]) if n in ("model.embed_tokens.weight", "lm_head.weight") else s)
        for n, s in spec.tensors()
    }
    if path.stem == "io_tied_mixed":
        want_shapes["lm_head.weight"] = (512, 128)
    assert {n: tuple(t.shape) for n, t in got.items()} == want_shapes
    assert len(plan.jobs) == len(got)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == rows == got["model.embed_tokens.weight"].shape[0]
    assert "quantization_config" not in config
    CHECKS[path.stem](got, models, out, config)


def _f(x):
    return x.float()


def check_bin(got, m, out, cfg):
    a, b = load(m / "ftA"), load(m / "ftB")
    n = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(got[n], (0.5 * _f(a[n]) + 0.5 * _f(b[n])))


def check_f8_block(got, m, out, cfg):
    raw, base = load(m / "ftA-f8"), load(m / "base")
    n = "model.layers.0.self_attn.q_proj.weight"
    deq = f8_expected(raw[n], raw[n + "_scale_inv"], (128, 128))
    assert torch.allclose(got[n], _f(base[n]) + 1.0 * (_f(deq) - _f(base[n])), rtol=0, atol=1e-7)


def check_f8_tensor(got, m, out, cfg):
    raw, base = load(m / "ftB-f8t"), load(m / "base")
    n = "model.layers.1.mlp.down_proj.weight"
    deq = f8_expected(raw[n], raw[n + "_scale"])
    assert torch.allclose(got[n], 0.6 * _f(deq) + 0.4 * _f(base[n]), rtol=1e-6, atol=1e-7)


def _lora_w(m, n):
    base, ad = load(m / "base"), safetensors.torch.load_file(m / "adapter" / "adapter_model.safetensors")
    mod = n.removesuffix(".weight")
    a, b = ad[f"base_model.model.{mod}.lora_A.weight"], ad[f"base_model.model.{mod}.lora_B.weight"]
    return (_f(base[n]) + (_f(b) @ _f(a)) * 2.0).to(torch.bfloat16)  # alpha 8 / r 4


def check_lora_passthrough(got, m, out, cfg):
    n = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(got[n], _lora_w(m, n))
    assert torch.equal(got["model.norm.weight"], load(m / "base")["model.norm.weight"])


def check_lora_ta(got, m, out, cfg):
    n = "model.layers.0.self_attn.q_proj.weight"
    base, a = load(m / "base"), load(m / "ftA")
    want = _f(base[n]) + 0.5 * (_f(_lora_w(m, n)) - _f(base[n])) + 0.5 * (_f(a[n]) - _f(base[n]))
    assert torch.allclose(got[n], want, rtol=0, atol=1e-7)


def _vocab_inputs(m):
    return load(m / "ft1v"), load(m / "ft2v"), load(m / "base")


def check_union(got, m, out, cfg, pad=False):
    f1, f2, b = _vocab_inputs(m)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        e = got[n]
        # w7 (id 10) is in every model; <tool> (512) only in ft1v, so everyone uses its row;
        # <think> (513) is ft1v's 513 and ft2v's 512; the base lacks it: the mean of theirs.
        assert torch.allclose(
            e[10], 0.5 * _f(f1[n][10]) + 0.3 * _f(f2[n][10]) + 0.2 * _f(b[n][10]), atol=1e-7
        )
        assert torch.allclose(e[512], _f(f1[n][512]), atol=1e-7)
        think = (_f(f1[n][513]) + _f(f2[n][512])) / 2
        assert torch.allclose(e[513], 0.5 * _f(f1[n][513]) + 0.3 * _f(f2[n][512]) + 0.2 * think, atol=1e-7)
        if pad:  # padding rows: each model's mean of its 514 re-laid rows, then merged

            def real(x, extra):
                return torch.cat([_f(x[:512]), *extra])

            m1 = real(f1[n], [_f(f1[n][512:514])]).mean(0)
            m2 = real(f2[n], [_f(f1[n][512:513]), _f(f2[n][512:513])]).mean(0)
            mb = real(b[n], [_f(f1[n][512:513]), think[None]]).mean(0)
            assert torch.allclose(e[600 - 30], 0.5 * m1 + 0.3 * m2 + 0.2 * mb, atol=1e-6)
    tok = json.loads((out / "tokenizer.json").read_text())
    added = {e["content"]: e["id"] for e in tok["added_tokens"]}
    assert added["<tool>"] == 512 and added["<think>"] == 513
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["added_tokens_decoder"]["513"]["content"] == "<think>"


def check_tokenizer_base(got, m, out, cfg):
    f1, _, b = _vocab_inputs(m)
    n = "model.embed_tokens.weight"
    assert torch.equal(got[n], _f(f1[n][:512]))  # weight 1 task arithmetic on the base's rows
    assert (out / "tokenizer.json").read_text() != ""
    assert "<tool>" not in (out / "tokenizer.json").read_text()


def check_named(got, m, out, cfg):
    f1, _, b = _vocab_inputs(m)
    n = "lm_head.weight"
    # No base_model: <tool> and <think> are only in ft1v, so the base borrows its rows.
    assert torch.allclose(got[n][513], _f(f1[n][513]), atol=1e-7)
    assert torch.allclose(got[n][3], 0.5 * _f(f1[n][3]) + 0.5 * _f(b[n][3]), atol=1e-7)
    assert (out / "tokenizer.json").read_bytes() == (m / "ft1v" / "tokenizer.json").read_bytes()


def check_tokens_zero(got, m, out, cfg):
    f1, f2, _ = _vocab_inputs(m)
    n = "model.embed_tokens.weight"
    assert torch.allclose(got[n][512], 0.5 * _f(f1[n][512]), atol=1e-7)  # zero for ft2v and the base
    assert torch.allclose(got[n][513], _f(f2[n][512]), atol=1e-7)  # forced from ft2v everywhere


def check_model_token(got, m, out, cfg):
    f1, _, b = _vocab_inputs(m)
    n = "lm_head.weight"
    assert torch.allclose(got[n][512], 0.5 * _f(f1[n][512]) + 0.5 * _f(b[n][10]), atol=1e-7)  # w7 is id 10


def check_outside(got, m, out, cfg):
    _, f2, b = _vocab_inputs(m)
    n = "model.embed_tokens.weight"
    assert torch.equal(got[n][512], torch.zeros(128))  # <tool>: in no input
    assert torch.allclose(got[n][513], _f(f2[n][512]), atol=1e-7)  # <think>: ft2v's row for both
    assert torch.allclose(got[n][7], 0.5 * _f(f2[n][7]) + 0.5 * _f(b[n][7]), atol=1e-7)


def check_chat_template(got, m, out, cfg):
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"].startswith("{% for message in messages %}")
    assert "<|im_start|>" in tc["chat_template"]


def check_tied(got, m, out, cfg):
    t, u = load(m / "tied"), load(m / "untied")
    assert cfg["tie_word_embeddings"] is False
    want = 0.5 * _f(t["model.embed_tokens.weight"]) + 0.5 * _f(u["lm_head.weight"])
    assert torch.equal(got["lm_head.weight"], want)


CHECKS = {
    "io_bin_linear": check_bin,
    "io_f8_block": check_f8_block,
    "io_f8_tensor": check_f8_tensor,
    "io_lora_passthrough": check_lora_passthrough,
    "io_lora_task_arithmetic": check_lora_ta,
    "io_union_linear": check_union,
    "io_union_pad": lambda *a: check_union(*a, pad=True),
    "io_tokenizer_base": check_tokenizer_base,
    "io_tokenizer_named": check_named,
    "io_tokens_zero": check_tokens_zero,
    "io_chat_template": check_chat_template,
    "io_tokens_model_token": check_model_token,
    "io_tokenizer_outside": check_outside,
    "io_tied_mixed": check_tied,
}


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_config_is_one_line_exit_2_no_output(path, models, tmp_path, cli):
    cfg = materialise(path, models, tmp_path)
    first = cfg.read_text().splitlines()[0]
    assert first.startswith("# error: ")
    want = first.removeprefix("# error: ").replace("$CONFIG", str(cfg))
    r = cli("merge", cfg, tmp_path / "out", "--no-progress")
    assert r.exit_code == 2
    assert r.stderr == f"error: {want}\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_mergekit_yaml_flags_are_accepted(models, tmp_path, cli):
    cfg = materialise(DIR / "io_bin_linear.yml", models, tmp_path)
    r = cli("merge", cfg, tmp_path / "out", "--out-shard-size", "1MB", "--no-copy-tokenizer",
            "--allow-crimes", "--lazy-unpickle", "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert r.stderr == "note: --lazy-unpickle has no effect; .bin inputs are always read lazily\n"
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # 1 MB shards
    assert not (tmp_path / "out" / "tokenizer.json").exists()
