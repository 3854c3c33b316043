"""``slerp``: spherical interpolation between the base (t = 0) and one other model (t = 1),
the whole tensor as one vector (Shoemake 1985; mergekit's ``slerp``).

mergekit 0.1.5, op by op, in fp32 (fp64 for fp64 inputs): the norms of A and B are
taken per 1,048,576-element block and then as the norm of the block norms (first pass);
the dot product of the normalised tensors is summed per block and clamped to [−1, 1]
(second pass); ``|d| > 0.9995`` falls back to linear interpolation; otherwise
``R = sin((1−t)θ)/sin θ · A + sin(tθ)/sin θ · B``, rounded to the working dtype. The
executor hands the passes exactly those 1M-element blocks, so results are bit-identical
to mergekit whatever the chunk size.

The blocks' norms and sums are torch's own calls, run on one thread: torch splits a
reduction over its threads and adds their partial sums, so with T threads a block's norm
can differ in its last bit from the single-threaded one, and mergekit's output with it.
Ours is the single-threaded result (mergekit under ``OMP_NUM_THREADS=1``) whatever
``--threads`` says, and the blocks fold on every core at once. For bfloat16 and float32
on CPU the element-wise steps (the normalised products, the weighted sum) are compiled
loops (``fused``'s conventions), each float32 operation the eager one: the same bits.
"""

from __future__ import annotations

import numpy as np
import torch

from . import register, tensors
from .fused import _load, _loop, _round

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _pair(xs, base_index):
    a, b = xs[base_index], xs[1 - base_index]
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    return a.reshape(1, -1).to(dtype), b.reshape(1, -1).to(dtype)  # mergekit's (batch=1, n)


@_loop("void({T}[::1], {T}[::1], float32, float32, float32[::1])")
def products(a, b, norm_a, norm_b, out):
    """``out`` = (a / ‖A‖)·(b / ‖B‖) in float32: the normalised blocks' products, which
    torch then sums."""
    for j in range(a.size):
        out[j] = (_load(a[j]) / norm_a) * (_load(b[j]) / norm_b)


@_loop("void({T}[::1], {T}[::1], float32, float32, {T}[::1])")
def weighted(a, b, coef_a, coef_b, out):
    """``out`` = coef_a·a + coef_b·b in float32, rounded to the inputs' dtype."""
    for j in range(a.size):
        out[j] = _round(coef_a * _load(a[j]) + coef_b * _load(b[j]), a[j])


def _norm(x: torch.Tensor) -> float:
    return torch.linalg.vector_norm(x, dim=1, keepdim=True).item()


def _dot(xs, base_index, norms) -> float:
    """Σ (A/‖A‖)·(B/‖B‖) over one block, as mergekit: the products, then torch's sum."""
    a, b = xs[base_index], xs[1 - base_index]
    if tensors.supports(a) and a.dtype == b.dtype:
        out = np.empty(a.numel(), np.float32)
        products(tensors.bits(a), tensors.bits(b), *(np.float32(n.item()) for n in norms), out)
        return torch.from_numpy(out).reshape(1, -1).sum(dim=1, keepdim=True).item()
    a, b = _pair(xs, base_index)
    norm_a, norm_b = norms
    return ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).item()


def slerp_fold(i, acc, xs, *, stats, base_index, t):
    """Pass 0: this block's norms of A and B. Pass 1: its dot of the normalised blocks.

    Partials are kept as Python floats (exactly the fp32/fp64 values): small tensors that
    outlive each block would pin glibc's heap above every block's temporaries.
    """
    parts = acc or ([], [])
    if i == 0:
        a, b = _pair(xs, base_index)
        parts[0].append(tensors.one_thread(_norm, a))
        parts[1].append(tensors.one_thread(_norm, b))
    else:
        parts[0].append(tensors.one_thread(_dot, xs, base_index, stats[0]))
    return parts


def slerp_reduce(i, acc, partial, *, ctx, base_index, t):
    """Join a run of blocks' partials onto the earlier runs', in block order."""
    if acc is None:
        return partial
    for mine, theirs in zip(acc, partial):
        mine.extend(theirs)
    return acc


def _stacked(values: list[float], dtype: torch.dtype) -> torch.Tensor:
    """The per-block partials as mergekit stacks them: shape (blocks, 1, 1)."""
    return torch.tensor(values, dtype=dtype).reshape(-1, 1, 1)


def slerp_finish(i, acc, *, ctx, stats, base_index, t):
    """Pass 0 -> (‖A‖, ‖B‖) with tiny norms replaced by 1. Pass 1 -> the two coefficients."""
    dtype = torch.float64 if ctx.work_dtype == torch.float64 else torch.float32
    if i == 0:
        norm_a = tensors.one_thread(torch.linalg.vector_norm, _stacked(acc[0], dtype), 2, 0)
        norm_b = tensors.one_thread(torch.linalg.vector_norm, _stacked(acc[1], dtype), 2, 0)
        return torch.where(norm_a > EPS, norm_a, 1), torch.where(norm_b > EPS, norm_b, 1)
    dot = tensors.one_thread(torch.sum, _stacked(acc[0], dtype), 0).clamp(-1, 1)
    tt = torch.tensor([t], dtype=torch.float32).reshape(-1, 1).to(dot.dtype)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return coef_a, coef_b


@register("slerp", fold=slerp_fold, finish=slerp_finish, reduce=slerp_reduce)
def slerp(xs, *, stats, base_index, t):
    """One block of ``coef_a·A + coef_b·B`` in fp32, returned in the working dtype."""
    a, b = xs[base_index], xs[1 - base_index]
    if stats and tensors.supports(a) and a.dtype == b.dtype:
        out = torch.empty_like(a, memory_format=torch.contiguous_format)
        coef_a, coef_b = (np.float32(c.item()) for c in stats[1])
        weighted(tensors.bits(a), tensors.bits(b), coef_a, coef_b, tensors.bits(out))
        return out
    a, b = _pair(xs, base_index)
    if not stats:  # an empty tensor: nothing to normalise
        tt = torch.tensor(t, dtype=a.dtype)
        return ((1 - tt) * a + tt * b).reshape(xs[0].shape).to(xs[0].dtype)
    coef_a, coef_b = (c.to(a.device) for c in stats[1])
    return (coef_a * a + coef_b * b).reshape(xs[0].shape).to(xs[0].dtype)
