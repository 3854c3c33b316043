"""model_stock's, multislerp's and slerp's compiled loops against the eager torch ops they
replace, bit for bit, on data chosen to hit their edges (signed zeros, zero deltas, NaN and
infinities, deltas over many magnitudes, tiles cut anywhere), and their fp64 statistics
against torch's sums."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from streammerge.execute import merge_tensors
from streammerge.methods import direct, fused, get_kernel, tensors

bf16, f32 = torch.bfloat16, torch.float32
N = 3 * fused.TILE + 77  # tiles and a ragged end


def _models(dtype, k, seed, specials=True):
    """A base and ``k`` models whose deltas span six decades, with zero deltas, signed
    zeros and (``specials``) an infinity and a NaN."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=gen) * 0.02
    scale = 10.0 ** torch.randint(-6, 0, (N,), generator=gen).float()
    xs = [(base + torch.randn(N, generator=gen) * scale).to(dtype) for _ in range(k)]
    base = base.to(dtype)
    for x in xs:
        x[::53] = base[::53]
        x[::101] = -0.0
    base[::101] = 0.0
    base[7::211] = -0.0
    if specials:
        xs[0][5] = float("inf")
        xs[-1][9] = float("nan")
    return base, xs


def _module(name: str):
    """A kernel module, imported the way the executor does (importing one directly first
    would leave ``get_kernel`` without the others)."""
    get_kernel(name)
    return importlib.import_module(f"streammerge.methods.{name}")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize("k", [2, 3])
def test_model_stock_combine_is_the_eager_ops(dtype, k):
    model_stock = _module("model_stock")
    base, xs = _models(dtype, k, seed=k)
    for value in (0.0, 1.0, 0.3711, -0.52, 1.7):
        t = torch.tensor(value, dtype=dtype)
        eager = t * (sum(xs) / k) + (1 - t) * base  # sum from int 0: -0 becomes +0
        out = model_stock.model_stock([*xs, base], ctx=None, stats=[t], base_index=k)
        assert _same(out, eager), value


@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize("k", [2, 4])
def test_model_stock_block_sums_are_torch_fp64_sums_to_rounding(dtype, k):
    model_stock = _module("model_stock")
    base, xs = _models(dtype, k, seed=10 + k, specials=False)
    part = model_stock.model_stock_fold(0, None, [base, *xs], base_index=0)
    offsets = [x - base for x in xs]
    expect = [(offsets[a] * offsets[b]).double().sum().item() for a, b in model_stock._pairs(k)]
    expect += [o.float().double().square().sum().item() for o in offsets]
    assert part[0] == pytest.approx(expect, rel=1e-12)


def _multislerp(xs, base, weights, normalize, eager: bool, monkeypatch):
    if eager:
        monkeypatch.setattr(tensors, "supports", lambda x: False)
        monkeypatch.setattr(direct, "loop", lambda job: None)  # no loop straight from the bytes
    try:
        inputs = xs if base is None else [*xs, base]
        weight = weights if base is None else [*weights, None]
        return merge_tensors("multislerp", inputs, base_index=None if base is None else len(xs),
                             weight=weight, normalize_weights=normalize)  # fmt: skip
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize(
    "dtype, k", [(bf16, 2), (bf16, 3), (bf16, 8), (f32, 2), (f32, 3), (f32, 4), (f32, 5)]
)
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_is_the_eager_ops(dtype, k, with_base, monkeypatch):
    """Up to 8 bfloat16 or 4 fp32 inputs the compiled loops run (5 fp32: the eager ops)."""
    base, xs = _models(dtype, k, seed=20 + k, specials=False)
    weights = np.random.default_rng(k).random(k).round(3).tolist()
    for normalize in (True, False):
        args = (xs, base if with_base else None, weights, normalize)
        compiled = _multislerp(*args, eager=False, monkeypatch=monkeypatch)
        assert _same(compiled, _multislerp(*args, eager=True, monkeypatch=monkeypatch)), normalize


