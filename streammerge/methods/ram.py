"""``ram`` and ``ramplus_tl``: Reinforced Agent Merging (arXiv:2601.13572), as mergekit 0.1.5.

Per element, over the task vectors ``TV_i = x_i − B`` (working dtype D): ``A_i = |TV_i| > ε``,
``c = Σ_i A_i``; an element only one model changes (c = 1) takes that change whole, one
several models change is averaged over them: ``R = B + Σ_i (TV_i·A_i·[c=1] + TV_i·A_i·[c>1]/c)``.
``ramplus_tl`` scales each model's unique changes by ``λ_i = 1 + r·clamp(ρ_i, 0, α)`` with
``ρ_i = #(A_i ∧ c>1) / max(#(A_i ∧ c=1), ε)`` counted over the whole tensor (one statistics
pass of exact integer counts). Every elementwise step runs mergekit's own torch ops on each
block, so results are bit-identical. Difference: mergekit returns ``ramplus_tl`` in fp32 for
bf16/fp16 inputs (its config.json then claims bf16); we cast back to the output dtype.

For bfloat16 and float32 on the CPU compiled loops do each step per element in one pass (the
eager ops make a dozen passes over stacked (models, elements) temporaries): the same float32
operation torch does, rounded to D where torch rounds (``ε`` compared as D holds it, the sum
over models accumulated in float32 from +0 in model order, as torch does for up to 4 float32
or 8 bfloat16 models; ``ramplus_tl``'s λ products in float32 as torch promotes them).
float16, float64 and other devices run the eager ops. One exception to bit-identity: where
two NaNs meet in a float32 sum, which NaN's payload survives is the compiler's choice (LLVM
treats addition as commutative), so with float32 inputs a result may hold another NaN
there; with bfloat16 inputs every NaN is 0xFFFF and all bits agree.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch

from . import register
from .fused import _JIT, TILE, _f32, _load, _model, _round, _rounded, declared
from .gta import fast_combine_exact
from .tensors import KEY, addresses, bits, supports


def _prepare(xs, base_index, epsilon):
    """mergekit's _prepare_ram_vectors on one block: (n_models, elements) views and masks."""
    base = xs[base_index]
    tensors = [x for i, x in enumerate(xs) if i != base_index]
    tv_flat = torch.stack([t - base for t in tensors], dim=0).view(len(tensors), -1)
    nonzero = tv_flat.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return base, tv_flat, nonzero, counts, counts > 1, counts == 1


def _signatures(result: str) -> list:
    """(the inputs' ``addresses``, their kind: a scalar of their bits, base index, ε bits, λ,
    output) for bfloat16 (uint16) and float32 (uint32) bits; ``result`` "same": the output
    has the inputs' dtype, "f32": float32."""
    out = []
    for t in (numba.uint16, numba.uint32):
        res = numba.types.Array(t, 1, "C") if result == "same" else numba.float32[::1]
        out.append(numba.void(numba.int64[::1], t, numba.int64, numba.uint32, numba.float32[::1], res))
    return out


@numba.njit(inline="always", **_JIT)
def _changes(xs, size, kind, base_index, lo, n, eps, tv, count):
    """For elements ``lo:lo+n``: ``tv[m, j]`` = model m's task vector (rounded to D) where it
    is over ``eps`` in magnitude, else that times 0 (as the eager ``tv * nonzero``, rounded:
    0 of the delta's sign, NaN from inf·0 as D holds it), ``count[j]`` = how many models are
    over; model order, the base skipped. Returns the base's elements. ``xs``: ``addresses``
    of ``size``-element inputs stored as ``kind``."""
    base = _model(xs, base_index, size, kind)[lo : lo + n]
    for j in range(n):
        count[j] = 0
    m = 0
    for k in range(xs.size):
        if k == base_index:
            continue
        x, t = _model(xs, k, size, kind)[lo : lo + n], tv[m]
        for j in range(n):
            d = _rounded(_load(x[j]) - _load(base[j]), base[j])
            over = abs(d) > eps
            t[j] = _rounded(d * np.float32(over), base[j])
            count[j] += over
        m += 1
    return base


