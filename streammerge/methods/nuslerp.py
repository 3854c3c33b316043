"""``nuslerp``: spherical interpolation of two models (or of their task vectors from a
base), with t from their weights: ``t = w_Q / (w_P + w_Q)`` (0.5 when the sum is ~0).
mergekit 0.1.5's ``nuslerp``, all in the working dtype D with no upcast.

``nuslerp_flatten`` (default) treats the tensor as one vector: its two norms and the cosine
come from statistics passes, summed in fp64 over fixed blocks and rounded to D, where
mergekit sums in D with torch's whole-tensor reduction, so the cosine can differ in its
last bit (counted by the parity tool). Without flattening every row is its own vector and
the computation is mergekit's own, bit for bit: torch's reductions (the rows' norms and
cosines, in its summation order), the element-wise steps in compiled loops for bfloat16
and float32. ``nuslerp_row_wise`` (without flattening; vectors along dim 0, i.e. the
columns of a matrix, the reverse of mergekit's docs' wording) gets each column's norms and
cosine from the same two passes, one fp64 sum per column.

Each statistics block's sums start from +0 and join the running sums in block order, so
blocks fold on every core with the same bits. For bfloat16 and float32 on CPU the two
statistics modes run compiled loops (numba, ``fused``'s conventions), each step the eager
op's with its rounding to D; the only difference is the order of a flattened block's fp64
sum (eight fixed lanes here, torch's vectorised order, which depends on the CPU and thread
count, in the eager ops): an fp64 rounding difference that would have to land on a D
rounding boundary to show (tests/test_nuslerp.py compares the two). A row-wise block keeps
one fp64 sum per column it holds, ``min(columns, 65536)``, until the run's blocks join.
"""

from __future__ import annotations

import dataclasses

import numba
import numpy as np
import torch
from numba import types
from numba.extending import overload

from . import register, tensors
from .fused import _JIT, TILE, _add_lanes, _deltas, _load, _loop, _round, _rounded, declared

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
    return _weigh(t, v0, v1, colinear, torch.sin((1 - t) * theta), torch.sin(t * theta), sin_theta)


def _weigh(t, v0, v1, colinear, sin0, sin1, sin_theta):
    """``_interpolate`` with its sines given: sin((1-t)θ), sin(tθ), sin θ."""
    return torch.where(colinear, (1 - t) * v0 + t * v1, (sin0 * v0 + sin1 * v1) / sin_theta)


def _on_device(t, stats, device) -> list[torch.Tensor]:
    """The statistics passes' angles as (colinear, sin((1-t)θ), sin(tθ), sin θ) on DEVICE: the
    sines are taken where the statistics are (the CPU), as the compiled combine takes them,
    since a GPU's sin can differ from the CPU's in the last bit."""
    colinear, theta, sin_theta = stats
    return [s.to(device) for s in (colinear, torch.sin((1 - t) * theta), torch.sin(t * theta), sin_theta)]


def _vector_count(ctx) -> int:
    """Row-wise mode: how many vectors along dim 0 (the positions past dim 0)."""
    return int(np.prod(ctx.shape)) // ctx.shape[0] if len(ctx.shape) >= 2 else 1


def _columns(ctx, n: int, device) -> torch.Tensor:
    """Row-wise mode: the vector of each element of the block at ``ctx.offset``."""
    return torch.arange(ctx.offset, ctx.offset + n, device=device) % _vector_count(ctx)


def _sum(values: torch.Tensor, columns: torch.Tensor | None, size: int) -> float | np.ndarray:
    """fp64 sum of ``values`` from +0, or per vector (every one) when ``columns`` is given."""
    values = values.double().reshape(-1)
    if columns is None:
        return values.sum().item()
    return (
        torch.zeros(size, dtype=torch.float64, device=values.device)
        .index_add_(0, columns, values)
        .cpu()
        .numpy()
    )


