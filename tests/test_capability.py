"""tools/capability.py --quick: train, merge through the CLI, evaluate, tune; sane properties.

Not exact numbers (they depend on the CPU's float kernels): the fine-tunes beat the base on
their own skill, and some merge of all three keeps every skill above the fine-tunes that did
not learn it. About a minute on two cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    sys.path.insert(0, str(TOOLS))
    try:
        import capability
    finally:
        sys.path.remove(str(TOOLS))
    out = tmp_path_factory.mktemp("cap")
    assert capability.main(["run", "--quick", "--out", str(out), "--silent"]) == 0
    return json.loads((out / "capability.json").read_text()), out


def test_fine_tunes_beat_the_base_on_their_skill(report):
    acc = report[0]["accuracy"]
    for skill in ("reverse", "sort", "cipher"):
        assert acc[f"ft_{skill}"][skill] > acc["base"][skill], (skill, acc)


def test_a_merge_keeps_every_skill_above_the_other_parents(report):
    acc = report[0]["accuracy"]
    skills = ("reverse", "sort", "cipher")

    def transfers(method):
        return all(acc[method][s] > max(acc[f"ft_{o}"][s] for o in skills if o != s) for s in skills)

    merges = [m for m in ("linear", "task_arithmetic", "ties") if m in acc]
    assert len(merges) == 3
    assert any(transfers(m) for m in merges), acc


def test_outputs_and_tuning(report):
    doc, out = report
    t = doc["tuning"]
    assert t["best_val"] >= t["default_val"]  # the config as written is a candidate
    assert [x["name"] for x in t["trials"]] == ["as-written", "models.weight=0.7"]
    assert "task_arithmetic-tuned" in doc["accuracy"]
    md = (out / "capability.md").read_text()
    assert md.startswith("| model | reverse | sort | cipher | average |")
    assert "on the test split the tuned config averages" in md
    for name in ("base", "ft_reverse", "ft_sort", "ft_cipher"):
        cfg = json.loads((out / "models" / name / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (out / "merged" / "ties" / "streammerge.json").exists()
