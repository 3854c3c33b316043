"""``arcee_fusion``: keep the other model's changes only where they matter most (Arcee's
"fusion", https://arcee.ai; mergekit 0.1.5's ``arcee_fusion``).

In the working dtype D, per row (last dimension) of the base B and the other model X:
``I = |X − B| · Σ_row p·log(p/q)`` with ``p = softmax(X) + 1e-8``, ``q = softmax(B) + 1e-8``;
``τ = median(I) + 1.5·(Q3 − Q1)`` with the quartiles taken as mergekit does (sorted values
at index ``int(q·(n−1))``, q in fp32); ``R = B + (X − B)·[I ≥ τ]``.

Streaming: blocks hold whole rows; the three order statistics of I are an exact radix
select over I's bit patterns (one statistics pass for 16-bit D, two for fp32), so the
result is mergekit's own for tensors of up to 1e6 elements. The first pass also keeps
each row's KL sum (one D value per row), so later passes and the combine rebuild I from
``|X − B|`` without a softmax; the statistics blocks fold on every core (``reduce``).
For bfloat16 and float32 on the CPU, compiled loops (``fused``'s rounding) histogram I's
keys and compute R in one pass each, bit for bit the eager ops. Differences from
mergekit, both deliberate:
- above 1e6 elements mergekit estimates the quartiles from 1e6 elements drawn with torch's
  global generator (so its output changes from run to run); we use the exact quartiles of
  the whole tensor, which are deterministic and what the sample estimates;
- mergekit's mask is fp32, so it writes fp32 tensors for bf16/fp16 inputs while config.json
  says otherwise; we compute the same fp32 sum and round it to D.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from . import register
from .fused import _JIT, TILE, _load, _loop, _round, _rounded
from .select import Boundary, histogram, key_bits, locate, refine
from .tensors import bits, supports

QUANTILES = (0.25, 0.5, 0.75)
_INT = {16: torch.int16, 32: torch.int32}


def row_kl(base: torch.Tensor, x: torch.Tensor, row: int) -> torch.Tensor:
    """mergekit's per-row ``Σ p·log(p/q)`` on whole rows of ``row`` elements: (rows, 1) in D."""
    p = torch.softmax(x.reshape(-1, row), dim=-1) + 1e-8
    q = torch.softmax(base.reshape(-1, row), dim=-1) + 1e-8
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def importance(base: torch.Tensor, x: torch.Tensor, row: int, kl: torch.Tensor | None = None) -> torch.Tensor:
    """mergekit's ``_compute_importance`` on whole rows of ``row`` elements, in D (``kl``:
    the rows' ``row_kl``, when already known)."""
    kl = row_kl(base, x, row) if kl is None else kl.reshape(-1, 1)
    diff = (x.reshape(-1, row) - base.reshape(-1, row)).abs()
    return (diff * kl).reshape(-1)


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """Non-negative int64 keys that sort like the float values of ``x`` (signed)."""
    bits = key_bits(x.dtype)
    v = x.contiguous().view(_INT[bits]).to(torch.int64)
    return torch.where(v >= 0, v + (1 << (bits - 1)), -1 - v)


def key_value(key: int, dtype: torch.dtype) -> torch.Tensor:
    """The 0-dim tensor of ``dtype`` whose order key is ``key``."""
    bits = key_bits(dtype)
    v = key - (1 << (bits - 1)) if key >= 1 << (bits - 1) else -1 - key
    return torch.tensor(v, dtype=_INT[bits]).view(dtype)


def quantile_ranks(n: int) -> tuple[int, ...]:
    """mergekit: ``(q * (n − 1)).long()`` with q a float32 tensor."""
    return tuple(int(np.float32(q) * np.float32(n - 1)) for q in QUANTILES)


@numba.njit(inline="always", **_JIT)
def _importance_bits(b, x, kl):
    """I's bits at one element: ``round(|round(x − b)| · kl)``."""
    return _round(abs(_rounded(_load(x) - _load(b), b)) * kl, b)


@numba.njit(inline="always", **_JIT)
def _order_keys(b, x, kl, keys):
    """``keys[:b.size]`` = I's signed order keys (``order_keys``), for one row's part."""
    top = np.int64(b.itemsize * 8 - 1)
    flip = np.int64(1) << top  # a positive value's key is its bits + 2**top
    ones = (flip << 1) - 1  # a negative value's key is its bits inverted
    for j in range(b.size):
        u = np.int64(_importance_bits(b[j], x[j], kl))
        keys[j] = u ^ ((u >> top) * ones | flip)


