"""``nuslerp``: spherical interpolation of two models (or of their task vectors from a
base), with t from their weights: ``t = w_Q / (w_P + w_Q)`` (0.5 when the sum is ~0).
mergekit 0.1.5's ``nuslerp``, all in the working dtype D with no upcast.

``nuslerp_flatten`` (default) treats the tensor as one vector: its two norms and the cosine
come from statistics passes, summed in fp64 over fixed blocks and rounded to D, where
mergekit sums in D with torch's whole-tensor reduction, so the cosine can differ in its
last bit (counted by the parity tool). Without flattening every row is its own vector and
the computation is mergekit's own, bit for bit. ``nuslerp_row_wise`` (without flattening;
vectors along dim 0, i.e. the columns of a matrix, the reverse of mergekit's docs' wording)
gets each column's norms and cosine from the same two passes, one fp64 sum per column.
"""

from __future__ import annotations

import numpy as np
import torch

from . import register

EPS = 1e-8


def _t(weight, others) -> float:
    w0, w1 = (weight[i] for i in others)
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def _vectors(xs, base_index):
    """(base or None, v0, v1): the two inputs, as task vectors when there is a base."""
    others = [i for i in range(len(xs)) if i != base_index]
    base = xs[base_index] if base_index is not None else None
    v0, v1 = (xs[i] for i in others)
    if base is not None:
        v0, v1 = v0 - base, v1 - base
    return base, v0, v1, others


def _angle(cos_theta):
    colinear = (1 - cos_theta.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    return colinear, theta, torch.sin(theta)


def _interpolate(t, v0, v1, colinear, theta, sin_theta):
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    return torch.where(colinear, (1 - t) * v0 + t * v1, result)


def _vector_count(ctx) -> int:
    """Row-wise mode: how many vectors along dim 0 (the positions past dim 0)."""
    return int(np.prod(ctx.shape)) // ctx.shape[0] if len(ctx.shape) >= 2 else 1


def _columns(ctx, n: int, device) -> torch.Tensor:
    """Row-wise mode: the vector of each element of the block at ``ctx.offset``."""
    return torch.arange(ctx.offset, ctx.offset + n, device=device) % _vector_count(ctx)


def _sum(values: torch.Tensor, columns: torch.Tensor | None, size: int, acc):
    """fp64 sum of ``values`` (per vector when ``columns`` is given), added to ``acc``."""
    values = values.double().reshape(-1)
    if columns is None:
        total = values.sum().reshape(1)
    else:
        total = torch.zeros(size, dtype=torch.float64, device=values.device).index_add_(0, columns, values)
    return total if acc is None else acc.add_(total)


def _per_element(stat: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    return stat if columns is None else stat[columns]


def nuslerp_fold(i, acc, xs, *, ctx, stats, base_index, weight, nuslerp_flatten=True, nuslerp_row_wise=False):
    """Pass 0: sums of squares of v0 and v1 (fp32 squares, like torch.norm). Pass 1: the
    dot product of the normalised vectors, products rounded to D as mergekit multiplies.
    Flattened: one sum each; row-wise: one per column (vector along dim 0)."""
    _, v0, v1, _ = _vectors(xs, base_index)
    columns, size = (
        (None, 1) if nuslerp_flatten else (_columns(ctx, v0.numel(), v0.device), _vector_count(ctx))
    )
    a, b = acc or (None, None)
    if i == 0:
        return _sum(v0.float().square(), columns, size, a), _sum(v1.float().square(), columns, size, b)
    n0, n1 = (_per_element(n, columns) for n in stats[0])
    return _sum((v0 / n0) * (v1 / n1), columns, size, a), None


def nuslerp_finish(i, acc, *, ctx, stats, base_index, weight, nuslerp_flatten=True, nuslerp_row_wise=False):
    dtype = ctx.work_dtype
    if i == 0:
        return tuple(s.sqrt().to(dtype).clamp(min=1e-7) for s in acc)
    return _angle(acc[0].to(dtype).clamp(-1, 1))


@register("nuslerp", fold=nuslerp_fold, finish=nuslerp_finish)
def nuslerp(xs, *, ctx, stats, base_index, weight, nuslerp_flatten=True, nuslerp_row_wise=False):
    base, v0, v1, others = _vectors(xs, base_index)
    t = _t(weight, others)
    if nuslerp_flatten:
        result = _interpolate(t, v0, v1, *stats[1])
    elif nuslerp_row_wise:  # vectors along dim 0: each element takes its column's angle
        columns = _columns(ctx, v0.numel(), v0.device)
        result = _interpolate(t, v0, v1, *(_per_element(s, columns) for s in stats[1]))
    else:  # each row (last dimension) is a vector: mergekit's computation on whole rows
        row = ctx.row  # blocks hold whole rows (a 1-D tensor whole)
        r0, r1 = v0.reshape(-1, row), v1.reshape(-1, row)
        u0 = r0 / torch.norm(r0, dim=-1, keepdim=True).clamp(min=1e-7)
        u1 = r1 / torch.norm(r1, dim=-1, keepdim=True).clamp(min=1e-7)
        cos_theta = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
        result = _interpolate(t, r0, r1, *_angle(cos_theta)).reshape(v0.shape)
    return result if base is None else base + result
