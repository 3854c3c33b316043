"""plan: header-only, torch-free, fast for 70B-class models, and exactly sized."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import linear_config

from streammerge.config import parse_config
from streammerge.demo import LLAMA_70B, write_checkpoint
from streammerge.errors import BudgetError
from streammerge.plan import make_plan

PROBE = textwrap.dedent("""
    import json, sys, time
    def rchar():
        with open("/proc/self/io") as f:
            return int(next(l for l in f if l.startswith("rchar")).split()[1])
    import streammerge, streammerge.plan
    r0, t0 = rchar(), time.perf_counter()
    plan = streammerge.plan(sys.argv[1], max_memory=8 << 30)
    print(json.dumps({"seconds": time.perf_counter() - t0, "read_nbytes": rchar() - r0,
                      "torch": "torch" in sys.modules, "tensors": len(plan.jobs),
                      "shards": len(plan.layout.shards), "input_nbytes": plan.estimate.read_nbytes}))
""")


@pytest.fixture(scope="module")
def sparse_70b(tmp_path_factory):
    root = tmp_path_factory.mktemp("70b")
    for name, seed in (("base", None), ("ft", 1)):
        write_checkpoint(root / name, LLAMA_70B, model_seed=seed, n_shards=30, sparse=True, tokenizer=False)
    cfg = root / "ta.yml"
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\nmodels:\n"
        f"  - model: {root / 'ft'}\n    parameters: {{weight: 0.5}}\n"
    )
    return cfg


def test_plan_of_a_70b_merge_is_fast_reads_no_tensor_data_and_skips_torch(sparse_70b):
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(sparse_70b)], capture_output=True, text=True, check=True
    )
    got = json.loads(r.stdout)
    assert got["tensors"] == 723 and got["input_nbytes"] > 280e9  # two 141 GB bf16 models
    assert got["seconds"] < 2.0, got
    assert got["read_nbytes"] < 8 << 20, got  # headers only: ~100 KB per shard
    assert got["torch"] is False
    assert got["shards"] == 30  # 141 GB in shards of at most 5 GB (whole tensors only)


def test_layout_follows_base_order_and_mergekit_flush_rule(tiny):
    plan = make_plan(parse_config(linear_config(tiny)), shard_nbytes=2_000_000, max_memory=64 << 20)
    sizes = [s.nbytes for s in plan.layout.shards]
    names = [n for s in plan.layout.shards for n in s.tensors]
    assert sorted(names) == sorted(j.name for j in plan.jobs)
    assert all(size <= 2_000_000 + len(s.header) for size, s in zip(sizes, plan.layout.shards))
    # Jobs run in file order: shard by shard, offset by offset.
    assert [(j.shard, j.offset) for j in plan.jobs] == sorted((j.shard, j.offset) for j in plan.jobs)
    # Packing follows the base model's own tensor order (its files, then offsets in each).
    from streammerge.checkpoint import open_checkpoint

    order = {n: i for i, n in enumerate(open_checkpoint(tiny["base"]).tensors)}
    spans = [(min(order[n] for n in s.tensors), max(order[n] for n in s.tensors)) for s in plan.layout.shards]
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), spans


def test_estimate_fits_the_budget_and_is_what_the_executor_allocates(small):
    cfg = parse_config(linear_config(small))
    for budget in (8 << 20, 32 << 20, 256 << 20):
        plan = make_plan(cfg, max_memory=budget)
        e = plan.estimate
        assert e.peak_nbytes <= budget
        # 3 bf16 inputs + 1 bf16 output, each double-buffered: 16 bytes per chunk element;
        # a streamed tensor's chunks are equal (whole blocks), never above the budget's
        assert all(j.chunk_elems <= e.chunk_elems for j in plan.jobs)
        assert e.read_set_nbytes == max(min(j.chunk_elems, j.numel) for j in plan.jobs) * 6
    with pytest.raises(BudgetError, match="--max-memory 1048576 bytes is too small; use at least 8MiB"):
        make_plan(cfg, max_memory=1 << 20)


def test_plan_hash_is_stable_and_tracks_the_config(tiny):
    a = make_plan(parse_config(linear_config(tiny)), max_memory=64 << 20)
    b = make_plan(parse_config(linear_config(tiny)), max_memory=1 << 30)
    c = make_plan(parse_config(linear_config(tiny).replace("0.3", "0.31")), max_memory=64 << 20)
    assert a.plan_hash == b.plan_hash != c.plan_hash


def _job(name: str, numel: int, chunk: int, inputs: int = 1, passes: int = 0, derived: bool = False):
    from streammerge.checkpoint import TensorRef
    from streammerge.plan import Job

    ref = TensorRef("m.safetensors", 64, "BF16", (numel,), object() if derived else None)
    return Job(name, "linear", (ref,) * inputs, None, ({},) * inputs, {}, "BF16", "BF16", (numel,), 0, 0,
               passes=passes, chunk_elems=chunk)  # fmt: skip


def test_resident_buffers_follow_the_executors_buffers():
    """Hand-derived: mapped inputs are resident only in flight (the read merged and the
    next), write buffers and copied-into read sets keep their largest chunk."""
    from streammerge.plan import _resident_buffers

    mib = 1 << 20
    # two one-chunk tensors of 100 Mi elements (bf16: 200 MiB read and written each), then a small one:
    # merging the second, the first's write buffer (200) and its own (200) are held, its
    # read (200) and the next one's (2) are mapped
    big = [_job("a", 100 * mib, 100 * mib), _job("b", 100 * mib, 100 * mib), _job("c", mib, 100 * mib)]
    assert _resident_buffers(tuple(big)) == (200 + 200 + 200 + 2) * mib
    # one big tensor among small ones: its read, its write buffer, a small write, the small next read
    one = [_job("a", mib, 100 * mib), _job("b", 100 * mib, 100 * mib), _job("c", mib, 100 * mib)]
    assert _resident_buffers(tuple(one)) == (2 + 200 + 200 + 2) * mib
    # a tensor in full chunks: both read sets' worth in flight, both write buffers full
    many = [_job("a", 300 * mib, 100 * mib, inputs=3)]
    assert _resident_buffers(tuple(many)) == (2 * 600 + 2 * 200) * mib
    # a statistics pass writes nothing: merging the combine's first chunk, it and the next
    # are mapped and one write buffer is full; merging the last, it alone and both
    stats = [_job("a", 200 * mib, 100 * mib, passes=1)]
    assert _resident_buffers(tuple(stats)) == (200 + 200 + 200) * mib
    # derived (copied) inputs keep both read sets at their largest chunk, after the tensor too
    copied = [
        _job("a", 100 * mib, 100 * mib, derived=True),
        _job("b", mib, 100 * mib),
        _job("c", mib, 100 * mib),
    ]
    assert _resident_buffers(tuple(copied)) == (200 + 2 + 2 + 200 + 2) * mib
