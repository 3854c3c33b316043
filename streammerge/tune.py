"""Coefficient tuning: merge every point of a sweep grid, score each with the user's command.

``tune(config, eval_command, sweeps, out_root)`` validates the config as written and every
variant (``sweep.expand``) before merging anything, then for each one in turn: writes
``OUT_ROOT/NAME/config.yml``, merges it into ``OUT_ROOT/NAME/model``, runs the evaluation
command with ``{out}`` replaced by that directory, and reads the score from the last
word the command prints. The config as written is always scored first, as the reference,
so the best config is never worse than it on the user's own evaluation (ties keep the
earlier candidate). Merged models are deleted after scoring unless ``keep``; the best
config is written to ``OUT_ROOT/best.yml`` and every trial to ``OUT_ROOT/tune.json``.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import from_dict, load_config
from .errors import EvalError, OutputError
from .sweep import Sweep, Value, expand

AS_WRITTEN = "as-written"


@dataclass(frozen=True, slots=True)
class Trial:
    name: str  # AS_WRITTEN or the variant's name, e.g. models1.weight=0.4
    settings: tuple[tuple[str, Value], ...]  # (key path, value) the sweep set
    score: float
    seconds: float  # merge + evaluation
    config: str  # path of the candidate's config.yml


@dataclass(frozen=True, slots=True)
class TuneResult:
    trials: tuple[Trial, ...]  # in evaluation order; trials[0] is the config as written
    best: Trial
    maximize: bool
    best_config: str  # OUT_ROOT/best.yml

    @property
    def reference(self) -> Trial:
        return self.trials[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "maximize": self.maximize,
            "best": self.best.name,
            "best_config": self.best_config,
            "trials": [asdict(t) for t in self.trials],
        }


def tune(
    config: str | Path,
    eval_command: str,
    sweeps: list[Sweep] | tuple[Sweep, ...],
    out_root: str | Path,
    *,
    maximize: bool = True,
    keep: bool = False,
    force: bool = False,
    report: Callable[[Trial], None] | None = None,
    **merge_options: Any,
) -> TuneResult:
    """Score the config as written and every sweep variant; see the module docstring.
    ``merge_options`` go to ``streammerge.merge`` (max_memory, threads, seed, ...)."""
    from .execute import merge

    if "{out}" not in eval_command:
        raise EvalError(
            f"--eval {eval_command!r}: the command must contain {{out}} (the merged model's directory)"
        )
    load_config(config)  # the config as written: every error with its key path
    doc = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    candidates = [(AS_WRITTEN, doc, ())]
    for v in expand(doc, sweeps):
        from_dict(v.doc, source=f"{config} [{v.name}]")
        candidates.append((v.name, v.doc, v.settings))

    root = Path(out_root)
    if root.exists() and any(root.iterdir()) and not force:
        raise OutputError(f"{root}: exists and is not empty (use --force to replace it)")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)

    trials: list[Trial] = []
    for name, cand, settings in candidates:
        same = next((t for t, (_, d, _) in zip(trials, candidates) if d == cand), None)
        if same is not None:  # a grid point equal to an earlier candidate: its score stands
            trials.append(Trial(name, settings, same.score, 0.0, same.config))
        else:
            started = time.perf_counter()
            cfg_path = root / name / "config.yml"
            cfg_path.parent.mkdir()
            cfg_path.write_text(yaml.safe_dump(cand, sort_keys=False))
            out = root / name / "model"
            merge(cfg_path, out, force=True, **merge_options)
            score = run_eval(eval_command, out, name)
            if not keep:
                shutil.rmtree(out)
            trials.append(Trial(name, settings, score, time.perf_counter() - started, str(cfg_path)))
        if report is not None:
            report(trials[-1])

    sign = 1 if maximize else -1
    best = max(trials, key=lambda t: sign * t.score)  # max() keeps the first of equals
    best_path = root / "best.yml"
    head = f"# streammerge tune: best of {len(trials)} candidates, score {best.score:g} ({best.name})\n"
    best_path.write_text(head + Path(best.config).read_text())
    result = TuneResult(tuple(trials), best, maximize, str(best_path))
    (root / "tune.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def run_eval(eval_command: str, out: Path, name: str) -> float:
    """Run the user's command on ``out``; the score is the last word it prints."""
    cmd = eval_command.replace("{out}", shlex.quote(str(out)))
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or [""])[-1]
        raise EvalError(f"--eval for {name}: {cmd!r} exited {proc.returncode}: {tail}")
    lines = proc.stdout.split()
    last = lines[-1] if lines else ""
    try:
        score = float(last)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise EvalError(f"--eval for {name}: {cmd!r} must print a score as its last word, got {last!r}")
    return score
