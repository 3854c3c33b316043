"""``arcee_fusion``: keep the other model's changes only where they matter most (Arcee's
"fusion", https://arcee.ai; mergekit 0.1.5's ``arcee_fusion``).

In the working dtype D, per row (last dimension) of the base B and the other model X:
``I = |X − B| · Σ_row p·log(p/q)`` with ``p = softmax(X) + 1e-8``, ``q = softmax(B) + 1e-8``;
``τ = median(I) + 1.5·(Q3 − Q1)`` with the quartiles taken as mergekit does (sorted values
at index ``int(q·(n−1))``, q in fp32); ``R = B + (X − B)·[I ≥ τ]``.

Streaming: blocks hold whole rows; the three order statistics of I are an exact radix
select over I's bit patterns (one statistics pass for 16-bit D, two for fp32), so the
result is mergekit's own for tensors of up to 1e6 elements. Differences, both deliberate:
- above 1e6 elements mergekit estimates the quartiles from 1e6 elements drawn with torch's
  global generator (so its output changes from run to run); we use the exact quartiles of
  the whole tensor, which are deterministic and what the sample estimates;
- mergekit's mask is fp32, so it writes fp32 tensors for bf16/fp16 inputs while config.json
  says otherwise; we compute the same fp32 sum and round it to D.
"""

from __future__ import annotations

import numpy as np
import torch

from . import register
from .select import Boundary, histogram, key_bits, locate, refine

QUANTILES = (0.25, 0.5, 0.75)
_INT = {16: torch.int16, 32: torch.int32}


def importance(base: torch.Tensor, x: torch.Tensor, row: int) -> torch.Tensor:
    """mergekit's ``_compute_importance`` on whole rows of ``row`` elements, in D."""
    b, p_x = base.reshape(-1, row), x.reshape(-1, row)
    diff = (p_x - b).abs()
    p = torch.softmax(p_x, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
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


def _importance(xs, base_index, ctx):
    """On the CPU whatever the device: GPU softmax and log round differently, which moves
    elements across the threshold."""
    other = 1 - base_index
    return importance(xs[base_index].cpu(), xs[other].cpu(), ctx.row)


def arcee_fold(i, acc, xs, *, ctx, stats, base_index):
    """Histogram pass ``i`` over the importance keys (high then low 16 bits for fp32)."""
    keys = order_keys(_importance(xs, base_index, ctx))
    if i == 0:
        return histogram(keys, 16 if key_bits(ctx.work_dtype) == 32 else 0, None, acc)
    lows = acc or {}
    for high in {b.key for b in stats[0]}:
        lows[high] = histogram(keys, 0, high, lows.get(high))
    return lows


def arcee_finish(i, acc, *, ctx, stats, base_index):
    ranks = quantile_ranks(int(np.prod(ctx.shape)))
    if i == 0:
        return tuple(Boundary(*locate(acc, r)) for r in ranks)
    return refine(stats[0], ranks, acc)


@register("arcee_fusion", fold=arcee_fold, finish=arcee_finish)
def arcee_fusion(xs, *, ctx, stats, base_index):
    base, x = xs[base_index], xs[1 - base_index]
    q1, median, q3 = (key_value(b.key, base.dtype) for b in stats[-1])
    threshold = median + 1.5 * (q3 - q1)
    mask = (_importance(xs, base_index, ctx) >= threshold).float().reshape(base.shape).to(base.device)
    return (base + (x - base) * mask).to(base.dtype)
