"""tune: every grid point merged and scored by the user's command; the best config written."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from streammerge.errors import EvalError
from streammerge.sweep import parse_sweep
from streammerge.tune import tune

# Score = minus the mean distance of one merged tensor from ft1's: the more weight on ft1,
# the higher (closer to 0). It prints a line before the score, as evaluation scripts do.
SCORE = """
import sys
from safetensors.torch import load_file
name = "model.layers.0.self_attn.q_proj.weight"
out = load_file(sys.argv[1] + "/model.safetensors")[name]
ft1 = load_file(sys.argv[2] + "/model-00001-of-00002.safetensors")[name].float()
print("merged", sys.argv[1])
print(-float((out - ft1).abs().mean()))
"""


@pytest.fixture
def setup(tiny, tmp_path):
    script = tmp_path / "score.py"
    script.write_text(SCORE)
    cfg = tmp_path / "merge.yml"
    doc = {
        "merge_method": "linear",
        "models": [
            {"model": str(tiny["ft1"]), "parameters": {"weight": 0.5}},
            {"model": str(tiny["ft2"]), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    cfg.write_text(yaml.safe_dump(doc))
    return cfg, f"{sys.executable} {script} {{out}} {tiny['ft1']}", tmp_path / "tune"


def test_tune_scores_every_point_and_writes_the_best(setup):
    cfg, cmd, root = setup
    seen = []
    result = tune(
        cfg, cmd, [parse_sweep("models[0].parameters.weight=0.1,0.5,0.9")], root, report=seen.append
    )
    names = [t.name for t in result.trials]
    assert names == ["as-written", "models0.weight=0.1", "models0.weight=0.5", "models0.weight=0.9"]
    assert [t.name for t in seen] == names
    s = {t.name: t.score for t in result.trials}
    # weight w on ft1 (normalized with 0.5 on ft2): distance shrinks as w grows
    assert s["models0.weight=0.1"] < s["as-written"] < s["models0.weight=0.9"] <= 0
    # the grid point equal to the config as written is not merged again
    assert s["models0.weight=0.5"] == s["as-written"] and result.trials[2].seconds == 0
    assert result.best.name == "models0.weight=0.9"
    best = yaml.safe_load((root / "best.yml").read_text())
    assert best["models"][0]["parameters"] == {"weight": 0.9}
    assert (root / "best.yml").read_text().startswith("# streammerge tune: best of 4 candidates")
    doc = json.loads((root / "tune.json").read_text())
    assert doc["best"] == "models0.weight=0.9" and len(doc["trials"]) == 4
    assert not any(root.glob("*/model"))  # merged models are deleted unless keep


def test_minimize_and_keep(setup):
    cfg, cmd, root = setup
    result = tune(cfg, cmd, [parse_sweep("models[0].parameters.weight=0.1")], root, maximize=False, keep=True)
    assert result.best.name == "models0.weight=0.1"
    assert (root / "models0.weight=0.1" / "model" / "model.safetensors").exists()


def test_out_root_must_be_empty_unless_force(setup):
    cfg, cmd, root = setup
    root.mkdir()
    (root / "x").write_text("")
    with pytest.raises(Exception, match=r"exists and is not empty \(use --force to replace it\)"):
        tune(cfg, cmd, [], root)
    assert tune(cfg, cmd, [], root, force=True).best.name == "as-written"


@pytest.mark.parametrize(
    "cmd, line",
    [
        ("true", "--eval 'true': the command must contain {out} (the merged model's directory)"),
        (
            "echo hi {out} >&2; exit 3",
            "--eval for as-written: 'echo hi <out> >&2; exit 3' exited 3: hi <out>",
        ),
        (
            "echo {out} no-score",
            "--eval for as-written: 'echo <out> no-score' must print a score as its last word, got 'no-score'",
        ),
        (
            "echo {out} nan",
            "--eval for as-written: 'echo <out> nan' must print a score as its last word, got 'nan'",
        ),
    ],
)
def test_eval_errors_are_one_line(setup, cmd, line):
    cfg, _, root = setup
    with pytest.raises(EvalError) as e:
        tune(cfg, cmd, [], root)
    out = str(root / "as-written" / "model")
    assert str(e.value) == line.replace("<out>", out)


def test_a_bad_grid_point_fails_before_any_merge(setup, cli):
    cfg, cmd, root = setup
    r = cli(
        "tune",
        str(cfg),
        "--eval",
        cmd,
        "--sweep",
        "models[1].parameters.weight=0.5,abc",
        "--out-root",
        str(root),
    )
    assert r.exit_code == 2
    assert r.output.strip() == (
        f"error: {cfg} [models1.weight=abc]: models[1].parameters.weight: expected a number, got 'abc'"
    )
    assert not root.exists()


def test_cli_prints_each_score_and_the_best(setup, cli):
    cfg, cmd, root = setup
    r = cli(
        "tune", str(cfg), "--eval", cmd, "--sweep", "models[*].parameters.weight=1", "--out-root", str(root)
    )
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].endswith("  as-written") and lines[1].endswith("  models.weight=1")
    assert lines[-1].startswith("best: as-written scored ") and lines[-1].endswith(
        f"config in {root / 'best.yml'}"
    )
