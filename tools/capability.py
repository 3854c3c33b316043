#!/usr/bin/env python3
"""Does merging work? A CPU-sized capability-transfer benchmark, end to end.

1. Pretrain a small Llama (tools/tinyllama.py) on a mixed corpus of three synthetic skills
   (tools/skills.py: reversal, digit sorting, a letter cipher) in their short forms only
   (3-5 characters), plus full-length copying (3-8 characters) so that every position a
   long example uses is familiar: the base knows each skill on short strings, not long ones.
2. Fine-tune one copy per skill on the full skill (3-8 characters), with 30% of each batch
   replaying the pretraining corpus; save every model as safetensors + a Llama config.json.
3. Merge the three fine-tunes with each method through the streammerge CLI (a subprocess,
   as a user would) and score every model by greedy exact match on held-out test prompts.
4. Tune one method's coefficients with ``streammerge.tune`` against the validation split
   (this script's ``score`` command is the evaluation), then report the tuned config on test.

Fixed seeds, ``torch.use_deterministic_algorithms`` and a fixed thread count: two runs on
the same machine write the same table. Normalized accuracy = merged / the fine-tune's own
accuracy on its skill. Needs only torch (matplotlib for ``--plot``, extra ``bench``).

    .venv/bin/python tools/capability.py run --out cap-out --plot      # full: ~400 s CPU
    .venv/bin/python tools/capability.py run --out cap-quick --quick   # CI-sized: ~1 min
    .venv/bin/python tools/capability.py score cap-out/merged/ties --split val
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP collapses on a shared machine
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from skills import SKILLS  # noqa: E402
from tinyllama import Shape, TinyLlama, evaluate, load, save, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SKILL_NAMES = list(SKILLS)


@dataclass(frozen=True, slots=True)
class Settings:
    shape: Shape
    pre_steps: int
    ft_steps: int
    n_eval: int  # held-out prompts per skill and split
    methods: tuple[str, ...]
    sweeps: tuple[str, ...]  # the tuning grid (streammerge.sweep specs)
    tuned: str = "task_arithmetic"  # the method whose config is tuned
    pre_lr: float = 3e-3
    ft_lr: float = 3e-4
    copy: float = 0.15  # share of the pretraining corpus that is full-length copying
    replay: float = 0.3  # share of each fine-tuning batch drawn from the pretraining mix
    batch: int = 64
    seed: int = 0


ALL_METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "della",
    "slerp",
    "model_stock",
)
FULL = Settings(
    shape=Shape(layers=3, hidden=128, intermediate=344, heads=4),
    pre_steps=1500,
    ft_steps=700,
    n_eval=300,
    methods=ALL_METHODS,
    sweeps=("models[*].parameters.weight=0.6,0.7,0.8,0.9,1.0",),
)
QUICK = Settings(
    shape=Shape(layers=2, hidden=64, intermediate=172, heads=4),
    pre_steps=600,
    ft_steps=250,
    n_eval=100,
    methods=("linear", "task_arithmetic", "ties"),
    sweeps=("models[*].parameters.weight=0.7",),
    ft_lr=1e-3,
)


def method_config(method: str, models: Path) -> dict:
    """The config as a user would first write it: equal weights, mergekit-style defaults."""
    fts = [str(models / f"ft_{s}") for s in SKILL_NAMES]
    base = str(models / "base")
    per_model = {
        "linear": {"weight": 1.0},
        "task_arithmetic": {"weight": 0.5},
        "ties": {"weight": 1.0, "density": 0.5},
        "dare_ties": {"weight": 0.5, "density": 0.5},
        "dare_linear": {"weight": 0.5, "density": 0.5},
        "breadcrumbs": {"weight": 0.5, "density": 0.9, "gamma": 0.01},
        "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.1},
    }
    doc: dict = {"merge_method": method}
    if method == "slerp":  # two parents: the reversal and sorting fine-tunes, halfway
        doc |= {"base_model": fts[0], "models": [{"model": fts[1]}], "parameters": {"t": 0.5}}
    elif method == "linear":
        doc["models"] = [{"model": p, "parameters": dict(per_model[method])} for p in fts]
    elif method == "model_stock":
        doc |= {"base_model": base, "models": [{"model": p} for p in fts]}
    else:
        doc |= {
            "base_model": base,
            "models": [{"model": p, "parameters": dict(per_model[method])} for p in fts],
        }
    return doc | {"dtype": "float32"}


def streammerge_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "streammerge.cli", *args]


@dataclass
class Report:
    settings: dict
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> skill -> acc
    tuning: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def normalized(self, model: str) -> dict[str, float]:
        own = {s: self.accuracy[f"ft_{s}"][s] for s in SKILL_NAMES}
        return {s: self.accuracy[model][s] / own[s] if own[s] else 0.0 for s in SKILL_NAMES}

    def rows(self) -> list[dict]:
        out = []
        for model, acc in self.accuracy.items():
            norm = self.normalized(model)
            out.append(
                {
                    "model": model,
                    "acc": acc,
                    "avg": sum(acc.values()) / len(acc),
                    "norm": norm,
                    "norm_avg": sum(norm.values()) / len(norm),
                    "norm_min": min(norm.values()),
                }
            )
        return out

    def markdown(self) -> str:
        head = " | ".join(f"{s}" for s in SKILL_NAMES)
        lines = [
            f"| model | {head} | average | normalized: {head} | normalized average | worst skill |",
            "| --- " * (4 + 2 * len(SKILL_NAMES)) + "|",
        ]
        for r in self.rows():
            acc = " | ".join(f"{100 * r['acc'][s]:.1f}" for s in SKILL_NAMES)
            norm = " | ".join(f"{100 * r['norm'][s]:.0f}%" for s in SKILL_NAMES)
            lines.append(
                f"| {r['model']} | {acc} | {100 * r['avg']:.1f} | {norm} | {100 * r['norm_avg']:.0f}%"
                f" | {100 * r['norm_min']:.0f}% |"
            )
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "accuracy": self.accuracy,
            "rows": self.rows(),
            "tuning": self.tuning,
            "seconds": self.seconds,
        }


def setup(threads: int) -> None:
    # One thread by default: the model is too small to gain from more, and on the shared
    # 2-core machine two threads made a training step 9x slower (218 ms against 25 ms).
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def pretraining_mix(s: Settings) -> dict[tuple[str, bool], float]:
    """(skill, easy) -> share: the skills' short forms and full-length copying."""
    return {(k, True): (1 - s.copy) / len(SKILL_NAMES) for k in SKILL_NAMES} | {("copy", False): s.copy}