@_loop("void({T}[::1], {T}[::1], {T}[::1], int64, int64, int64, int64[::1])")
def _key_histogram(base, x, kl, row, shift, prefix, counts):
    """Add to ``counts`` (int64[65536]) the 16-bit digit ``key >> shift`` of I's signed order
    key at every element; with ``prefix >= 0`` only keys whose bits above ``shift + 16``
    equal it count. ``kl`` holds one value per row of ``row`` elements. Keys are made a
    tile at a time (vectorized), then counted."""
    keys = np.empty(TILE, np.int64)
    sub = np.zeros((4, 65536), np.int32)  # four sub-histograms: equal keys do not queue
    for r in range(base.size // row):
        b, v = base[r * row : (r + 1) * row], x[r * row : (r + 1) * row]
        k = _load(kl[r])
        for lo in range(0, row, TILE):
            hi = min(lo + TILE, row)
            _order_keys(b[lo:hi], v[lo:hi], k, keys)
            for j in range(hi - lo):
                key = keys[j]
                if prefix < 0 or (key >> (shift + 16)) == prefix:
                    sub[j & 3, (key >> shift) & 0xFFFF] += 1
    for k in range(65536):
        counts[k] += np.int64(sub[0, k]) + sub[1, k] + sub[2, k] + sub[3, k]


@_loop("void({T}[::1], {T}[::1], {T}[::1], int64, float32, {T}[::1])")
def _fuse(base, x, kl, row, threshold, out):
    """``out = B + (X − B)·[I ≥ threshold]``: the mask in fp32, the sum in fp32, then D."""
    for r in range(base.size // row):
        b, v, o = base[r * row : (r + 1) * row], x[r * row : (r + 1) * row], out[r * row : (r + 1) * row]
        k = _load(kl[r])
        for j in range(row):
            d = _rounded(_load(v[j]) - _load(b[j]), b[j])
            m = np.float32(1) if _load(_importance_bits(b[j], v[j], k)) >= threshold else np.float32(0)
            o[j] = _round(_load(b[j]) + d * m, b[j])


def _pair(xs, base_index):
    """(B, X) on the CPU whatever the device: GPU softmax and log round differently, which
    moves elements across the threshold."""
    return xs[base_index].cpu(), xs[1 - base_index].cpu()


def _histogram(base, x, kl, row, shift, prefix, acc):
    """``select.histogram`` of I's order keys, through the compiled loop where it runs."""
    if not supports(base):
        return histogram(order_keys(importance(base, x, row, kl)), shift, prefix, acc)
    counts = np.zeros(65536, np.int64) if acc is None else acc
    _key_histogram(bits(base), bits(x), bits(kl), row, shift, -1 if prefix is None else prefix, counts)
    return counts


def arcee_fold(i, acc, xs, *, ctx, stats, base_index):
    """Pass 0: the rows' KL sums and the histogram of I's keys (the high 16 bits for fp32).
    Pass 1 (fp32): the low 16 bits of the keys in each boundary's high bin.
    ``acc`` is (histogram, or per-high histograms; KL sums of the blocks, in order)."""
    base, x = _pair(xs, base_index)
    if i == 0:
        kl = row_kl(base, x, ctx.row)
        counts = _histogram(base, x, kl, ctx.row, 16 if key_bits(ctx.work_dtype) == 32 else 0, None,
                            acc and acc[0])  # fmt: skip
        kls = acc[1] if acc else []
        kls.append(kl.reshape(-1).view(torch.uint8).numpy().copy())  # small; no view of a temporary
        return counts, kls
    kl = _rows_kl(stats, ctx, base)
    lows = acc or {}
    for high in {b.key for b in stats[0][0]}:
        lows[high] = _histogram(base, x, kl, ctx.row, 0, high, lows.get(high))
    return lows


def _rows_kl(stats, ctx, block: torch.Tensor) -> torch.Tensor:
    """The KL sums of ``block``'s rows, from the first pass's (their bytes, one D per row)."""
    item = block.element_size()
    first, rows = ctx.offset // ctx.row, block.numel() // ctx.row
    return torch.from_numpy(stats[0][1][first * item : (first + rows) * item]).view(block.dtype)


def arcee_reduce(i, acc, partial, **params):
    """Join a run of blocks' partials onto the blocks' before it (counts add, KL sums append)."""
    if acc is None:
        return partial
    if i == 0:
        acc[0][:] += partial[0]
        acc[1].extend(partial[1])
        return acc
    for high, counts in partial.items():
        if high in acc:
            acc[high] += counts
        else:
            acc[high] = counts
    return acc


def arcee_finish(i, acc, *, ctx, stats, base_index):
    """Pass 0 -> (the three boundaries, every row's KL sum); pass 1 -> the refined boundaries."""
    ranks = quantile_ranks(int(np.prod(ctx.shape)))
    if i == 0:
        return tuple(Boundary(*locate(acc[0], r)) for r in ranks), np.concatenate(acc[1])
    return refine(stats[0][0], ranks, acc)


@register("arcee_fusion", fold=arcee_fold, finish=arcee_finish, reduce=arcee_reduce)
def arcee_fusion(xs, *, ctx, stats, base_index):
    base, x = xs[base_index], xs[1 - base_index]
    bounds = stats[-1] if len(stats) > 1 else stats[0][0]
    q1, median, q3 = (key_value(b.key, base.dtype) for b in bounds)
    threshold = median + 1.5 * (q3 - q1)
    kl = _rows_kl(stats, ctx, base.cpu())
    if supports(base) and supports(x):
        out = torch.empty_like(base, memory_format=torch.contiguous_format)
        _fuse(bits(base), bits(x), bits(kl), ctx.row, np.float32(threshold.float().item()), bits(out))
        return out
    b, p_x = _pair(xs, base_index)
    mask = (importance(b, p_x, ctx.row, kl) >= threshold).float().reshape(base.shape).to(base.device)
    return (base + (x - base) * mask).to(base.dtype)
