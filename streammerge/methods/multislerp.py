"""``multislerp``: barycentric interpolation on the hypersphere of several models (or of
their task vectors from an optional base), mergekit 0.1.5's ``multislerp``
(https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).

In the working dtype D, over the flattened inputs ``F_i`` (minus the base when given):
``n_i = ‖F_i‖``, ``U_i = F_i/(n_i + eps)``, ``m = Σ w_i U_i`` (weights normalised to sum 1
by default), ``R = m/‖m‖ · Σ w_i n_i`` (+ base). With one non-base input it is returned
unchanged; when ``‖m‖ < eps`` two inputs fall back to ``w_0 F_0 + w_1 F_1`` and more are an
error, as in mergekit.

Streaming: the norms and ‖m‖ come from two statistics passes, summed in fp64 per fixed
128K-element block (as ``model_stock``'s: in the compiled loops one partial sum per
element position in a 2048-element tile; torch's sum otherwise), the block sums added in
block order, and rounded to D (mergekit: torch's whole-tensor reductions in D).
Difference: mergekit then projects the U_i onto the tangent space at m/‖m‖ and maps their
weighted sum back with the exponential map; in exact arithmetic that tangent sum is zero
(``Σ w_i (U_i − (U_i·m̂) m̂) = m − ‖m‖ m̂ = 0``), so mergekit adds rounding noise of about
one ulp whose bits depend on its reduction order. We take it as the zero it is: outputs
differ from mergekit's in the last bit of some elements (counted by the parity tool).

On CPU in bfloat16 and float32 the passes and the combine run as compiled loops
(``fused``'s rounding after every float32 op, bit-identical to the eager ops here) where
their float32 left fold over the inputs in ``m`` is torch's order: up to 4 fp32 or 8
bfloat16 inputs (``gta.fast_combine_exact``); with more, the eager ops run.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ..errors import MethodError
from . import register, tensors
from .fused import _JIT, TILE, _load, _round, _rounded, add_squares, lane_totals
from .gta import fast_combine_exact


def _inputs(xs, base_index):
    base = xs[base_index] if base_index is not None else None
    others = [x for i, x in enumerate(xs) if i != base_index]
    return base, others


def _weights(weight, base_index, dtype, normalize_weights, device):
    w = torch.tensor([v for i, v in enumerate(weight) if i != base_index], dtype=dtype, device=device)
    return w / w.sum() if normalize_weights else w


def _flat(xs, base_index):
    base, others = _inputs(xs, base_index)
    tensors = torch.stack(others, dim=0)
    if base is not None:
        tensors -= base
    return base, tensors.view(len(others), -1)


def _units(flat, norms, eps):
    return flat / (norms + eps)


@numba.njit(inline="always", **_JIT)
def _deltas(base, xs, lo, hi, has_base, d):
    """``d[a, :hi - lo]`` = input ``a``'s elements [lo, hi) minus the base (rounded), as
    float32; without a base the elements themselves."""
    b = base[lo:hi]
    for a in range(len(xs)):
        x, da = xs[a][lo:hi], d[a]
        if has_base:
            for j in range(hi - lo):
                da[j] = _rounded(_load(x[j]) - _load(b[j]), b[j])
        else:
            for j in range(hi - lo):
                da[j] = _load(x[j])


@numba.njit(inline="always", **_JIT)
def _mean(d, n, like, divisors, weights, m):
    """``m[:n]`` = round(Σ_a round(round(d_a / divisor_a) · w_a)): the sum over inputs in
    float32 from +0, rounded once (torch's sum over a dimension)."""
    for j in range(n):
        m[j] = np.float32(0)
    for a in range(d.shape[0]):
        da, divisor, w = d[a], divisors[a], weights[a]
        for j in range(n):
            m[j] += _rounded(_rounded(da[j] / divisor, like[j]) * w, like[j])
    for j in range(n):
        m[j] = _rounded(m[j], like[j])


@numba.njit(**_JIT)  # compiled per number of inputs (a tuple of arrays), cached on disk
def _square_sums(base, xs, has_base, out):
    """``out[a]`` = Σ d_a² in fp64 (``d_a`` as in ``_deltas``): one partial sum per element
    position in a tile (so the adds vectorize), those summed by ``lane_totals``."""
    d = np.empty((len(xs), TILE), np.float32)
    lanes = np.zeros((len(xs), TILE))
    for lo in range(0, base.size, TILE):
        hi = min(lo + TILE, base.size)
        _deltas(base, xs, lo, hi, has_base, d)
        for a in range(len(xs)):
            add_squares(d[a], lanes[a], hi - lo)
    lane_totals(lanes, out)


@numba.njit(**_JIT)
def _mean_square_sum(base, xs, has_base, divisors, weights, out):
    """``out[0]`` = Σ m² in fp64 (``m`` as in ``_mean``), summed as ``_square_sums``."""
    d = np.empty((len(xs), TILE), np.float32)
    m = np.empty(TILE, np.float32)
    lanes = np.zeros((1, TILE))
    acc = lanes[0]
    for lo in range(0, base.size, TILE):
        hi = min(lo + TILE, base.size)
        _deltas(base, xs, lo, hi, has_base, d)
        _mean(d, hi - lo, base[lo:hi], divisors, weights, m)
        add_squares(m, acc, hi - lo)
    lane_totals(lanes, out)


@numba.njit(**_JIT)
def _combine(base, xs, has_base, divisors, weights, mean_norm, scale, out):
    """``out`` = round(round(round(m / ‖m‖) · Σ w_a n_a) + base) (no base: not added)."""
    d = np.empty((len(xs), TILE), np.float32)
    m = np.empty(TILE, np.float32)
    for lo in range(0, base.size, TILE):
        hi = min(lo + TILE, base.size)
        _deltas(base, xs, lo, hi, has_base, d)
        b, o = base[lo:hi], out[lo:hi]
        _mean(d, hi - lo, b, divisors, weights, m)
        for j in range(hi - lo):
            r = _rounded(_rounded(m[j] / mean_norm, b[j]) * scale, b[j])
            o[j] = _round(r + _load(b[j]), b[j]) if has_base else _round(r, b[j])


def _compiled(xs, base_index) -> bool:
    n = len(xs) - (base_index is not None)
    return tensors.supports(xs[0]) and fast_combine_exact(xs[0].dtype, n)


def _compiled_args(xs, base_index):
    """(base or the first input as a stand-in, the other inputs, whether there is a base)
    as the compiled loops take them."""
    base, others = _inputs(xs, base_index)
    bits = tuple(tensors.bits(x) for x in others)
    return (bits[0] if base is None else tensors.bits(base)), bits, base is not None


def _stat_vectors(stats, eps):
    """The per-input divisors ``n_a + eps`` (rounded to D) and weights, as float32."""
    norms, w = stats[0]
    divisors = (norms + eps).reshape(-1).float().numpy()
    return np.ascontiguousarray(divisors), np.ascontiguousarray(w.float().numpy())


def multislerp_fold(i, acc, xs, *, stats, base_index, weight, normalize_weights=True, eps=1e-8):
    """Pass 0: each input's sum of squares (fp32 squares, like torch.norm). Pass 1: the sum
    of squares of the weighted mean of the unit vectors (D). One block's sums, appended to
    the tensor's list (added up in ``finish``, so any runs of blocks give the same bits)."""
    if _compiled(xs, base_index):
        base, others, has_base = _compiled_args(xs, base_index)
        if i == 0:
            sums = np.empty(len(others))
            _square_sums(base, others, has_base, sums)
        else:
            sums = np.empty(1)
            _mean_square_sum(base, others, has_base, *_stat_vectors(stats, eps), sums)
        part = tuple(sums.tolist())
    else:
        _, flat = _flat(xs, base_index)
        if i == 0:
            part = tuple(flat.float().double().square().sum(dim=1).tolist())
        else:
            norms, w = (s.to(flat.device) for s in stats[0])
            mean = (_units(flat, norms, eps) * w.view(-1, 1)).sum(0)
            part = (mean.float().double().square().sum().item(),)
    acc = [] if acc is None else acc
    acc.append(part)
    return acc


def multislerp_reduce(i, acc, partial, **params):
    return partial if acc is None else acc + partial


def multislerp_finish(i, acc, *, ctx, stats, base_index, weight, normalize_weights=True, eps=1e-8):
    dtype = ctx.work_dtype
    totals = torch.tensor(acc[0], dtype=torch.float64)
    for part in acc[1:]:  # block order
        totals += torch.tensor(part, dtype=torch.float64)
    if i == 0:
        return totals.sqrt().to(dtype).view(-1, 1), _weights(
            weight, base_index, dtype, normalize_weights, "cpu"
        )
    mean_norm = totals.sqrt().to(dtype)[0]
    if mean_norm < eps and len(stats[0][1]) > 2:
        raise MethodError(
            f"multislerp: tensor {ctx.tensor}: the weighted mean of the inputs' directions is zero "
            "(antipodal inputs with balancing weights); change the weights"
        )
    return mean_norm


@register("multislerp", fold=multislerp_fold, finish=multislerp_finish, reduce=multislerp_reduce)
def multislerp(xs, *, stats, base_index, weight, normalize_weights=True, eps=1e-8):
    base, others = _inputs(xs, base_index)
    if len(others) == 1:
        return others[0]
    (norms, w), mean_norm = stats
    if mean_norm >= eps and _compiled(xs, base_index):
        scale = (norms.squeeze(-1) * w).sum()
        out = torch.empty_like(others[0], memory_format=torch.contiguous_format)
        floats = (np.float32(mean_norm.float().item()), np.float32(scale.float().item()))
        _combine(*_compiled_args(xs, base_index), *_stat_vectors(stats, eps), *floats, tensors.bits(out))
        return out
    _, flat = _flat(xs, base_index)
    norms, w, mean_norm = norms.to(flat.device), w.to(flat.device), mean_norm.to(flat.device)
    if mean_norm < eps:  # two inputs: mergekit's linear fallback
        result = flat[0] * w[0] + flat[1] * w[1]
    else:
        mean = (_units(flat, norms, eps) * w.view(-1, 1)).sum(0) / mean_norm
        result = mean * (norms.squeeze(-1) * w).sum()
    result = result.view(others[0].shape)
    return result if base is None else result + base