def build_models(s: Settings, models: Path, log) -> None:
    torch.manual_seed(s.seed)
    model = TinyLlama(s.shape)
    pre_mix = pretraining_mix(s)
    losses = train(
        model, pre_mix, steps=s.pre_steps, lr=s.pre_lr, batch_size=s.batch, seed=s.seed, warmup=200
    )
    save(model, models / "base")
    log(f"base: pretrained {s.pre_steps} steps, loss {losses[0]} -> {losses[-1]}")
    for i, skill in enumerate(SKILL_NAMES):
        ft = load(models / "base")
        mix = {(skill, False): 1.0 - s.replay}
        for key, w in pre_mix.items():
            mix[key] = mix.get(key, 0.0) + s.replay * w
        losses = train(ft, mix, steps=s.ft_steps, lr=s.ft_lr, batch_size=s.batch, seed=s.seed + 1 + i)
        save(ft, models / f"ft_{skill}")
        log(f"ft_{skill}: fine-tuned {s.ft_steps} steps, loss {losses[0]} -> {losses[-1]}")


def merge(config: dict, cfg_path: Path, out: Path, threads: int) -> None:
    import yaml

    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = streammerge_cmd(
        "merge", str(cfg_path), str(out), "--force", "--no-progress", "--threads", str(threads)
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"capability: {' '.join(cmd)} failed:\n{proc.stderr}")


