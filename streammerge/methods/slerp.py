"""``slerp``: spherical interpolation between the base (t = 0) and one other model (t = 1),
the whole tensor as one vector (Shoemake 1985; mergekit's ``slerp``).

mergekit 0.1.5, op by op, in fp32 (fp64 for fp64 inputs): the norms of A and B are
taken per 1,048,576-element block and then as the norm of the block norms (first pass);
the dot product of the normalised tensors is summed per block and clamped to [−1, 1]
(second pass); ``|d| > 0.9995`` falls back to linear interpolation; otherwise
``R = sin((1−t)θ)/sin θ · A + sin(tθ)/sin θ · B``, rounded to the working dtype. The
executor hands the passes exactly those 1M-element blocks, so results are bit-identical
to mergekit whatever the chunk size.
"""

from __future__ import annotations

import torch

from . import register

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _pair(xs, base_index):
    a, b = xs[base_index], xs[1 - base_index]
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    return a.reshape(1, -1).to(dtype), b.reshape(1, -1).to(dtype)  # mergekit's (batch=1, n)


def slerp_fold(i, acc, xs, *, stats, base_index, t):
    """Pass 0: this block's norms of A and B. Pass 1: its dot of the normalised blocks.

    Partials are kept as Python floats (exactly the fp32/fp64 values): small tensors that
    outlive each block would pin glibc's heap above every block's temporaries.
    """
    a, b = _pair(xs, base_index)
    parts = acc or ([], [])
    if i == 0:
        parts[0].append(torch.linalg.vector_norm(a, dim=1, keepdim=True).item())
        parts[1].append(torch.linalg.vector_norm(b, dim=1, keepdim=True).item())
    else:
        norm_a, norm_b = (n.to(a.device) for n in stats[0])
        parts[0].append(((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).item())
    return parts


def _stacked(values: list[float], dtype: torch.dtype) -> torch.Tensor:
    """The per-block partials as mergekit stacks them: shape (blocks, 1, 1)."""
    return torch.tensor(values, dtype=dtype).reshape(-1, 1, 1)


def slerp_finish(i, acc, *, ctx, stats, base_index, t):
    """Pass 0 -> (‖A‖, ‖B‖) with tiny norms replaced by 1. Pass 1 -> the two coefficients."""
    dtype = torch.float64 if ctx.work_dtype == torch.float64 else torch.float32
    if i == 0:
        norm_a = torch.linalg.vector_norm(_stacked(acc[0], dtype), dim=0)
        norm_b = torch.linalg.vector_norm(_stacked(acc[1], dtype), dim=0)
        return torch.where(norm_a > EPS, norm_a, 1), torch.where(norm_b > EPS, norm_b, 1)
    dot = _stacked(acc[0], dtype).sum(dim=0).clamp(-1, 1)
    tt = torch.tensor([t], dtype=torch.float32).reshape(-1, 1).to(dot.dtype)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return coef_a, coef_b


@register("slerp", fold=slerp_fold, finish=slerp_finish)
def slerp(xs, *, stats, base_index, t):
    """One block of ``coef_a·A + coef_b·B`` in fp32, returned in the working dtype."""
    a, b = _pair(xs, base_index)
    if not stats:  # an empty tensor: nothing to normalise
        tt = torch.tensor(t, dtype=a.dtype)
        return ((1 - tt) * a + tt * b).reshape(xs[0].shape).to(xs[0].dtype)
    coef_a, coef_b = (c.to(a.device) for c in stats[1])
    return (coef_a * a + coef_b * b).reshape(xs[0].shape).to(xs[0].dtype)
