"""Shard tasks and backends: identical bytes whichever way shards run, and faults.

Every way of running a merge writes the same files as the one-process ``merge``: the
sharded backends, ``run-shard`` + ``finalize`` from a shell loop, reruns after a worker
or the driver was killed. To kill something mid-shard, shards are slowed with
``--max-read-rate`` and the victim's pid is read from the attempt record it writes when
it starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SHARD, SLOW, attempts, linear_config, tree, wait_for, write_config

import streammerge
from streammerge.backends import InlineBackend, WorkerDied, drive, merge_sharded
from streammerge.config import load_config
from streammerge.errors import BackendError, ShardError
from streammerge.plan import make_plan
from streammerge.polite import TokenBucket
from streammerge.shards import ShardOptions, WorkDir, load_plan, portable, run_shard, save_plan

PY = [sys.executable, "-m", "streammerge.cli"]


def test_inline_backend_and_processes_write_the_same_files(reference, tmp_path):
    cfg, want = reference
    plan = make_plan(portable(load_config(cfg)), max_memory=32 << 20, shard_nbytes=SHARD)
    drive(plan, tmp_path / "inline", InlineBackend(), shard_nbytes=SHARD)
    assert tree(tmp_path / "inline") == want
    merge_sharded(
        cfg, tmp_path / "proc", backend="processes", workers=2, max_memory=32 << 20, shard_nbytes=SHARD
    )
    assert tree(tmp_path / "proc") == want
    assert not (tmp_path / "proc.partial").exists() and not (tmp_path / "proc" / ".streammerge").exists()


FAKE_SBATCH = """#!/usr/bin/env bash
# sbatch stand-in: runs the --wrap command now, once per --array index, in a shell loop.
array= wrap=
while [ $# -gt 0 ]; do
  case $1 in --array=*) array=${1#--array=} ;; --wrap) wrap=$2; shift ;; esac
  shift
done
if [ -n "$array" ]; then
  for i in $(seq "${array%-*}" "${array#*-}"); do SLURM_ARRAY_TASK_ID=$i bash -c "$wrap" >&2 || exit 1; done
else
  bash -c "$wrap" >&2 || exit 1
fi
echo 4242
"""


def test_slurm_script_runs_shards_and_finalize_from_a_shell_loop(reference, tmp_path):
    """tools/slurm_merge.sh with an sbatch that runs each array task in a shell loop."""
    cfg, want = reference
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STREAMMERGE=" ".join(PY))
    env.update(MAX_MEMORY="32MiB", THREADS="1", SHARD_SIZE=str(SHARD))
    script = Path(__file__).parent.parent / "tools" / "slurm_merge.sh"
    out = tmp_path / "out"
    done = subprocess.run(["bash", script, cfg, out], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert tree(out) == want
    assert "shard 1 done: model-00002-of-00002.safetensors" in done.stderr
    assert done.stdout.splitlines()[-1] == (
        f"plan {out}.plan.json: 2 shard task(s) in array job 4242; finalize is job 4242"
    )
    # A rerun of a finished plan's tasks (a requeued array task) is a harmless no-op.
    again = subprocess.run([*PY, "finalize", f"{out}.plan.json"], capture_output=True, text=True)
    assert again.returncode == 0 and tree(out) == want


def test_processes_worker_killed_mid_shard_is_retried(reference, tmp_path):
    cfg, want = reference
    out = tmp_path / "out"
    result: dict = {}

    def run():
        try:
            result["summary"] = merge_sharded(
                cfg, out, backend="processes", workers=1, max_memory=32 << 20, shard_nbytes=SHARD, io=SLOW
            )
        except BaseException as e:  # reported below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    victim = wait_for(lambda: attempts(out, 0))[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    # Only the victim could have written shard 0's marker: it was killed mid-shard.
    assert not (WorkDir(out).root / "done" / "model-00001-of-00002.safetensors.json").exists()
    t.join(120)
    assert "error" not in result, result.get("error")
    assert tree(out) == want
    assert victim != os.getpid()


def test_driver_killed_then_rerun_resumes_from_markers(reference, tmp_path):
    cfg, want = reference
    out = tmp_path / "out"
    args = [*PY, "merge", cfg, out, "--backend", "processes", "--workers", "1", "--max-memory", "32MiB"]
    args += ["--shard-size", str(SHARD), "--max-read-rate", "12MB/s"]
    driver = subprocess.Popen([str(a) for a in args], start_new_session=True, stderr=subprocess.DEVNULL)
    done_dir = WorkDir(out).root / "done"
    wait_for(lambda: len(list(done_dir.glob("*.json"))) >= 1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its worker, mid-merge
    driver.wait()
    before = {p.name: p.read_text() for p in done_dir.glob("*.json")}
    assert 1 <= len(before) < 2 and not out.exists()
    streammerge.merge(cfg, out, backend="processes", workers=1, max_memory=32 << 20, shard_nbytes=SHARD)
    assert tree(out) == want
    # The shards done before the kill were not run again: no second attempt was recorded.
    plan = make_plan(portable(load_config(cfg)), shard_nbytes=SHARD)
    for name in before:
        index = next(i for i, s in enumerate(plan.layout.shards) if f"{s.file_name}.json" == name)
        assert not (WorkDir(out).root / "attempts" / str(index)).exists()


class _DyingBackend:
    """Every task's worker dies: the driver must give up at the cap, naming the shard."""

    def map_unordered(self, fn, common, items):
        for item in items:
            yield item, WorkerDied("a worker process died"), None

    def close(self) -> None:
        pass


def test_attempt_cap_names_the_shard(reference, tmp_path):
    cfg, _ = reference
    plan = make_plan(portable(load_config(cfg)), max_memory=32 << 20, shard_nbytes=SHARD)
    with pytest.raises(ShardError) as e:
        drive(
            plan, tmp_path / "out", _DyingBackend(), options=ShardOptions(max_attempts=2), shard_nbytes=SHARD
        )
    assert (
        str(e.value)
        == "shard 0 (model-00001-of-00002.safetensors): 2 attempts failed; last: a worker process died"
    )
    # A task that finds the cap already spent on storage (Ray retries forever) refuses to run.
    work = WorkDir(tmp_path / "out")
    for _ in range(2):
        work.start_attempt(1)
    with pytest.raises(
        ShardError, match=r"^shard 1 \(model-00002-of-00002.safetensors\): 2 attempts already failed"
    ):
        run_shard(plan, tmp_path / "out", 1, ShardOptions(max_attempts=2))


def test_plan_file_errors(reference, tmp_path, cli):
    cfg, _ = reference
    plan_file = tmp_path / "p.json"
    save_plan(cfg, tmp_path / "out", plan_file, max_memory=32 << 20, shard_nbytes=SHARD)
    r = cli("finalize", plan_file)
    assert r.exit_code == 2
    assert r.stderr == (
        f"error: {tmp_path / 'out'}: 2 of 2 shards are not done, first shard 0"
        " (model-00001-of-00002.safetensors); run streammerge run-shard PLAN --shard 0\n"
    )
    doc = json.loads(plan_file.read_text())
    real = doc["plan_hash"]
    doc["plan_hash"] = "0" * 16
    plan_file.write_text(json.dumps(doc))
    r = cli("run-shard", plan_file, "--shard", "0")
    assert r.stderr == (
        f"error: {plan_file}: the inputs or streammerge changed since this plan was saved"
        f" (plan {real}, saved {'0' * 16}); plan again\n"
    )
    cfg.with_name("x.json").write_text("{}")
    assert cli("finalize", cfg.with_name("x.json")).stderr == (
        f"error: {cfg.with_name('x.json')}: not a streammerge plan file"
        " (made by: streammerge plan CONFIG OUT --save-plan)\n"
    )
    # Another plan's leftovers are never mixed in.
    other = write_config(tmp_path / "o.yml", linear_config(reference_models(cfg)).replace("0.5", "0.6"))
    r = cli("merge", other, tmp_path / "out", "--backend", "processes")
    assert r.stderr == (
        f"error: {tmp_path / 'out.partial'}: left by an unfinished merge of another plan;"
        " rerun with --force to discard it\n"
    )


def reference_models(cfg: Path) -> dict[str, Path]:
    c = load_config(cfg)
    return {Path(m.model).name: Path(m.model) for m in c.models}


def test_saved_plan_round_trips_through_its_config(reference, tmp_path):
    cfg, _ = reference
    plan = save_plan(cfg, tmp_path / "out", tmp_path / "p.json", max_memory=32 << 20, shard_nbytes=SHARD)
    assert load_plan(tmp_path / "p.json").plan.plan_hash == plan.plan_hash


def test_ray_missing_is_one_line(reference, tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    cfg, _ = reference
    r = cli("merge", cfg, tmp_path / "out", "--backend", "ray")
    assert r.exit_code == 2
    assert r.stderr == (
        "error: --backend ray needs Ray: pip install 'streammerge[ray]' (use the Ray version your cluster runs)\n"
    )
    with pytest.raises(BackendError):
        merge_sharded(cfg, tmp_path / "out2", backend="ray")


def test_token_bucket_holds_the_average_rate(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    bucket = TokenBucket(1_000_000)
    for _ in range(40):
        bucket.take(100_000)
    # 4 MB at 1 MB/s: the bucket starts empty, so exactly 4 s of (simulated) waiting.
    assert clock[0] == pytest.approx(4.0)


def test_io_nice_lowers_cpu_and_io_priority():
    code = (
        "import os, subprocess, threading; from streammerge.polite import be_nice; be_nice();"
        "print(os.getpriority(os.PRIO_PROCESS, 0));"
        "print(subprocess.run(['ionice', '-p', str(threading.get_native_id())], capture_output=True, text=True).stdout)"
    )
    got = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert int(got[0]) >= 10
    if got[1]:  # ionice present: best-effort class, lowest level
        assert got[1] == "best-effort: prio 7"


def test_kubernetes_example_is_an_indexed_job_of_run_shard():
    import yaml

    path = Path(__file__).parent.parent / "tools" / "k8s_merge_job.yaml"
    shards, final = yaml.safe_load_all(path.read_text())
    spec = shards["spec"]
    assert (shards["kind"], spec["completionMode"], spec["backoffLimitPerIndex"]) == ("Job", "Indexed", 2)
    command = spec["template"]["spec"]["containers"][0]["command"]
    plan_file = command[2]
    assert command[:2] == ["streammerge", "run-shard"] and command[3:5] == [
        "--shard",
        "$(JOB_COMPLETION_INDEX)",
    ]
    assert final["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "streammerge",
        "finalize",
        plan_file,
    ]
    # Every option the pods pass is one run-shard accepts.
    from click.testing import CliRunner

    from streammerge.cli import main

    help_text = CliRunner().invoke(main, ["run-shard", "--help"]).output
    assert all(opt in help_text for opt in command if opt.startswith("--"))
