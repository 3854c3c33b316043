"""Nothing lost, nothing silently wrong: merges stopped by kill -9, SIGINT/SIGTERM, a full
disk or an I/O error resume to the bytes of an uninterrupted merge; changed configs and
inputs refuse to resume (or commit) and say what changed."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import linear_config, write_config

import streammerge
import streammerge.write
from streammerge.journal import JOURNAL, Journal, Lock, read_journal

N_TENSORS = 21  # SMALL: embed, norm, lm_head + 2 layers x 9
# One subprocess imports torch once and forks a merge per line of JSON arguments on stdin
# (the first argument is where its output goes); it prints each child's pid, then, at the
# end of stdin, "pid exit-code" for each. Every finished tensor is journaled at once (the
# default groups are 1 GiB, which a 20 MiB merge never fills) so signals land between many
# journal lines.
FORK_SERVER = """
import json, os, sys
import streammerge.execute, streammerge.journal
from streammerge.cli import main
streammerge.journal.GROUP_NBYTES = 1
pids = []
for line in sys.stdin:
    args = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(args[0], os.O_WRONLY | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            main(args[1:], prog_name="streammerge")
        except SystemExit as e:
            os._exit(e.code if isinstance(e.code, int) else 1)
        os._exit(0)
    pids.append(pid)
    print(pid, flush=True)
for pid in pids:
    print(pid, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


@pytest.fixture(scope="module")
def setup(small, tmp_path_factory):
    """A linear merge config of the SMALL models and its uninterrupted output."""
    root = tmp_path_factory.mktemp("resume")
    cfg = write_config(root / "m.yml", linear_config(small, dtype="float32", out_dtype="bfloat16"))
    streammerge.merge(cfg, root / "clean", max_memory=8 << 20)
    return cfg, root / "clean"


def tree(out: Path) -> dict[str, bytes]:
    """Every file of an output directory (dot files included) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def journaled(out: Path) -> int:
    """Tensors a resume would keep: the journal's, or all of them once the commit removed
    the journal and the manifest vouches for every tensor (killed before the rename)."""
    partial = streammerge.write.partial_dir(out)
    head, done, _ = read_journal(partial)
    if head is None and (partial / "streammerge.json").exists():
        return N_TENSORS
    return len(done)


def signal_at(pid: int, out: Path, lines: int, delay: float, sig: int) -> int:
    """Send ``sig`` to the merge ``pid`` once ``lines`` tensors are journaled (plus ``delay``
    seconds); returns how many were journaled then."""
    partial = streammerge.write.partial_dir(out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "streammerge.json").exists():
        if (partial / JOURNAL).exists() and journaled(out) >= lines:
            time.sleep(delay)
            break
        time.sleep(0.001)
    at = journaled(out) if partial.exists() else N_TENSORS
    os.kill(pid, sig)  # a zombie if it already finished: harmless
    return at


def resume(cli, cfg: Path, out: Path):
    r = cli("merge", cfg, out, "--max-memory", "8MiB", "--no-progress", "--resume")
    assert r.exit_code == 0, r.output
    return r


def test_kill_9_sigint_and_sigterm_at_random_points_then_resume_gives_the_same_bytes(setup, cli, tmp_path):
    cfg, clean = setup
    rng = random.Random(7)
    # Random points of the merge: after k journaled tensors, plus up to 30 ms.
    plans = [(signal.SIGKILL, k) for k in rng.sample(range(0, N_TENSORS - 3), 6)]
    plans += [(signal.SIGINT, k) for k in rng.sample(range(1, N_TENSORS - 3), 2)]
    plans += [(signal.SIGTERM, rng.randrange(1, N_TENSORS - 3))]
    delays = [rng.random() * 0.03 for _ in plans]
    outs = [tmp_path / f"out{i}" for i in range(len(plans))]
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    for out in outs:
        args = [str(out) + ".err", "merge", str(cfg), str(out), "--max-memory", "8MiB",
                "--no-progress", "--threads", "1"]  # fmt: skip
        server.stdin.write(json.dumps(args) + "\n")
    server.stdin.flush()
    pids = [int(server.stdout.readline()) for _ in outs]
    with ThreadPoolExecutor(len(plans)) as pool:
        ats = list(pool.map(signal_at, pids, outs, [k for _, k in plans], delays, [s for s, _ in plans]))
    server.stdin.close()
    codes = dict(tuple(map(int, server.stdout.readline().split())) for _ in outs)
    assert server.wait(timeout=60) == 0
    runs = [(codes[pid], Path(str(out) + ".err").read_text(), at) for pid, out, at in zip(pids, outs, ats)]
    stopped = 0
    for (sig, k), out, (code, err, at) in zip(plans, outs, runs):
        if code == 0:  # finished before the signal: nothing to resume, but it must be whole
            assert tree(out) == tree(clean)
            continue
        stopped += 1
        partial = streammerge.write.partial_dir(out)
        saved = journaled(out) if partial.exists() else N_TENSORS
        assert saved >= at >= k
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            assert code == 130, err
            assert err.splitlines()[-1] == (
                f"error: interrupted; {saved} of {N_TENSORS} tensors are saved; rerun the same"
                f" command with --resume to continue from {partial}"
            )
        if partial.exists():
            assert not out.exists()  # nothing that loads as a model until the commit
        r = resume(cli, cfg, out)
        assert f"({saved} resumed)" in r.stdout or saved == 0, r.stdout
        assert tree(out) == tree(clean), (sig, k)
        assert not partial.exists()
    assert stopped >= 7  # the signals really landed mid-merge


class _Crash(BaseException):
    """Stands for a power cut at one point of the commit."""


@pytest.mark.parametrize("point", ["rename", "unlock"])
def test_a_crash_inside_the_commit_resumes(setup, cli, tmp_path, monkeypatch, point):
    cfg, clean = setup
    out = tmp_path / "out"

    def crash(*args, **kwargs):
        raise _Crash

    if point == "rename":  # after the journal is removed, before OUT.partial -> OUT
        monkeypatch.setattr(streammerge.write.os, "rename", crash)
    else:  # after the rename, before the lock file in OUT is removed
        release = Lock.release

        def dying_release(self, unlink=None):
            release(self)  # the lock dies with the process; its file stays
            if unlink is not None:
                crash()

        monkeypatch.setattr(Lock, "release", dying_release)
    with pytest.raises(_Crash):
        streammerge.merge(cfg, out, max_memory=8 << 20)
    monkeypatch.undo()
    r = resume(cli, cfg, out)
    assert f"({N_TENSORS} resumed)" in r.stdout
    assert tree(out) == tree(clean)


def _failing(real, after_nbytes: int, err: int, where: list):
    """os.pwrite that fails with ``err`` once ``after_nbytes`` bytes went through."""
    sent = [0]

    def pwrite(fd, data, offset):
        if sent[0] + len(data) > after_nbytes:
            where.append(offset)
            raise OSError(err, os.strerror(err))
        sent[0] += len(data)
        return real(fd, data, offset)

    return pwrite


def test_full_disk_mid_write_is_one_line_exit_1_then_resume_completes(setup, cli, tmp_path, monkeypatch):
    cfg, clean = setup
    out = tmp_path / "out"
    where: list[int] = []
    monkeypatch.setattr(os, "pwrite", _failing(os.pwrite, 12 << 20, errno.ENOSPC, where))
    r = cli("merge", cfg, out, "--max-memory", "8MiB", "--no-progress")
    monkeypatch.undo()
    partial = streammerge.write.partial_dir(out)
    saved = journaled(out)
    assert r.exit_code == 1 and 0 < saved < N_TENSORS
    assert r.stderr == (
        f"error: {partial / 'model.safetensors'}: write failed at byte {where[0]}: No space left on"
        f" device; {saved} of {N_TENSORS} tensors are saved; rerun the same command with --resume"
        f" to continue from {partial}\n"
    )
    assert not out.exists()
    r = resume(cli, cfg, out)
    assert f"({saved} resumed)" in r.stdout
    assert tree(out) == tree(clean)


def test_io_error_in_a_sync_is_exit_1_naming_the_shard(setup, cli, tmp_path, monkeypatch):
    cfg, clean = setup
    out = tmp_path / "out"

    def fdatasync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(streammerge.journal, "GROUP_NBYTES", 1)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    r = cli("merge", cfg, out, "--max-memory", "8MiB", "--no-progress")
    monkeypatch.undo()
    partial = streammerge.write.partial_dir(out)
    assert r.exit_code == 1
    assert r.stderr.startswith(
        f"error: {partial / 'model.safetensors'}: write-back failed: Input/output error;"
    )
    resume(cli, cfg, out)
    assert tree(out) == tree(clean)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0  # fmt: skip


def test_a_real_full_file_system_then_more_space_resumes(setup, cli, tmp_path, monkeypatch):
    """A 12 MiB tmpfs for a 20 MiB output. The preflight would refuse it, so it is told the
    disk is big (as when another program fills the disk after the merge started)."""
    cfg, clean = setup
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "12m"):
        pytest.skip("needs root and a tmpfs mount to fill a real file system")
    try:
        out = mnt / "out"
        big = types.SimpleNamespace(total=1 << 40, used=0, free=1 << 40)
        monkeypatch.setattr(streammerge.write.shutil, "disk_usage", lambda path: big)
        r = cli("merge", cfg, out, "--max-memory", "8MiB", "--no-progress")
        assert r.exit_code == 1 and "No space left on device" in r.stderr, r.output
        assert not out.exists()
        subprocess.run(["mount", "-o", "remount,size=96m", str(mnt)], check=True)
        monkeypatch.undo()
        resume(cli, cfg, out)
        assert tree(out) == tree(clean)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_resume_refuses_a_changed_config_seed_layout_or_input(setup, small, cli, tmp_path):
    cfg, clean = setup
    out = tmp_path / "out"
    partial = streammerge.write.partial_dir(out)
    shutil.copytree(clean, partial)  # a stopped merge: its shards and journal, no commit yet
    for name in ("README.md", "streammerge.json", "config.json"):
        (partial / name).unlink()
    plan = streammerge.plan(cfg, max_memory=8 << 20)
    from streammerge.journal import input_prints, state

    done = {
        n: t["xxh3_128"] for n, t in json.loads((clean / "streammerge.json").read_text())["tensors"].items()
    }
    Journal(partial, state(plan, input_prints(plan), plan.shard_nbytes), done=done).close()
    start = f"error: {partial}: cannot resume: "
    end = "; run without --resume and with --force to start over\n"
    changed = write_config(tmp_path / "c.yml", cfg.read_text().replace("weight: 0.3", "weight: 0.35"))
    r = cli("merge", changed, out, "--resume", "--no-progress")
    assert r.exit_code == 2
    assert r.stderr == start + "the config changed at models[1].parameters.weight: 0.3 -> 0.35" + end
    r = cli("merge", cfg, out, "--resume", "--no-progress", "--seed", "5")
    assert r.stderr == start + "the seed changed from 0 to 5" + end
    r = cli("merge", cfg, out, "--resume", "--no-progress", "--shard-size", "4MB")
    assert (
        r.stderr == start + "the output layout changed (1 shard(s) -> 6); was --shard-size different?" + end
    )
    # An input touched since the merge started (same size and header, maybe new bytes).
    shard = next(Path(small["ft2"]).glob("*00002*.safetensors"))
    st = shard.stat()
    try:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        r = cli("merge", cfg, out, "--resume", "--no-progress")
        assert r.stderr == start + f"input {shard} was modified since the interrupted merge started" + end
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    # Nothing changed: it resumes (every tensor checks out) to the same bytes.
    r = resume(cli, cfg, out)
    assert f"({N_TENSORS} resumed)" in r.stdout and tree(out) == tree(clean)


def test_a_damaged_journaled_tensor_is_merged_again(setup, cli, tmp_path, monkeypatch):
    cfg, clean = setup
    out = tmp_path / "out"
    where: list[int] = []
    monkeypatch.setattr(os, "pwrite", _failing(os.pwrite, 16 << 20, errno.ENOSPC, where))
    assert cli("merge", cfg, out, "--max-memory", "8MiB", "--no-progress").exit_code == 1
    monkeypatch.undo()
    partial = streammerge.write.partial_dir(out)
    _, done, _ = read_journal(partial)
    job = next(j for j in streammerge.plan(cfg).jobs if j.name in done)
    with open(partial / "model.safetensors", "r+b") as f:  # flip a bit of a journaled tensor
        f.seek(job.offset + 1)
        b = f.read(1)[0]
        f.seek(job.offset + 1)
        f.write(bytes([b ^ 1]))
    saved = len(done)
    r = resume(cli, cfg, out)
    assert f"({saved - 1} resumed)" in r.stdout
    assert tree(out) == tree(clean)


def test_an_input_changed_during_the_merge_is_not_committed(setup, small, cli, tmp_path, monkeypatch):
    cfg, _ = setup
    out = tmp_path / "out"
    shard = next(Path(small["ft1"]).glob("*00001*.safetensors"))
    st = shard.stat()
    commit = streammerge.write.OutputWriter.commit

    def touch_then_commit(self, digests):
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        commit(self, digests)

    monkeypatch.setattr(streammerge.write.OutputWriter, "commit", touch_then_commit)
    try:
        r = cli("merge", cfg, out, "--max-memory", "8MiB", "--no-progress")
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    partial = streammerge.write.partial_dir(out)
    assert r.exit_code == 2
    assert r.stderr == (
        f"error: {partial}: refusing to commit: input {shard} was modified during the merge;"
        " run again with --force to start over\n"
    )
    assert not out.exists()


def test_a_second_merge_into_the_same_out_names_the_holder(setup, cli, tmp_path):
    cfg, _ = setup
    out = tmp_path / "out"
    partial = streammerge.write.partial_dir(out)
    partial.mkdir()
    lock = Lock(partial)
    try:
        for flags in ([], ["--resume"], ["--force"]):
            r = cli("merge", cfg, out, "--no-progress", *flags)
            assert r.exit_code == 2
            assert r.stderr == (
                f"error: {partial}: another merge is writing here (pid {os.getpid()} on {os.uname().nodename})\n"
            )
    finally:
        lock.release()
    assert sorted(p.name for p in partial.iterdir()) == [".lock"]  # untouched
