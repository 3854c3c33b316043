"""``nearswap``: take the other model where it is close to the base, blend elsewhere
(alchemonaut, QuartetAnemoi-70B-t0.0001).

``w = clamp(t / clamp(|B − X|, min=1e-6), 0, 1);  R = w·X + (1 − w)·B``, every op in the
working dtype, as mergekit 0.1.5: entries with ``|B − X| ≤ t`` take X fully.

For bfloat16 and float32 on the CPU one compiled loop does the nine eager ops in a single
pass, each the same float32 operation torch does followed by its rounding to D (torch
divides a scalar by a tensor as ``reciprocal(tensor) * scalar``); float16, float64 and
other devices run the eager ops.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import register
from .fused import _load, _loop, _round, _rounded
from .tensors import bits, supports

_FLOOR = 1e-6  # mergekit's clamp of |B − X| from below


def _eager(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    absdiff = torch.abs(base - other)
    weight = (t / absdiff.clamp(min=_FLOOR)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


@_loop("void({T}[::1], {T}[::1], {T}[::1], float32, float32)")
def _nearswap(base, other, out, floor, t):
    """``out`` = the eager ops' bits; ``floor`` is 1e-6 as torch's clamp holds it in D, ``t``
    as its multiplication holds a Python float (float32)."""
    for j in range(base.size):
        b, x = _load(base[j]), _load(other[j])
        d = abs(_rounded(b - x, base[j]))
        d = d if d >= floor or d != d else floor  # clamp(min=): NaN stays NaN
        w = _rounded(_rounded(np.float32(1) / d, base[j]) * t, base[j])
        w = w if w >= 0 or w != w else np.float32(0)
        w = w if w <= 1 or w != w else np.float32(1)
        blend = _rounded(_rounded(np.float32(1) - w, base[j]) * b, base[j])
        out[j] = _round(_rounded(w * x, base[j]) + blend, base[j])


@functools.cache
def _floor(dtype: torch.dtype) -> np.float32:
    """1e-6 as ``clamp(min=1e-6)`` holds it for ``dtype``."""
    return np.float32(torch.zeros(1, dtype=dtype).clamp(min=_FLOOR).item())


@register("nearswap")
def nearswap(xs: list[torch.Tensor], *, base_index: int, t: float) -> torch.Tensor:
    base, other = xs[base_index], xs[1 - base_index]
    if not supports(base):
        return _eager(base, other, t)
    out = torch.empty_like(base, memory_format=torch.contiguous_format)
    _nearswap(bits(base), bits(other), bits(out), _floor(base.dtype), np.float32(t))
    return out
