"""The Ray backend on a local 2-CPU instance: same bytes as a one-process merge, and a
worker killed mid-shard is retried. One ``ray.init`` for the module (it takes seconds).
CI installs ``.[ray]``; without Ray these tests are skipped and say why."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from conftest import SHARD, SLOW, attempts, tree, wait_for

from streammerge.backends import merge_sharded
from streammerge.shards import WorkDir

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'streammerge[ray]')")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, logging_level="ERROR")
    yield
    ray.shutdown()


def test_ray_writes_the_same_files(reference, tmp_path):
    cfg, want = reference
    merge_sharded(cfg, tmp_path / "out", backend="ray", max_memory=32 << 20, shard_nbytes=SHARD, threads=1)
    assert tree(tmp_path / "out") == want
    assert ray.is_initialized()  # the backend leaves an instance it did not start running


def test_ray_worker_killed_mid_shard_is_retried(reference, tmp_path):
    cfg, want = reference
    out = tmp_path / "out"
    result: dict = {}

    def run():
        try:
            merge_sharded(
                cfg, out, backend="ray", max_memory=32 << 20, shard_nbytes=SHARD, threads=1, io=SLOW
            )
        except BaseException as e:  # reported below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    victim = wait_for(lambda: attempts(out, 0))[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert not (WorkDir(out).root / "done" / "model-00001-of-00002.safetensors.json").exists()
    t.join(180)
    assert "error" not in result, result.get("error")
    assert tree(out) == want