@numba.njit(inline="always", **_JIT)
def _shared(t, count, like):
    """``t·[c>1] / clamp(c, 1)`` in D: the share of a change several models make."""
    return _rounded(_rounded(t * np.float32(count > 1), like) / np.float32(max(count, 1)), like)


@numba.njit(inline="always", **_JIT)
def _tile(xs, size, kind, base_index, lo, n, eps, tv, count, lam, plus, acc):
    """``acc[:n]`` = the sum over models of the merged changes of elements ``lo:lo+n``:
    ``ram``'s terms rounded to D, or with ``plus`` ``ramplus_tl``'s in float32 (unique
    changes times λ). Returns the base's elements."""
    base = _changes(xs, size, kind, base_index, lo, n, eps, tv, count)
    for j in range(n):
        acc[j] = np.float32(0)
    for m in range(xs.size - 1):
        t, scale = tv[m], lam[m] if plus else np.float32(1)
        for j in range(n):
            c, like = count[j], base[j]
            alone = _rounded(t[j] * np.float32(c == 1), like)
            if plus:
                acc[j] += alone * scale + _shared(t[j], c, like)
            else:
                acc[j] += _rounded(alone + _shared(t[j], c, like), like)
    return base


@declared(_signatures("same"))
def _ram(xs, kind, base_index, eps_bits, lam, out):
    """``out`` = the eager ``ram`` ops' bits (``lam`` unused)."""
    eps, models = _f32(eps_bits), xs.size - 1
    tv, count = np.empty((models, TILE), np.float32), np.empty(TILE, np.int64)
    acc = np.empty(TILE, np.float32)
    for lo in range(0, out.size, TILE):
        n = min(TILE, out.size - lo)
        base, o = (
            _tile(xs, out.size, kind, base_index, lo, n, eps, tv, count, lam, False, acc),
            out[lo : lo + n],
        )
        for j in range(n):
            o[j] = _round(_load(base[j]) + _rounded(acc[j], base[j]), base[j])


@declared(_signatures("f32"))
def _ramplus(xs, kind, base_index, eps_bits, lam, out):
    """``out`` (float32, as mergekit's ops leave it) = the eager ``ramplus_tl`` ops' values."""
    eps, models = _f32(eps_bits), xs.size - 1
    tv, count = np.empty((models, TILE), np.float32), np.empty(TILE, np.int64)
    acc = np.empty(TILE, np.float32)
    for lo in range(0, out.size, TILE):
        n = min(TILE, out.size - lo)
        base, o = (
            _tile(xs, out.size, kind, base_index, lo, n, eps, tv, count, lam, True, acc),
            out[lo : lo + n],
        )
        for j in range(n):
            o[j] = _load(base[j]) + acc[j]


@declared([numba.void(numba.int64[::1], t, numba.int64, numba.int64, numba.uint32, numba.int64[:, ::1]) for t in (numba.uint16, numba.uint32)])  # fmt: skip
def _ramplus_counts(xs, kind, size, base_index, eps_bits, counts):
    """Add to ``counts[0, m]`` the elements model m changes together with others, to
    ``counts[1, m]`` those it changes alone (``size`` elements each)."""
    eps, models = _f32(eps_bits), xs.size - 1
    tv, count = np.empty((models, TILE), np.float32), np.empty(TILE, np.int64)
    for lo in range(0, size, TILE):
        n = min(TILE, size - lo)
        _changes(xs, size, kind, base_index, lo, n, eps, tv, count)
        for m in range(models):
            t, shared, alone = tv[m], 0, 0
            for j in range(n):
                over = abs(t[j]) > eps
                shared += over & (count[j] > 1)
                alone += over & (count[j] == 1)
            counts[0, m] += shared
            counts[1, m] += alone


