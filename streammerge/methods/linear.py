"""``linear``: the weighted average of the inputs (Wortsman et al. 2022, model soups,
https://arxiv.org/abs/2203.05482).

``R = Σ c_i·x_i / Σ c_i`` (without ``normalize``: no division), accumulated in fp32
(fp64 for fp64 inputs) with one fused multiply-add per input in gather order, divided
once, rounded to the working dtype once. This is mergekit 0.1.5's op sequence
(``torch.addcmul_`` into an fp32 accumulator), so results are bit-identical to it.
Like mergekit, a zero weight sum with ``normalize`` gives inf/NaN; the planner rejects it.
"""

from __future__ import annotations

import torch

from . import register


@register("linear")
def linear(
    xs: list[torch.Tensor],
    *,
    base_index: int | None = None,
    weight: list[float],
    normalize: bool = True,
) -> torch.Tensor:
    """xs: the inputs (same shape, dtype D); weight: one per input. Returns dtype D."""
    acc_dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    coefficients = torch.tensor(weight, dtype=acc_dtype, device=xs[0].device)
    result = torch.zeros_like(xs[0], dtype=acc_dtype)
    for x, c in zip(xs, coefficients.unbind(0)):
        result.addcmul_(x, c.reshape((1,) * x.dim()))
    if normalize:
        result.div_(coefficients.sum())
    return result.to(xs[0].dtype)