def _per_element(stat: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    return stat if columns is None else stat[columns]


def nuslerp_fold(i, acc, xs, *, ctx, stats, base_index, weight, nuslerp_flatten=True, nuslerp_row_wise=False,
                 span=None):  # fmt: skip
    """Pass 0: sums of squares of v0 and v1 (fp32 squares, like torch.norm). Pass 1: the
    dot product of the normalised vectors, products rounded to D as mergekit multiplies.
    Flattened: one sum each; row-wise: one per column (vector along dim 0). Each block's
    sums start from +0 and are kept, in block order, for ``nuslerp_reduce`` to add up.
    ``span``: ``xs`` holds consecutive statistics blocks of that many elements, folded one
    by one (flattened, in one compiled call)."""
    acc = [] if acc is None else acc
    n = xs[0].numel()
    if span is not None and span < n:
        if nuslerp_flatten and tensors.supports(xs[0]):
            acc.extend(_flat_span(i, xs, stats, base_index, span))
            return acc
        for lo in range(0, n, span):
            part = dataclasses.replace(ctx, offset=ctx.offset + lo)
            blocks = [x.reshape(-1)[lo : lo + span] for x in xs]
            nuslerp_fold(i, acc, blocks, ctx=part, stats=stats, base_index=base_index, weight=weight,
                         nuslerp_flatten=nuslerp_flatten, nuslerp_row_wise=nuslerp_row_wise)  # fmt: skip
        return acc
    if tensors.supports(xs[0]):
        acc.append(_block_compiled(i, xs, ctx, stats, base_index, nuslerp_flatten))
        return acc
    _, v0, v1, _ = _vectors(xs, base_index)
    columns, size = (
        (None, 1) if nuslerp_flatten else (_columns(ctx, v0.numel(), v0.device), _vector_count(ctx))
    )
    if i == 0:
        sums = _sum(v0.float().square(), columns, size), _sum(v1.float().square(), columns, size)
    else:
        n0, n1 = (_per_element(n, columns) for n in stats[0])
        sums = (_sum((v0 / n0) * (v1 / n1), columns, size),)
    acc.append(sums if nuslerp_flatten else (ctx.offset, np.stack(sums)))
    return acc


def nuslerp_reduce(i, acc, partial, *, ctx, **params):
    """Add a run's block sums onto the running sums, in block order: a tuple of fp64 sums
    (flattened), or an array (sums, columns) joined by ``join_columns``."""
    for block in partial:
        if isinstance(block[-1], np.ndarray):  # (first element, part (sums, columns))
            first, part = block
            fresh = acc is None
            acc = np.zeros((part.shape[0], _vector_count(ctx))) if fresh else acc
            join_columns(part, acc, first, fresh)
        else:
            acc = block if acc is None else tuple(a + s for a, s in zip(acc, block))
    return acc


def _operands(xs, base_index) -> tuple:
    """The compiled loops' operands: bits of the two inputs and of the base (the first
    input again when there is none, unread), and whether there is a base."""
    others = [i for i in range(len(xs)) if i != base_index]
    x0, x1 = (_bits(xs[i]) for i in others)
    return x0, x1, (x0 if base_index is None else _bits(xs[base_index])), base_index is not None


def _bits(x: torch.Tensor) -> np.ndarray:
    """``tensors.bits``, in fewer torch calls for the executor's flat blocks (per-block cost)."""
    return x.view(tensors.BITS[x.dtype]).numpy() if x.dim() == 1 and x.is_contiguous() else tensors.bits(x)


def _block_compiled(i, xs, ctx, stats, base_index, flatten) -> tuple:
    """One block's sums from the compiled loops: Python floats when flattened (summed in
    fp64 lanes), else (first element, fp64 array (sums, columns) as ``join_columns`` takes)."""
    operands = _operands(xs, base_index)
    if flatten:
        if i == 0:
            return flat_squares(*operands)
        return (flat_dot(*operands, *(np.float32(n.item()) for n in stats[0])),)
    ncols = _vector_count(ctx)
    norms = np.stack([n.float().numpy() for n in stats[0]]) if i else np.empty((2, 0), np.float32)
    part = np.zeros((1 if i else 2, min(ncols, xs[0].numel())))
    column_block(*operands, ctx.offset, ncols, norms, part)
    return ctx.offset, part


def _flat_span(i, xs, stats, base_index, span) -> list[tuple]:
    """``_block_compiled``'s flattened sums of each ``span``-element block of ``xs``, in one call."""
    norms = (np.float32(n.item()) for n in stats[0]) if i else (np.float32(0), np.float32(0))
    out = np.empty((-(-xs[0].numel() // span), 1 if i else 2))
    flat_blocks(*_operands(xs, base_index), span, *norms, out)
    return [tuple(float(s) for s in row) for row in out]


def nuslerp_finish(i, acc, *, ctx, stats, base_index, weight, nuslerp_flatten=True, nuslerp_row_wise=False):
    dtype = ctx.work_dtype
    acc = [torch.as_tensor(s, dtype=torch.float64).reshape(-1) for s in acc if s is not None]
    if i == 0:
        return tuple(s.sqrt().to(dtype).clamp(min=1e-7) for s in acc)
    return _angle(acc[0].to(dtype).clamp(-1, 1))


# Compiled loops (numba, bfloat16 and float32 as integer bits; ``fused``'s conventions):
# every float32 step is the eager op's, followed by its rounding to D, so the norms, dots
# and outputs are the eager code's bits. A block's elements are walked in row segments:
# element j of a block that starts at flat index ``first`` is in column (first + j) % ncols.


@numba.njit(inline="always", **_JIT)
def _task(x, base, has_base, v):
    """``v[:x.size]`` = the task vector ``x - base`` in D (``x`` itself without a base), as float32."""
    if has_base:
        for j in range(x.size):
            v[j] = _rounded(_load(x[j]) - _load(base[j]), x[j])
    else:
        for j in range(x.size):
            v[j] = _load(x[j])


@numba.njit(inline="always", **_JIT)
def _total(lanes) -> np.float64:
    s = 0.0
    for lane in range(8):
        s += lanes[lane]
    return s


@_loop("UniTuple(float64, 2)({T}[::1], {T}[::1], {T}[::1], boolean)")
def flat_squares(x0, x1, base, has_base):
    """(sum v0², sum v1²) of a block: float32 squares (as ``torch.norm``) summed in fp64
    in eight lanes by element index mod 8, the lanes added in order at the end."""
    v0 = np.empty(TILE, np.float32)
    v1 = np.empty(TILE, np.float32)
    sq = np.empty((2, TILE), np.float64)
    lanes = np.zeros((2, 8))
    for lo in range(0, x0.size, TILE):
        hi = min(lo + TILE, x0.size)
        _task(x0[lo:hi], base[lo:hi], has_base, v0)
        _task(x1[lo:hi], base[lo:hi], has_base, v1)
        sq0, sq1 = sq[0, : hi - lo], sq[1, : hi - lo]
        for j in range(hi - lo):
            sq0[j] = np.float64(v0[j] * v0[j])
            sq1[j] = np.float64(v1[j] * v1[j])
        _add_lanes(sq0, lanes[0])
        _add_lanes(sq1, lanes[1])
    return _total(lanes[0]), _total(lanes[1])


@_loop("float64({T}[::1], {T}[::1], {T}[::1], boolean, float32, float32)")
def flat_dot(x0, x1, base, has_base, n0, n1):
    """sum (v0 / n0)·(v1 / n1) of a block, each quotient and product rounded to D, summed
    in fp64 lanes as ``flat_squares``."""
    v0 = np.empty(TILE, np.float32)
    v1 = np.empty(TILE, np.float32)
    q = np.empty(TILE, np.float64)
    lanes = np.zeros(8)
    for lo in range(0, x0.size, TILE):
        hi = min(lo + TILE, x0.size)
        x = x0[lo:hi]
        _task(x, base[lo:hi], has_base, v0)
        _task(x1[lo:hi], base[lo:hi], has_base, v1)
        for j in range(hi - lo):
            q[j] = np.float64(_rounded(_rounded(v0[j] / n0, x[j]) * _rounded(v1[j] / n1, x[j]), x[j]))
        _add_lanes(q[: hi - lo], lanes)
    return _total(lanes)


@_loop("void({T}[::1], {T}[::1], {T}[::1], boolean, int64, float32, float32, float64[:, ::1])")
def flat_blocks(x0, x1, base, has_base, span, n0, n1, out):
    """Row k of ``out``: ``flat_squares`` (two columns) or ``flat_dot`` with norms n0, n1 (one
    column) of the k-th ``span``-element block: the per-block sums, in one call."""
    for k in range(out.shape[0]):
        lo = k * span
        hi = min(lo + span, x0.size)
        if out.shape[1] == 2:
            out[k, 0], out[k, 1] = flat_squares(x0[lo:hi], x1[lo:hi], base[lo:hi], has_base)
        else:
            out[k, 0] = flat_dot(x0[lo:hi], x1[lo:hi], base[lo:hi], has_base, n0, n1)


@declared(["void(float64[:, ::1], float64[:, ::1], int64, boolean)"])
def join_columns(part, acc, first, fresh):
    """Add a block's per-column sums ``part`` onto ``acc`` (set it on the tensor's first
    block): ``part`` is by column when it holds every column, else by element from ``first``
    (each column at most once); columns the block does not hold are left as they are."""
    ncols = acc.shape[1]
    for k in range(acc.shape[0]):
        p, a = part[k], acc[k]
        if p.size == ncols:
            for c in range(ncols):
                a[c] = p[c] if fresh else a[c] + p[c]
            continue
        c0 = first % ncols
        for j in range(p.size):
            c = c0 + j - ncols if c0 + j >= ncols else c0 + j
            a[c] = p[j] if fresh else a[c] + p[j]


@_loop("void({T}[::1], {T}[::1], {T}[::1], boolean, int64, int64, float32[:, ::1], float64[:, ::1])")
def column_block(x0, x1, base, has_base, first, ncols, norms, part):
    """One block of a row-wise statistics pass into ``part`` (zeros, (sums, min(ncols, n))):
    each column's sum adds its elements in element order (``index_add_``). ``norms`` empty:
    the float32 squares of v0 and v1; else (2, ncols) the columns' norms: the products
    (v0 / n0)·(v1 / n1) rounded to D."""
    n = x0.size
    dot = norms.shape[1] > 0
    v0 = np.empty(min(ncols, n), np.float32)
    v1 = np.empty(min(ncols, n), np.float32)
    pos = 0
    while pos < n:
        c = (first + pos) % ncols
        seg = min(ncols - c, n - pos)
        k = c if ncols <= n else pos  # where the segment's sums go in ``part``
        x = x0[pos : pos + seg]
        _task(x, base[pos : pos + seg], has_base, v0)
        _task(x1[pos : pos + seg], base[pos : pos + seg], has_base, v1)
        if dot:
            p, m0, m1 = part[0, k : k + seg], norms[0, c : c + seg], norms[1, c : c + seg]
            for j in range(seg):
                p[j] += np.float64(
                    _rounded(_rounded(v0[j] / m0[j], x[j]) * _rounded(v1[j] / m1[j], x[j]), x[j])
                )
        else:
            p0, p1 = part[0, k : k + seg], part[1, k : k + seg]
            for j in range(seg):
                p0[j] += np.float64(v0[j] * v0[j])
                p1[j] += np.float64(v1[j] * v1[j])
        pos += seg


def _at(a, j):
    """``a[j]``, or ``a`` itself when it is a number (one coefficient for a whole row)."""


@overload(_at, jit_options={"inline": "always"})
def _at_impl(a, j):
    if isinstance(a, types.Array):
        return lambda a, j: a[j]
    return lambda a, j: a


@numba.njit(inline="always", **_JIT)
def _slerp(x, b, has_base, v0, v1, s0, s1, sn, lin, paths, s, t, r, o):
    """``o[:x.size]`` = (``b`` +) the slerp of v0 and v1 (float32 task vectors of D values)
    with coefficients ``s0``, ``s1``, ``sn`` = sin((1-t)θ), sin(tθ), sin θ, or the lerp
    (1-t)·v0 + t·v1 (``s`` = 1 - t) where ``lin``; every product, sum and quotient rounded
    to D (``x``'s dtype). The coefficients and ``lin`` are arrays by element or one value
    each. ``paths``: 0 when no element is colinear, 1 when all are, else 2 (each picks)."""
    n = x.size
    if paths != 1:
        for j in range(n):
            arc = _rounded(_rounded(_at(s0, j) * v0[j], x[j]) + _rounded(_at(s1, j) * v1[j], x[j]), x[j])
            r[j] = _rounded(arc / _at(sn, j), x[j])
    if paths != 0:
        for j in range(n):
            line = _rounded(_rounded(s * v0[j], x[j]) + _rounded(t * v1[j], x[j]), x[j])
            r[j] = line if paths == 1 or _at(lin, j) else r[j]
    if has_base:
        for j in range(n):
            o[j] = _round(_load(b[j]) + r[j], x[j])
    else:
        for j in range(n):
            o[j] = _round(r[j], x[j])


@_loop(
    "void({T}[::1], {T}[::1], {T}[::1], boolean, int64, float32[:, ::1], boolean[::1], int64, float32, float32,"
    " {T}[::1])"
)
def interpolate(x0, x1, base, has_base, first, coef, colinear, paths, s, t, out):
    """``out`` = (base +) ``_slerp`` of v0 and v1 with each column's coefficients ``coef``
    (3, ncols) = sin((1-t)θ), sin(tθ), sin θ, and ``colinear`` flags."""
    v0 = np.empty(TILE, np.float32)
    v1 = np.empty(TILE, np.float32)
    r = np.empty(TILE, np.float32)
    n, ncols = x0.size, coef.shape[1]
    pos = 0
    while pos < n:
        c = (first + pos) % ncols
        seg = min(ncols - c, n - pos, TILE)
        x, b = x0[pos : pos + seg], base[pos : pos + seg]
        _task(x, b, has_base, v0)
        _task(x1[pos : pos + seg], b, has_base, v1)
        s0, s1, sn = coef[0, c : c + seg], coef[1, c : c + seg], coef[2, c : c + seg]
        _slerp(
            x, b, has_base, v0, v1, s0, s1, sn, colinear[c : c + seg], paths, s, t, r, out[pos : pos + seg]
        )
        pos += seg


@_loop("void({T}[::1], {T}[::1], {T}[::1], {T}[::1], {T}[::1])")
def task_vectors(x0, x1, base, v0, v1):
    """``v0``, ``v1`` = the bits of ``x0 - base``, ``x1 - base`` in D."""
    _deltas(x0, base, v0)
    _deltas(x1, base, v1)


@_loop("void({T}[::1], {T}[::1], int64, float32[:, ::1], {T}[::1])")
def row_products(v0, v1, row, norms, out):
    """Per-row mode: ``out`` = (v0 / n0)·(v1 / n1), each quotient and product rounded to D,
    with row k's norms ``norms[:, k]`` (the block's rows, ``row`` elements each)."""
    for k in range(v0.size // row):
        a, b, o = v0[k * row : (k + 1) * row], v1[k * row : (k + 1) * row], out[k * row : (k + 1) * row]
        n0, n1 = norms[0, k], norms[1, k]
        for j in range(row):
            o[j] = _round(_rounded(_load(a[j]) / n0, a[j]) * _rounded(_load(b[j]) / n1, a[j]), a[j])


@_loop(
    "void({T}[::1], {T}[::1], {T}[::1], boolean, int64, float32[:, ::1], boolean[::1], float32, float32, {T}[::1])"
)
def interpolate_rows(v0, v1, base, has_base, row, coef, colinear, s, t, out):
    """Per-row mode: ``out`` = (base +) ``_slerp`` of the task vectors v0 and v1 (bits of
    D), row k (``row`` elements) with coefficients ``coef[:, k]`` and ``colinear[k]``."""
    a = np.empty(TILE, np.float32)
    b = np.empty(TILE, np.float32)
    r = np.empty(TILE, np.float32)
    for k in range(v0.size // row):
        s0, s1, sn, lin = coef[0, k], coef[1, k], coef[2, k], colinear[k]
        for lo in range(k * row, (k + 1) * row, TILE):
            hi = min(lo + TILE, (k + 1) * row)
            x = v0[lo:hi]
            _task(x, x, False, a)
            _task(v1[lo:hi], x, False, b)
            _slerp(x, base[lo:hi], has_base, a, b, s0, s1, sn, lin, int(lin), s, t, r, out[lo:hi])


@register("nuslerp", fold=nuslerp_fold, finish=nuslerp_finish, reduce=nuslerp_reduce, spans=True)
def nuslerp(xs, *, ctx, stats, base_index, weight, nuslerp_flatten=True, nuslerp_row_wise=False):
    if stats and tensors.supports(xs[0]):
        return _combine_compiled(xs, ctx, stats, base_index, weight)
    if not stats and tensors.supports(xs[0]):  # per row
        return _rows_compiled(xs, ctx, base_index, weight)
    base, v0, v1, others = _vectors(xs, base_index)
    t = _t(weight, others)
    if nuslerp_flatten:
        result = _weigh(t, v0, v1, *_on_device(t, stats[1], v0.device))
    elif nuslerp_row_wise:  # vectors along dim 0: each element takes its column's angle
        columns = _columns(ctx, v0.numel(), v0.device)
        result = _weigh(t, v0, v1, *(_per_element(s, columns) for s in _on_device(t, stats[1], v0.device)))
    else:  # each row (last dimension) is a vector: mergekit's computation on whole rows
        row = ctx.row  # blocks hold whole rows (a 1-D tensor whole)
        r0, r1 = v0.reshape(-1, row), v1.reshape(-1, row)
        u0 = r0 / torch.norm(r0, dim=-1, keepdim=True).clamp(min=1e-7)
        u1 = r1 / torch.norm(r1, dim=-1, keepdim=True).clamp(min=1e-7)
        cos_theta = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
        result = _interpolate(t, r0, r1, *_angle(cos_theta)).reshape(v0.shape)
    return result if base is None else base + result


def _coefficients(t: float, angles) -> tuple[np.ndarray, np.ndarray]:
    """(sin((1-t)θ), sin(tθ), sin θ) as float32 (3, vectors) and the colinear flags, made
    by ``_interpolate``'s torch ops from the angles (colinear, θ, sin θ)."""
    colinear, theta, sin_theta = (a.reshape(-1) for a in angles)
    coef = torch.stack([torch.sin((1 - t) * theta), torch.sin(t * theta), sin_theta]).float().numpy()
    return coef, colinear.numpy()


def _combine_compiled(xs, ctx, stats, base_index, weight) -> torch.Tensor:
    """``_interpolate`` (plus the base) in one compiled loop, each column's (or the whole
    tensor's) coefficients computed by the same torch ops as there."""
    t = _t(weight, [i for i in range(len(xs)) if i != base_index])
    coef, lin = _coefficients(t, stats[1])
    if coef.shape[1] < TILE:  # few columns: repeat them, so the loop runs long segments
        reps = -(-TILE // coef.shape[1])
        coef, lin = np.tile(coef, (1, reps)), np.tile(lin, reps)
    paths = 2 if lin.any() and not lin.all() else int(lin.all())
    out = torch.empty_like(xs[0], memory_format=torch.contiguous_format)
    operands = _operands(xs, base_index)
    interpolate(*operands, ctx.offset, coef, lin, paths, np.float32(1 - t), np.float32(t), tensors.bits(out))
    return out


def _rows_compiled(xs, ctx, base_index, weight) -> torch.Tensor:
    """Per-row mode: mergekit's ops with the element-wise steps in compiled loops and its
    reductions (the rows' norms and cosines) left to torch, whose summation order they
    keep: the task vectors, the norms, the products of the normalised rows (a loop), their
    sums, the angles, then the slerp plus the base (a loop)."""
    others = [i for i in range(len(xs)) if i != base_index]
    x0, x1, base_bits, has_base = _operands(xs, base_index)
    v0, v1 = (torch.empty_like(xs[0]) if has_base else xs[i] for i in others)
    if has_base:
        task_vectors(x0, x1, base_bits, _bits(v0.reshape(-1)), _bits(v1.reshape(-1)))
    v0, v1 = (v.reshape(-1, ctx.row) for v in (v0, v1))
    norms = torch.stack([torch.norm(v, dim=-1).clamp(min=1e-7) for v in (v0, v1)]).float().numpy()
    bits0, bits1 = _bits(v0.reshape(-1)), _bits(v1.reshape(-1))
    products = torch.empty_like(v0)
    row_products(bits0, bits1, ctx.row, norms, _bits(products.reshape(-1)))
    t = _t(weight, others)
    coef, lin = _coefficients(t, _angle(torch.sum(products, dim=-1).clamp(-1, 1)))
    out = torch.empty_like(xs[0], memory_format=torch.contiguous_format)
    interpolate_rows(bits0, bits1, base_bits, has_base, ctx.row, coef, lin,
                     np.float32(1 - t), np.float32(t), tensors.bits(out))  # fmt: skip
    return out
