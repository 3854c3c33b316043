"""nuslerp's compiled loops against its eager torch ops, bit for bit, through the executor
(``merge_tensors``): flattened, row-wise (columns) and per-row, bfloat16 and float32, with
and without a base, on shapes whose statistics blocks start mid-row, rows longer than a
block, 1-D tensors, colinear and zero task vectors, signed zeros; and the same bits for any
chunk, block and thread count (the statistics runs are joined in block order)."""

from __future__ import annotations

import pytest
import torch

from streammerge.execute import merge_tensors
from streammerge.methods import direct, parallel, tensors

bf16, f32 = torch.bfloat16, torch.float32
MODES = {
    "flat": {},
    "columns": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    "rows": {"nuslerp_flatten": False},
}


def _inputs(shape, dtype, seed, with_base=True):
    """[ft1, ft2, base]: small task vectors; in column 1 (and element 1 of a 1-D tensor)
    ft2's is twice ft1's (colinear), in column 2 both are zero, and a few elements equal the
    base (zero deltas, some of them -0)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen) * 0.02
    d0, d1 = (torch.randn(shape, generator=gen) * 0.002 for _ in range(2))
    d0, d1 = d0.to(dtype).float(), d1.to(dtype).float()
    view0, view1 = (d.reshape(-1, shape[-1]) if len(shape) > 1 else d.reshape(1, -1) for d in (d0, d1))
    if view0.shape[1] > 2:
        view1[:, 1] = 2 * view0[:, 1]
        view0[:, 2] = view1[:, 2] = 0
    d0.view(-1)[::13] = 0
    xs = [(base + d0).to(dtype), (base + d1).to(dtype), base.to(dtype)]
    xs[0].view(-1)[::29] = xs[2].view(-1)[::29]
    if not with_base:
        return [(d0 + 0).to(dtype), d1.to(dtype)], None
    return xs, 2


def _merge(xs, base, mode, **extra):
    weight = [0.4, 0.6] + ([None] if base is not None else [])
    return merge_tensors("nuslerp", xs, base_index=base, weight=weight, **MODES[mode], **extra)


def _same(a, b) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize(
    "shape, with_base",
    [((300, 700), True), ((40, 3000), False), ((3, 70_000), True), ((100_003,), True), ((7, 1), True)],
)
def test_compiled_loops_are_the_eager_ops(dtype, mode, shape, with_base, monkeypatch):
    xs, base = _inputs(shape, dtype, seed=len(shape) + shape[0], with_base=with_base)
    compiled = _merge(xs, base, mode)
    monkeypatch.setattr(tensors, "supports", lambda x: False)
    monkeypatch.setattr(direct, "loop", lambda job: None)  # no loop straight from the bytes
    eager = _merge(xs, base, mode)
    assert _same(compiled, eager), (mode, shape)


@pytest.mark.parametrize("mode", ["flat", "columns"])
@pytest.mark.parametrize("shape", [(300, 700), (3, 70_000)])
def test_statistics_runs_join_in_block_order(mode, shape, monkeypatch):
    """Chunks, blocks and threads change how blocks are grouped into runs, never a bit."""
    monkeypatch.setattr(parallel, "MIN_PART", 1 << 12)
    xs, base = _inputs(shape, bf16, seed=5)
    whole = _merge(xs, base, mode)
    old = torch.get_num_threads()
    try:
        for threads, chunk, block in [(1, 70_000, 1 << 14), (2, 140_000, 1 << 16), (2, 1 << 21, 1 << 20)]:
            parallel.set_threads(threads)
            part = _merge(xs, base, mode, chunk_elems=chunk, block_elems=block)
            assert _same(part, whole), (threads, chunk, block)
    finally:
        parallel.set_threads(None)
        torch.set_num_threads(old)


def test_colinear_columns_are_lerped():
    # column 1: v1 = 2·v0, so its cosine rounds to 1 in bf16 and it takes the lerp
    # 0.4·v0 + 0.6·v1 (each step rounded to bf16); column 2: both zero, so zero
    gen = torch.Generator().manual_seed(3)
    v0, v1 = ((torch.randn(64, 16, generator=gen) * 0.002).to(bf16) for _ in range(2))
    v1[:, 1] = 2 * v0[:, 1]
    v0[:, 2] = v1[:, 2] = 0
    out = _merge([v0, v1], None, "columns")
    assert torch.equal(out[:, 1], (0.4 * v0 + 0.6 * v1)[:, 1])
    assert not torch.equal(out[:, 3], (0.4 * v0 + 0.6 * v1)[:, 3])  # an angle: slerped
    assert out[:, 2].tolist() == [0.0] * 64
