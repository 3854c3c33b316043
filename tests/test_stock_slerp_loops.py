"""model_stock's and multislerp's compiled loops against the eager torch ops they replace,
bit for bit, on data chosen to hit their edges (signed zeros, zero deltas, NaN and
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