@functools.cache
def _eps_bits(dtype: torch.dtype, epsilon: float) -> np.uint32:
    """float32 bits of ``epsilon`` as ``tensor > epsilon`` holds it for ``dtype`` (in D)."""
    return np.uint32(torch.tensor(epsilon, dtype=dtype).float().view(torch.int32).item() & 0xFFFFFFFF)


def _kind(xs) -> np.integer:
    """The inputs' kind as the loops take it: a scalar of their bits' type."""
    return KEY[xs[0].dtype](0)


def _compiled(xs) -> bool:
    """Whether the loops give the eager ops' bits: CPU bfloat16/float32, and few enough
    models that torch's ``sum(dim=0)`` adds them in order."""
    same = all(supports(x) and x.dtype == xs[0].dtype and x.is_contiguous() for x in xs)
    return same and fast_combine_exact(xs[0].dtype, len(xs) - 1)


def _ram_eager(xs, base_index, epsilon):
    base, tv_flat, nonzero, counts, overlap, unique = _prepare(xs, base_index, epsilon)
    tv_z = tv_flat * nonzero
    merged = ((tv_z * unique) + (tv_z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def _counts_eager(xs, base_index, epsilon):
    _, _, nonzero, _, overlap, unique = _prepare(xs, base_index, epsilon)
    return (nonzero & overlap).sum(dim=1), (nonzero & unique).sum(dim=1)


def _ramplus_eager(xs, lam, base_index, epsilon):
    base, tv_flat, nonzero, counts, overlap, unique = _prepare(xs, base_index, epsilon)
    tv_z = tv_flat * nonzero
    merged = (
        (tv_z * unique * lam.to(tv_z.device).unsqueeze(-1)) + (tv_z * overlap / counts.clamp(min=1))
    ).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@register("ram")
def ram(xs, *, base_index, epsilon=1e-5):
    if len(xs) == 1:
        return xs[base_index]
    if not _compiled(xs):
        return _ram_eager(xs, base_index, epsilon)
    out = torch.empty_like(xs[base_index], memory_format=torch.contiguous_format)
    eps = _eps_bits(xs[0].dtype, epsilon)
    _ram(addresses(xs), _kind(xs), base_index, eps, np.zeros(0, np.float32), bits(out))
    return out


def ramplus_fold(i, acc, xs, *, base_index, r=0.1, alpha=0.2, epsilon=1e-5):
    """The one statistics pass: per model, elements it changes alone and together."""
    if _compiled(xs):
        counts = np.zeros((2, len(xs) - 1), np.int64)
        eps = _eps_bits(xs[0].dtype, epsilon)
        _ramplus_counts(addresses(xs), _kind(xs), xs[base_index].numel(), base_index, eps, counts)
        shared, alone = torch.from_numpy(counts[0]), torch.from_numpy(counts[1])
    else:
        shared, alone = _counts_eager(xs, base_index, epsilon)
    return (shared, alone) if acc is None else (acc[0] + shared, acc[1] + alone)


def ramplus_finish(i, acc, *, base_index, r=0.1, alpha=0.2, epsilon=1e-5):
    shared, alone = acc
    rho = shared / alone.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)  # λ_i, fp32 as in mergekit


def ramplus_reduce(i, acc, partial, **params):
    """Join the counts of consecutive runs of blocks (integers: any grouping, same sums)."""
    return partial if acc is None else (acc[0] + partial[0], acc[1] + partial[1])


@register("ramplus_tl", fold=ramplus_fold, finish=ramplus_finish, reduce=ramplus_reduce)
def ramplus_tl(xs, *, stats, base_index, r=0.1, alpha=0.2, epsilon=1e-5):
    if len(xs) == 1:
        return xs[base_index]
    if not _compiled(xs):
        return _ramplus_eager(xs, stats[0], base_index, epsilon)
    out = torch.empty(xs[base_index].shape, dtype=torch.float32)
    lam = stats[0].to(torch.float32).contiguous().numpy()
    eps = _eps_bits(xs[0].dtype, epsilon)
    _ramplus(addresses(xs), _kind(xs), base_index, eps, lam, out.view(-1).numpy())
    return out