def run(args) -> Report:
    s = QUICK if args.quick else FULL
    setup(args.threads)
    out = Path(args.out).resolve()
    models, merged = out / "models", out / "merged"
    report = Report(settings={"quick": args.quick, "threads": args.threads, **asdict(s)})
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.silent else (lambda msg: None)
    t0 = time.perf_counter()
    build_models(s, models, log)
    report.seconds["train"] = time.perf_counter() - t0

    def score(name: str, path: Path) -> None:
        report.accuracy[name] = evaluate(load(path), SKILL_NAMES, "test", s.n_eval, s.seed)
        log(f"{name}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in report.accuracy[name].items()))

    for name in ["base", *(f"ft_{k}" for k in SKILL_NAMES)]:
        score(name, models / name)
    t1 = time.perf_counter()
    for method in s.methods:
        merge(method_config(method, models), out / "configs" / f"{method}.yml", merged / method, args.threads)
        score(method, merged / method)
    report.seconds["merge_and_eval"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    report.tuning = tune_method(s, out, args.threads, log)
    merge_cfg = _read_yaml(Path(report.tuning["best_config"]))
    merge(merge_cfg, out / "configs" / f"{s.tuned}-tuned.yml", merged / f"{s.tuned}-tuned", args.threads)
    score(f"{s.tuned}-tuned", merged / f"{s.tuned}-tuned")
    report.seconds["tune"] = time.perf_counter() - t2
    report.seconds["total"] = time.perf_counter() - t0
    return report


def tune_method(s: Settings, out: Path, threads: int, log) -> dict:
    from streammerge.sweep import parse_sweep
    from streammerge.tune import tune

    cfg = out / "configs" / f"{s.tuned}.yml"
    here = Path(__file__).resolve()
    cmd = f"{sys.executable} {here} score {{out}} --split val --n {s.n_eval} --threads {threads}"
    result = tune(
        cfg,
        cmd,
        [parse_sweep(x) for x in s.sweeps],
        out / "tune",
        force=True,
        threads=threads,
        report=lambda t: log(f"tune {t.name}: val {100 * t.score:.2f}"),
    )
    return {
        "method": s.tuned,
        "sweeps": list(s.sweeps),
        "trials": [{"name": t.name, "val": t.score} for t in result.trials],
        "default_val": result.reference.score,
        "best": result.best.name,
        "best_val": result.best.score,
        "best_config": result.best_config,
    }


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def write_outputs(report: Report, out: Path, plot: bool) -> None:
    (out / "capability.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    t = report.tuning
    tuned = report.accuracy.get(f"{t['method']}-tuned", {})
    md = report.markdown() + (
        f"\nTuning {t['method']} on the validation split ({len(t['trials'])} candidates:"
        f" {', '.join(f'`{x}`' for x in t['sweeps'])}): default {100 * t['default_val']:.1f},"
        f" best `{t['best']}` {100 * t['best_val']:.1f} (mean accuracy over skills);"
        f" on the test split the tuned config averages"
        f" {100 * sum(tuned.values()) / max(1, len(tuned)):.1f}.\n"
    )
    (out / "capability.md").write_text(md)
    print(md)
    if plot:
        plot_chart(report, out / "capability.png")


def plot_chart(report: Report, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "--plot: matplotlib is not installed (pip install -e '.[bench]'); no chart written",
            file=sys.stderr,
        )
        return
    rows = report.rows()
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(SKILL_NAMES)
    for i, skill in enumerate(SKILL_NAMES):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax.bar(xs, [100 * r["acc"][skill] for r in rows], width, label=skill)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("exact-match accuracy on test (%)")
    ax.set_ylim(0, 118)  # room above the 100% bars for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.legend(ncols=len(SKILL_NAMES), loc="upper center")
    ax.set_title("Skills kept by each merge of three fine-tunes (tools/capability.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train, merge, evaluate, tune; write the table")
    r.add_argument("--out", default="cap-out", help="directory for models, merges and reports")
    r.add_argument("--quick", action="store_true", help="CI-sized run (about a minute)")
    r.add_argument("--plot", action="store_true", help="also write capability.png (needs matplotlib)")
    r.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    r.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    sc = sub.add_parser("score", help="print one model's mean accuracy over the skills (for tune --eval)")
    sc.add_argument("model")
    sc.add_argument("--split", choices=("val", "test"), default="val")
    sc.add_argument("--n", type=int, default=FULL.n_eval, help="prompts per skill")
    sc.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.command == "score":
        setup(args.threads)
        acc = evaluate(load(Path(args.model)), SKILL_NAMES, args.split, args.n, FULL.seed)
        print(json.dumps(acc))
        print(f"{sum(acc.values()) / len(acc):.6f}")
        return 0
    report = run(args)
    write_outputs(report, Path(args.out), args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
