"""``linear``: the weighted average of the inputs (Wortsman et al. 2022, model soups,
https://arxiv.org/abs/2203.05482).

``R = Σ c_i·x_i / Σ c_i`` (without ``normalize``: no division), accumulated in fp32
(fp64 for fp64 inputs) with one fused multiply-add per input in gather order, divided
once, rounded to the working dtype once. This is mergekit 0.1.5's op sequence
(``torch.addcmul_`` into an fp32 accumulator), so results are bit-identical to it.
Like mergekit, a zero weight sum with ``normalize`` gives inf/NaN; the planner rejects it.

For bfloat16 and float32 on the CPU a compiled loop does the whole sequence a tile at a
time (the eager ops make five passes over block-sized fp32 temporaries), each step the
same float32 operation torch does; float16, float64 and other devices run the eager ops.
The loop also runs straight from the read bytes into the output, without torch
(``direct``): the result is rounded once, from the fp32 accumulator to the output dtype,
whether D is bfloat16 or float32, so bfloat16 inputs need no conversion to D and no copy
after.
"""

from __future__ import annotations

import torch

from . import direct, fused, register
from .tensors import addresses, bits, supports


def _eager(xs: list[torch.Tensor], weight: list[float], normalize: bool) -> torch.Tensor:
    acc_dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    coefficients = torch.tensor(weight, dtype=acc_dtype, device=xs[0].device)
    result = torch.zeros_like(xs[0], dtype=acc_dtype)
    for x, c in zip(xs, coefficients.unbind(0)):
        result.addcmul_(x, c.reshape((1,) * x.dim()))
    if normalize:
        result.div_(coefficients.sum())
    return result.to(xs[0].dtype)


def _compiled(xs, out, weight, normalize) -> bool:
    """Run the loop into ``out``; False where the eager ops must (a zero weight sum)."""
    scalars = direct.linear_scalars(weight, normalize)
    if scalars is None:  # a zero sum: keep torch's inf/NaN
        return False
    weights, divisor = scalars
    fused.weighted_sum(addresses(xs), weights, bits(out), divisor)
    return True


@register("linear")
def linear(
    xs: list[torch.Tensor],
    *,
    base_index: int | None = None,
    weight: list[float],
    normalize: bool = True,
) -> torch.Tensor:
    """xs: the inputs (same shape, dtype D); weight: one per input. Returns dtype D."""
    if all(supports(x) and x.dtype == xs[0].dtype and x.is_contiguous() for x in xs):
        out = torch.empty_like(xs[0], memory_format=torch.contiguous_format)
        if _compiled(xs, out, weight, normalize):
            return out
    return _eager(xs, weight, normalize)