def _mergekit_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit 0.1.5's ``slerp`` op for op (one output batch), on one torch thread."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b, tt, step = v0.reshape(1, -1), v1.reshape(1, -1), torch.tensor([t]).reshape(-1, 1).to(dtype), 1 << 20
    parts = [(torch.linalg.vector_norm(a[:, s : s + step].to(dtype), dim=1, keepdim=True),
              torch.linalg.vector_norm(b[:, s : s + step].to(dtype), dim=1, keepdim=True))
             for s in range(0, a.shape[1], step)]  # fmt: skip
    norm_a, norm_b = (torch.linalg.vector_norm(torch.stack(p), dim=0) for p in zip(*parts))
    norm_a, norm_b = torch.where(norm_a > 1e-8, norm_a, 1), torch.where(norm_b > 1e-8, norm_b, 1)
    dots = [((a[:, s : s + step].to(dtype) / norm_a) * (b[:, s : s + step].to(dtype) / norm_b)).sum(dim=1, keepdim=True)
            for s in range(0, a.shape[1], step)]  # fmt: skip
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, dot))
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / torch.sin(theta))
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / torch.sin(theta))
    result = torch.empty_like(a)
    result[:] = coef_a * a.to(dtype) + coef_b * b.to(dtype)
    return result.reshape(v0.shape)


def _slerp_pair(dtype, n, seed, parallel):
    """A base and a model ``parallel`` to it (scaled: the lerp path) or near it, with
    signed zeros, and an infinity and a NaN past the first tile."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=gen) * 0.02
    b = a * 1.5 if parallel else a + torch.randn(n, generator=gen) * 0.01
    a, b = a.to(dtype), b.to(dtype)
    a[::89], b[::97] = 0.0, -0.0
    return a, b


@pytest.mark.parametrize("dtype", [bf16, f32, torch.float64])
@pytest.mark.parametrize("n", [5, 3 * fused.TILE + 77, (1 << 20) + 4099, 3 << 20])
def test_slerp_is_mergekit_on_one_thread(dtype, n):
    """bfloat16 and float32 run the compiled loops, float64 the eager ops: both are
    mergekit's bits (its ops on one thread), for 1M-element blocks and their ragged ends,
    parallel inputs (lerp), t at both ends, and an infinity or a NaN in a block."""
    threads = torch.get_num_threads()
    for parallel in (False, True):
        a, b = _slerp_pair(dtype, n, seed=n % 1000 + parallel, parallel=parallel)
        for t in (0.0, 0.3, 0.5, 1.0):
            if n > 100 and t == 0.5:
                b[n // 2] = float("inf") if parallel else float("nan")
            out = merge_tensors("slerp", [a, b], base_index=0, t=t)
            torch.set_num_threads(1)
            try:
                expect = _mergekit_slerp(t, a, b)
            finally:
                torch.set_num_threads(threads)
            assert _same(out, expect), (parallel, t)


def test_slerp_statistics_do_not_depend_on_the_thread_count():
    """torch adds a reduction's per-thread partial sums: a 1M-element block's norm is
    other bits on 2 or 4 threads than on 1. slerp takes the one-thread sums whatever
    ``--threads`` says (this data differs in mergekit's own output between 1 and 4)."""
    from streammerge.methods import parallel

    a, b = _slerp_pair(f32, 3 << 20, seed=5, parallel=False)
    outs = []
    for n in (1, 2, 4):
        parallel.set_threads(n)
        try:
            outs.append(merge_tensors("slerp", [a, b], base_index=0, t=0.4))
        finally:
            parallel.set_threads(None)
    assert _same(outs[0], outs[1]) and _same(outs[0], outs[2])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _mergekit_slerp(0.4, a, b)
        torch.set_num_threads(4)
        assert not _same(one, _mergekit_slerp(0.4, a, b))  # the data shows the difference
    finally:
        torch.set_num_threads(threads)
    assert _same(outs[0], one)
