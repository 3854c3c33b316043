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
The loop also runs straight from the read bytes into the output (``linear_direct``): the
result is rounded once, from the fp32 accumulator to the output dtype, whether D is
bfloat16 or float32, so bfloat16 inputs need no conversion to D and no copy after.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from . import register
from .fused import _JIT, TILE, _f32, _fma, _load, _model, _round, addresses, bits, direct_ok, supports


def _eager(xs: list[torch.Tensor], weight: list[float], normalize: bool) -> torch.Tensor:
    acc_dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    coefficients = torch.tensor(weight, dtype=acc_dtype, device=xs[0].device)
    result = torch.zeros_like(xs[0], dtype=acc_dtype)
    for x, c in zip(xs, coefficients.unbind(0)):
        result.addcmul_(x, c.reshape((1,) * x.dim()))
    if normalize:
        result.div_(coefficients.sum())
    return result.to(xs[0].dtype)


def _signatures() -> list:
    """(the inputs' ``addresses``, float32 weights, output bits, divisor bits) for bfloat16
    (uint16) and float32 (uint32) bits: the inputs are stored as the output is."""
    out = []
    for t in (numba.uint16, numba.uint32):
        array = numba.types.Array(t, 1, "C")
        out.append(numba.void(numba.int64[::1], numba.float32[::1], array, numba.uint32))
    return out


@numba.njit(_signatures(), **_JIT)
def _linear(xs, weights, out, divisor_bits):
    """``out`` = the eager ops' bits: acc = +0, then fma(x, c, acc) per input in order, then
    acc / divisor when ``divisor_bits`` is not 0's (float32 bits of Σ c, as torch sums
    them), rounded to the inputs' dtype."""
    acc = np.empty(TILE, np.float32)
    divisor = _f32(divisor_bits)
    for lo in range(0, out.size, TILE):
        n = min(TILE, out.size - lo)
        for j in range(n):
            acc[j] = np.float32(0)
        for m in range(xs.size):
            x, c = _model(xs, m, out.size, out)[lo : lo + n], weights[m]
            for j in range(n):
                acc[j] = _fma(_load(x[j]), c, acc[j])
        o = out[lo : lo + n]
        if divisor_bits != 0:
            for j in range(n):
                o[j] = _round(acc[j] / divisor, o[j])
        else:
            for j in range(n):
                o[j] = _round(acc[j], o[j])


def linear_direct(xs, out, *, ctx, base_index=None, weight, normalize=True) -> bool:
    """``linear`` of the inputs as stored into ``out`` (the output dtype); False (nothing
    written) where the loop cannot give the same bits as converting to D first."""
    return direct_ok(xs, out, ctx.work_dtype) and _compiled(xs, out, weight, normalize)


def _compiled(xs, out, weight, normalize) -> bool:
    """Run the loop into ``out``; False where the eager ops must (a zero weight sum)."""
    coefficients = torch.tensor(weight, dtype=torch.float32)
    divisor = coefficients.sum() if normalize else torch.zeros(())
    if normalize and divisor.item() == 0:  # x / +0 is not "no division": keep torch's inf/NaN
        return False
    bits_of_divisor = np.uint32(divisor.view(torch.int32).item() & 0xFFFFFFFF)
    _linear(addresses(xs), coefficients.numpy(), bits(out), bits_of_divisor)
    return True


@register("linear", direct=linear_direct)
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
