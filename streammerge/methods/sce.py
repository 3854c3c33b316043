"""``sce``: select, calculate, erase (FuseLLM/FuseChat, Wan et al. 2024, arXiv:2408.07990),
as mergekit 0.1.5's ``sce``.

Over the task vectors ``TV_i = x_i − B`` in the working dtype D: with ``select_topk`` < 1,
keep in every model only the positions of the top ``k = int(count_nonzero(var)·select_topk)``
per-element variances across the models (k computed in fp32, as mergekit does); elect signs
from the unweighted sum of the kept deltas (TIES' "sum" rule); weight each model by its
share of the mean squared delta, ``w_i = s_i/Σs`` (1/N when Σs ≈ 0); and add the disjoint
weighted mean ``Σ TV_i·w_i·M_i / max(Σ w_i·M_i, 1e-6)`` to the base.

Streaming: the top-k threshold is an exact radix select over the variances' bit patterns
(one statistics pass for 16-bit D, two for fp32), ties at the threshold broken by flat
index as a stable descending sort would (mergekit's ``torch.topk`` keeps an arbitrary
subset of tied elements). The mean squares are one more pass, summed in fp64 over fixed
blocks and rounded to D (mergekit: torch's whole-tensor mean in D), so a weight can differ
in its last bit. Everything else is mergekit's own per-element op sequence.
"""

from __future__ import annotations

import numpy as np
import torch

from . import fused, register, tensors
from .gta import fast_combine_exact
from .select import Boundary, apply_mask, histogram, keep_window, key_bits, locate, magnitude_keys, refine


def _selects(select_topk: float) -> bool:
    return 0 < select_topk < 1


def _kinds(dtype: torch.dtype, select_topk: float) -> list[str]:
    kinds = []
    if _selects(select_topk):
        kinds += ["select_high", "select_low"] if key_bits(dtype) == 32 else ["select"]
    return [*kinds, "weights"]


def _task_vectors(xs, base_index):
    base = xs[base_index]
    others = [x for i, x in enumerate(xs) if i != base_index]
    tvs = base.new_empty((len(others), *base.shape))
    for row, x in enumerate(others):
        torch.sub(x, base, out=tvs[row])
    return base, tvs


def _variance(tvs: torch.Tensor) -> torch.Tensor:
    """``torch.var(tvs, dim=0, unbiased=False)``, flat; by a compiled loop where it runs
    (torch's reduction over the model axis costs ~100 ns per element on CPU)."""
    if not tensors.supports(tvs):
        return torch.var(tvs, dim=0, unbiased=False).reshape(-1)
    out = torch.empty(tvs[0].numel(), dtype=tvs.dtype)
    fused.variance(tensors.bits(tvs).reshape(len(tvs), -1), tensors.bits(out))
    return out


def _keep(tvs, ctx, stats, state, select_topk):
    """The task vectors with only the top-k variance positions kept (a 0/1 multiply, bit
    for bit); all zeros when select_topk <= 0 or k == 0."""
    if select_topk >= 1:
        return tvs
    n = int(np.prod(ctx.shape))
    selected = stats[len(_kinds(ctx.work_dtype, select_topk)) - 2] if _selects(select_topk) else None
    if selected is None or selected["k"] == 0:
        return tvs * 0
    k, boundaries = selected["k"], selected["boundaries"]
    keep = keep_window(_variance(tvs), *boundaries, n - k, n, state.setdefault("seen", {}), True)
    return apply_mask(tvs, keep)  # the same positions in every model


def sce_fold(i, acc, xs, *, ctx, stats, state, base_index, select_topk=1.0, int8_mask=False):
    """Statistics pass ``i``: a histogram of the variances' keys (with the count of nonzero
    variances), or per model the fp64 sum of D-rounded squared kept deltas."""
    kind = _kinds(ctx.work_dtype, select_topk)[i]
    _, tvs = _task_vectors(xs, base_index)
    if kind == "weights":
        squares = _keep(tvs, ctx, stats, state, select_topk).square()
        sums = squares.reshape(len(tvs), -1).double().sum(dim=1).tolist()
        return sums if acc is None else [a + s for a, s in zip(acc, sums)]
    keys = magnitude_keys(_variance(tvs))
    acc = acc or {}
    if kind == "select_low":  # low 16 bits of the keys in each boundary's high bin
        lows = acc.setdefault("lows", {})
        for high in {b.key for b in stats[0]["boundaries"]}:
            lows[high] = histogram(keys, 0, high, lows.get(high))
        return acc
    acc["nonzero"] = acc.get("nonzero", 0) + int(torch.count_nonzero(keys))
    acc["counts"] = histogram(keys, 16 if kind == "select_high" else 0, None, acc.get("counts"))
    return acc


def sce_finish(i, acc, *, ctx, stats, base_index, select_topk=1.0, int8_mask=False):
    kind = _kinds(ctx.work_dtype, select_topk)[i]
    n = int(np.prod(ctx.shape))
    if kind == "weights":
        means = torch.tensor([s / n for s in acc], dtype=ctx.work_dtype)
        total = torch.sum(means).item()
        return torch.ones_like(means) / len(means) if abs(total) < 1e-6 else means / total
    if kind == "select_low":
        first = stats[0]
        return {**first, "boundaries": refine(first["boundaries"], first["ranks"], acc["lows"])}
    # mergekit: k = int(count_nonzero(var) * select_topk), a float32 product
    k = int(np.float32(acc["nonzero"]) * np.float32(select_topk))
    ranks = (n - k, n - 1) if k else (n - 1, n - 1)
    boundaries = tuple(Boundary(*locate(acc["counts"], r)) for r in ranks)
    return {"k": k, "ranks": ranks, "boundaries": boundaries}


@register("sce", fold=sce_fold, finish=sce_finish, ordered=True)
def sce(xs, *, ctx, stats, state, base_index, select_topk=1.0, int8_mask=False):
    base, tvs = _task_vectors(xs, base_index)
    if not len(tvs):
        return base
    tvs = _keep(tvs, ctx, stats, state, select_topk)
    weights = stats[-1]
    if tensors.supports(base) and fast_combine_exact(base.dtype, len(tvs)):
        out = torch.empty_like(base, memory_format=torch.contiguous_format)
        w = weights.to(base.dtype).float().numpy()
        fused.sce_combine(tensors.bits(base), tensors.bits(tvs).reshape(len(tvs), -1), w, tensors.bits(out))
        return out
    return _combine_eager(base, tvs, weights)


def _combine_eager(base, tvs, weights):
    """mergekit's ops: sign_consensus_mask(method="sum") unweighted, then the disjoint
    weighted mean."""
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = tvs.sign() == majority
    weights = weights.to(base.device).reshape((len(tvs),) + (1,) * base.dim())
    erased = weights * erase
    merged = (tvs * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)
