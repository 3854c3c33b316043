"""Compiled elementwise loops (numba) for the task-arithmetic family's (and sce's) hot steps on CPU.

Each loop does in one pass over a block what the numpy/torch code does in several passes
with block-sized temporaries: the delta, its magnitude key, the keep decision (a rank
window with ties counted in element order, or a keyed random number), the mask, the
rescale, and the sign election and weighted sum. Every arithmetic step is the same float32
operation torch does, followed by the same rounding to the work dtype (round to nearest
even for bfloat16; none for float32), so the results are bit-identical to the eager ops
(tests compare them). numba compiles each loop once per input type and caches it on disk.

bfloat16 and float32 only: numba has no float16 on CPU, so float16 stays on numpy.
Arrays arrive as integer views (uint16 for bfloat16, uint32 for float32): bits in, bits out
(``tensors`` makes them from torch tensors; this module imports no torch, so a merge of
compiled loops alone never loads it).
A loop that takes any number of models gets their data addresses (``addresses``): one
int64 array, made in a microsecond, where numba's typed list took ~40 us per call and held
the compiler's lock, so two threads building one queued on each other.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.compiler_lock import global_compiler_lock
from numba.extending import intrinsic, overload

_JIT = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}
_INLINE = {"inline": "always"}
TILE = 2048  # elements per step of the tiled loops: their scratch stays in L1/L2

_U16 = np.uint16
_U32 = np.uint32
_U64 = np.uint64
_GAMMA = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)


@intrinsic
def _f32(typingctx, bits):
    """The float32 whose bit pattern is ``bits`` (uint32)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _bits(typingctx, x):
    """The bit pattern (uint32) of float32 ``x``."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _pointer(typingctx, address, like):
    """The int64 ``address`` as a pointer to elements of ``like``'s kind (an array or a scalar)."""
    element = like.dtype if isinstance(like, types.Array) else like
    sig = types.CPointer(element)(address, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@numba.njit(inline="always", **_JIT)
def _model(models, m, size, like):
    """Model ``m`` of ``models`` (``addresses``' array) as a ``size``-element array of
    ``like``'s kind."""
    return numba.carray(_pointer(models[m], like), size)


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` in float32 with one rounding (torch's vectorized ``addcmul``)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return sig, codegen


def _load(v):
    """A stored element (uint16 bfloat16 bits or uint32 float32 bits) as float32."""


def _round(x, like):
    """float32 ``x`` rounded to the dtype of ``like`` (bits of the same kind), as its bits:
    round to nearest even for bfloat16, NaN as 0xFFFF, as torch's vectorized conversion."""


def _magnitude(v):
    """The bits with the sign cleared: an integer key that orders like the magnitude."""


def _sign(v):
    """The sign bit alone: a zero with the element's sign."""


def _bf16_round(x, like):
    u = _bits(x)
    if x != x:  # NaN
        return _U16(0xFFFF)
    return _U16((u + _U32(0x7FFF) + ((u >> _U32(16)) & _U32(1))) >> _U32(16))


def _round_scalar(x, like):
    """``_round`` as torch's one-element conversion does it (a reduction's result): a NaN
    becomes 0x7FC0 in bfloat16 (the vectorized conversion gives 0xFFFF)."""


@overload(_round_scalar, jit_options=_INLINE)
def _round_scalar_impl(x, like):
    if like == types.uint16:
        return lambda x, like: _round(x, like) if x == x else _U16(0x7FC0)
    return lambda x, like: _bits(x)


@overload(_load, jit_options=_INLINE)
def _load_impl(v):
    if v == types.uint16:
        return lambda v: _f32(_U32(v) << _U32(16))
    return lambda v: _f32(v)


@overload(_round, jit_options=_INLINE)
def _round_impl(x, like):
    if like == types.uint16:
        return _bf16_round
    return lambda x, like: _bits(x)


@overload(_magnitude, jit_options=_INLINE)
def _magnitude_impl(v):
    if v == types.uint16:
        return lambda v: v & _U16(0x7FFF)
    return lambda v: v & _U32(0x7FFFFFFF)


@overload(_sign, jit_options=_INLINE)
def _sign_impl(v):
    if v == types.uint16:
        return lambda v: v & _U16(0x8000)
    return lambda v: v & _U32(0x80000000)


@numba.njit(inline="always", **_JIT)
def _rounded(x, like) -> np.float32:
    """float32 ``x`` after rounding to ``like``'s dtype, back as float32."""
    return _load(_round(x, like))


@numba.njit(inline="always", **_JIT)
def _deltas(x, base, d):
    """``d[:x.size]`` = the bits of ``x - base``. (Loops index by their own counter over
    slices: an index like ``lo + j`` is checked for wraparound, which stops vectorizing.)"""
    for j in range(x.size):
        d[j] = _round(_load(x[j]) - _load(base[j]), x[j])


@numba.njit(inline="always", **_JIT)
def _pruned(v, keep, scale, factor):
    """A pruned delta: ``v`` kept (times ``factor``, rounded, with ``scale``) or a zero with
    its sign, as ``apply_mask`` and the eager product give."""
    kept = _round(_load(v) * factor, v) if scale else v
    return kept if keep else _sign(v)


def declared(signatures: list):
    """A compiled loop for exactly ``signatures``, compiled (or loaded from numba's cache)
    on its first call, not at import: ``numba.njit(signatures)`` compiled every loop of every
    kernel module a merge imported, ~70 s on 2 cores after a fresh install (a linear merge
    now compiles its one loop). A loop compiled before then that calls this one compiles it
    for the types it passes; from the first call on it takes exactly ``signatures``, the
    arguments converted to them as ``numba.njit(signatures)`` converts them (a Python float
    to float32, say)."""

    def deco(fn):
        dispatcher = numba.njit(**_JIT)(fn)

        def first_call(*args, **kws):
            with global_compiler_lock:  # a loop being compiled that calls this one waits
                if dispatcher._can_compile:
                    for signature in signatures:
                        dispatcher.compile(signature)
                    dispatcher.disable_compile()
            return dispatcher  # numba calls what this returns with the arguments

        # numba calls this when no compiled signature matches a call from Python
        dispatcher._compile_for_args = first_call
        return dispatcher

    return deco


def _loop(signature: str):
    """A loop for bfloat16 and float32 bits: ``{T}`` in ``signature`` is uint16, then uint32."""
    return declared([signature.format(T=t) for t in ("uint16", "uint32")])


@_loop("void({T}[::1], {T}[::1], int64, int64, int64[::1])")
def delta_histogram(x, base, shift, prefix, counts):
    """Add to ``counts`` (int64[65536]) the 16-bit digit ``key >> shift`` of every delta
    ``x - base``'s magnitude key; with ``prefix >= 0`` only keys whose bits above
    ``shift + 16`` equal it count."""
    d = np.empty(TILE, x.dtype)
    # four sub-histograms: a run of equal keys would otherwise wait on its own stores
    sub = np.zeros((4, 65536), np.int32)
    for lo in range(0, x.size, TILE):
        hi = min(lo + TILE, x.size)
        _deltas(x[lo:hi], base[lo:hi], d)
        for j in range(hi - lo):
            key = _magnitude(d[j])
            if prefix < 0 or np.int64(key >> (shift + 16)) == prefix:
                sub[j & 3, np.int64(key >> shift) & 0xFFFF] += 1
    for k in range(65536):
        counts[k] += np.int64(sub[0, k]) + sub[1, k] + sub[2, k] + sub[3, k]


@numba.njit(inline="always", **_JIT)
def _straddles(first, count, span):
    """Whether tie positions [first, first + count) are partly inside ``span``, partly not."""
    inside = max(0, min(span[1], first + count) - max(span[0], first))
    return 0 < inside < count


@_loop("void({T}[::1], {T}[::1], {T}[::1], {T}, {T}, int64[::1], int64[::1], int64[::1], boolean, float32)")
def prune_window(x, base, out, lo_key, hi_key, lo_span, hi_span, seen, scale, factor):
    """``out`` = the deltas ``x - base`` whose magnitude rank is in the window, others a
    zero with their sign; with ``scale`` a kept delta is multiplied by ``factor`` (rounded).

    Keys strictly between ``lo_key`` and ``hi_key`` are kept; a key equal to a boundary is
    kept when its position among that key's ties in element order (``seen`` counts those of
    earlier blocks and is updated) is in the boundary's span [first, last). When the keys
    are equal the upper boundary's span applies (as ``select.keep_window``)."""
    d = np.empty(TILE, x.dtype)
    for lo in range(0, x.size, TILE):
        hi = min(lo + TILE, x.size)
        _deltas(x[lo:hi], base[lo:hi], d)
        o = out[lo:hi]
        # Ties take the decision of the tile's first tie of their key; only a tile whose
        # ties straddle an end of their span is redone tie by tie below.
        s_lo, s_hi = seen[0], seen[1]
        keep_lo = (lo_span[0] <= s_lo) & (s_lo < lo_span[1])
        keep_hi = (hi_span[0] <= s_hi) & (s_hi < hi_span[1])
        n_lo = n_hi = 0
        for j in range(hi - lo):
            v = d[j]
            key = _magnitude(v)
            is_hi = key == hi_key
            is_lo = (key == lo_key) & ~is_hi
            keep = ((lo_key < key) & (key < hi_key)) | (is_lo & keep_lo) | (is_hi & keep_hi)
            o[j] = _pruned(v, keep, scale, factor)
            n_lo += is_lo
            n_hi += is_hi
        seen[0], seen[1] = s_lo + n_lo, s_hi + n_hi
        if not (_straddles(s_lo, n_lo, lo_span) or _straddles(s_hi, n_hi, hi_span)):
            continue
        for j in range(hi - lo):  # the ties, in element order
            v = d[j]
            key = _magnitude(v)
            if key == hi_key:
                keep = hi_span[0] <= s_hi < hi_span[1]
                s_hi += 1
            elif key == lo_key:
                keep = lo_span[0] <= s_lo < lo_span[1]
                s_lo += 1
            else:
                continue
            o[j] = _pruned(v, keep, scale, factor)


@numba.njit(inline="always", **_JIT)
def _uniform24(key, i):
    """Top 24 bits of element ``i``'s 32-bit random number in stream ``key`` (``rng``)."""
    z = (i >> _U64(1)) * _GAMMA + key
    z = (z ^ (z >> _U64(30))) * _M1
    z = (z ^ (z >> _U64(27))) * _M2
    z = z ^ (z >> _U64(31))
    z = z >> ((i & _U64(1)) << _U64(5))
    return _U32(z & _U64(0xFFFFFFFF)) >> _U32(8)


@_loop("void({T}[::1], {T}[::1], {T}[::1], uint64, int64, uint32, boolean, float32)")
def prune_random(x, base, out, key, start, threshold, scale, factor):
    """``out`` = the deltas ``x - base`` whose keyed 24-bit random number (element index
    ``start + i``) is below ``threshold``, others a zero with their sign; with ``scale`` a
    kept delta is multiplied by ``factor`` (rounded)."""
    for i in range(x.size):
        v = _round(_load(x[i]) - _load(base[i]), x[i])
        out[i] = _pruned(v, _uniform24(key, _U64(start + i)) < threshold, scale, factor)


@numba.njit(inline="always", **_JIT)
def _add_lanes(a, acc):
    """``acc[l] += a[j]`` for every ``j = l mod 8``, in order: eight sums kept in registers,
    the same on any machine (no reassociation)."""
    s0, s1, s2, s3, s4, s5, s6, s7 = acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]
    whole = a.size // 8 * 8
    for j in range(0, whole, 8):
        s0, s1, s2, s3 = s0 + a[j], s1 + a[j + 1], s2 + a[j + 2], s3 + a[j + 3]
        s4, s5, s6, s7 = s4 + a[j + 4], s5 + a[j + 5], s6 + a[j + 6], s7 + a[j + 7]
    acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7] = s0, s1, s2, s3, s4, s5, s6, s7
    for j in range(whole, a.size):
        acc[j & 7] += a[j]


@_loop("UniTuple(float64, 2)({T}[::1], {T}[::1], uint64, int64, uint32)")
def l1_random(x, base, key, start, threshold):
    """(sum |x - base|, sum of those that ``prune_random`` keeps), in fp64: eight partial
    sums by element index mod 8, added in order at the end."""
    d = np.empty(TILE, x.dtype)
    before = np.empty(TILE, np.float64)
    after = np.empty(TILE, np.float64)
    sums = np.zeros((2, 8))
    for lo in range(0, x.size, TILE):
        hi = min(lo + TILE, x.size)
        _deltas(x[lo:hi], base[lo:hi], d)
        first = _U64(start + lo)
        for j in range(hi - lo):
            a = abs(np.float64(_load(d[j])))
            before[j] = a
            after[j] = a if _uniform24(key, first + _U64(j)) < threshold else 0.0
        _add_lanes(before[: hi - lo], sums[0])
        _add_lanes(after[: hi - lo], sums[1])
    return sums[0].sum(), sums[1].sum()


def _digit_passes(v):
    """8-bit radix passes that cover a magnitude key of ``v``'s kind (15 or 31 bits)."""


@overload(_digit_passes, jit_options=_INLINE)
def _digit_passes_impl(v):
    if v == types.uint16:
        return lambda v: 2
    return lambda v: 4


@numba.njit(inline="always", **_JIT)
def _row_ranks(keys, passes, ranks, scratch, counts):
    """``ranks[j]`` = the ascending rank of ``keys[j]`` among ``keys``, ties by position (a
    stable sort, as numpy's stable argsort): a least-significant-digit radix sort, 8 bits a
    pass (``passes`` of them cover the keys), every digit counted in one sweep, a pass
    skipped where one digit holds every key, the last pass writing the ranks. ``scratch``:
    (4, n) int32, (keys, positions) twice; ``counts``: (4, 256) int64."""
    n = keys.size
    for p in range(passes):
        for c in range(256):
            counts[p, c] = 0
    for j in range(n):
        k = keys[j]
        for p in range(passes):
            counts[p, (k >> _U32(8 * p)) & _U32(255)] += 1
    last = -1
    for p in range(passes):
        if counts[p, (keys[0] >> _U32(8 * p)) & _U32(255)] != n:
            last = p
    if last < 0:  # every key equal: ranks in element order
        for j in range(n):
            ranks[j] = j
        return
    first = True
    src, dst = 0, 2  # rows of ``scratch``: keys at src, positions at src + 1
    for p in range(last + 1):
        row = counts[p]
        shift = _U32(8 * p)
        if row[(keys[0] >> shift) & _U32(255)] == n:
            continue
        total = 0
        for c in range(256):
            total, row[c] = total + row[c], total
        for i in range(n):
            k = keys[i] if first else _U32(scratch[src, i])
            at = i if first else scratch[src + 1, i]
            digit = (k >> shift) & _U32(255)
            pos = row[digit]
            row[digit] = pos + 1
            if p == last:
                ranks[at] = pos
            else:
                scratch[dst, pos] = k
                scratch[dst + 1, pos] = at
        first = False
        src, dst = dst, src


@numba.njit(inline="always", **_JIT)
def _della_row(x, base, start, key, table, work):
    """One row of della's magnitude-rank drop into ``work`` (``_della_scratch``): ``d`` = the
    deltas' bits, ``keep`` = whether each is kept: its keyed uniform (element index
    ``start + j``, on the 2^-24 grid) below the keep probability ``table`` gives its rank
    of |delta| in the row."""
    d, keys, ranks, scratch, counts, keep = work
    n = x.size
    _deltas(x, base, d)
    for j in range(n):
        keys[j] = _U32(_magnitude(d[j]))
    _row_ranks(keys[:n], _digit_passes(x[0]), ranks, scratch, counts)
    step = np.float32(2.0**-24)
    for j in range(n):
        u = np.float32(_uniform24(key, _U64(start + j))) * step
        keep[j] = u < table[ranks[j]]


@numba.njit(inline="always", **_JIT)
def _della_scratch(row, x):
    """``_della_row``'s per-row scratch: deltas (``x``'s kind), keys, ranks, the sort's
    scratch and digit counts, keep flags."""
    return (
        np.empty(row, x.dtype),
        np.empty(row, np.uint32),
        np.empty(row, np.int32),
        np.empty((4, row), np.int32),
        np.empty((4, 256), np.int64),
        np.empty(row, np.bool_),
    )


@_loop("void({T}[::1], {T}[::1], {T}[::1], int64, uint64, int64, float32[::1], boolean, float32)")
def prune_della(x, base, out, row, key, start, table, scale, factor):
    """della's ``_sparsify`` of ``x - base`` (whole rows of ``row`` elements, the first at
    element ``start``): a kept delta (times ``factor``, rounded, with ``scale``) or a zero
    with the delta's sign, as ``apply_mask`` and the eager product give."""
    work = _della_scratch(row, x)
    d, keep = work[0], work[-1]
    for lo in range(0, x.size, row):
        o = out[lo : lo + row]
        _della_row(x[lo : lo + row], base[lo : lo + row], start + lo, key, table, work)
        for j in range(row):
            o[j] = _pruned(d[j], keep[j], scale, factor)


@_loop("UniTuple(float64, 2)({T}[::1], {T}[::1], int64, uint64, int64, float32[::1])")
def l1_della(x, base, row, key, start, table):
    """(sum |x - base|, sum of those that ``prune_della`` keeps), in fp64 lanes as ``l1_random``."""
    work = _della_scratch(row, x)
    d, keep = work[0], work[-1]
    before = np.empty(row, np.float64)
    after = np.empty(row, np.float64)
    sums = np.zeros((2, 8))
    for lo in range(0, x.size, row):
        _della_row(x[lo : lo + row], base[lo : lo + row], start + lo, key, table, work)
        for j in range(row):
            a = abs(np.float64(_load(d[j])))
            before[j] = a
            after[j] = a if keep[j] else 0.0
        _add_lanes(before, sums[0])
        _add_lanes(after, sums[1])
    return sums[0].sum(), sums[1].sum()


@_loop("void({T}[::1], {T}[::1], {T}, {T}, int64[::1])")
def count_ties(x, base, lo_key, hi_key, seen):
    """Add to ``seen`` how many deltas ``x - base`` have magnitude key ``lo_key`` and how
    many ``hi_key`` (both counted as ``hi_key`` when the keys are equal)."""
    d = np.empty(TILE, x.dtype)
    n_lo = n_hi = 0
    for lo in range(0, x.size, TILE):
        hi = min(lo + TILE, x.size)
        _deltas(x[lo:hi], base[lo:hi], d)
        for j in range(hi - lo):
            key = _magnitude(d[j])
            is_hi = key == hi_key
            n_hi += is_hi
            n_lo += (key == lo_key) & ~is_hi
    seen[0] += n_lo
    seen[1] += n_hi


@numba.njit(inline="always", **_JIT)
def _term(x, b, w, are_deltas, d):
    """One model's weighted delta in D: ``x`` (a delta) or ``x - b``, rounded, times ``w``."""
    delta = _load(x) if are_deltas else _rounded(_load(x) - b, d)
    return _rounded(delta * w, d)


@numba.njit(inline="always", **_JIT)
def _finish(total, b, normalize, divisor, lam, d, like):
    """``combine``'s steps after the sum of weighted deltas, each rounded to D: the sum,
    / divisor, * lam, + base; then to the output's dtype (``like``)."""
    q = _rounded(total, d)
    if normalize:
        q = _rounded(q / divisor, d)
    if lam != 1:
        q = _rounded(q * lam, d)
    return _round(_rounded(b + q, d), like)


@numba.njit(inline="always", **_JIT)
def _elect_tile(wd, weights, b, o, n, normalize, lam, mixed, total, div, d):
    """One tile of ``combine`` with ``elect`` (TIES) from its weighted deltas ``wd[m, :n]``
    (fp32 values of D, whose bits are ``d``'s kind)."""
    n_models = wd.shape[0]
    for j in range(n):  # torch's sum starts from +0 (so -0 deltas sum to +0)
        mixed[j] = np.float32(0)
        total[j] = np.float32(0)
        div[j] = np.float32(0)
    for m in range(n_models):  # mergekit's get_mask(method="sum")
        wdm = wd[m]
        for j in range(n):
            total[j] += wdm[j]
    # x agrees with the elected sign (+1 where the total is >= 0) iff it is nonzero
    # and positive exactly where the total is non-negative
    for m in range(n_models):
        w, wdm = weights[m], wd[m]
        for j in range(n):
            x = wdm[j]
            agree = np.float32(((x > 0) == (total[j] >= 0)) & (x != 0))
            mixed[j] += x * agree
            div[j] += agree * w
    for j in range(n):  # the agreeing weights' sum, in D, a zero sum as 1
        dv = _rounded(div[j], d)
        o[j] = _finish(mixed[j], _load(b[j]), normalize, dv + np.float32(dv == 0), lam, d, o[j])


# (stored, working dtype D) bits of ``combine``: bfloat16 in bfloat16, float32 in float32, and
# bfloat16 inputs merged in float32 (task arithmetic straight from the read bytes)
STORED_IN = ((numba.uint16, numba.uint16), (numba.uint32, numba.uint32), (numba.uint16, numba.uint32))


def _combine_signatures() -> list:
    """``combine``'s signatures: base and output stored as bfloat16 (uint16) or float32
    (uint32) bits, the models as ``addresses`` (any count), D's kind as a scalar of its bits."""
    f32, b = numba.float32, numba.boolean
    return [
        numba.void(numba.types.Array(t, 1, "C"), numba.int64[::1], f32[::1], numba.types.Array(t, 1, "C"),
                   numba.int64, numba.int64, b, b, f32, f32, b, d)
        for t, d in STORED_IN
    ]  # fmt: skip


@numba.njit(inline="always", **_JIT)
def _combine_few(base, xs, weights, out, start, stop, normalize, divisor, lam, are_deltas, d):
    """``combine`` without ``elect`` for up to four models in one pass over the elements, the
    sum in a register (torch's sum starts from +0, so -0 deltas sum to +0)."""
    count, size = xs.size, base.size
    w = weights
    xa = _model(xs, 0, size, base)[start:stop]
    xb = _model(xs, min(1, count - 1), size, base)[start:stop]
    xc = _model(xs, min(2, count - 1), size, base)[start:stop]
    xd = _model(xs, min(3, count - 1), size, base)[start:stop]
    bs, o = base[start:stop], out[start:stop]
    zero = np.float32(0)
    if count == 1:
        for j in range(bs.size):
            b = _load(bs[j])
            total = zero + _term(xa[j], b, w[0], are_deltas, d)
            o[j] = _finish(total, b, normalize, divisor, lam, d, o[j])
    elif count == 2:
        for j in range(bs.size):
            b = _load(bs[j])
            total = zero + _term(xa[j], b, w[0], are_deltas, d) + _term(xb[j], b, w[1], are_deltas, d)
            o[j] = _finish(total, b, normalize, divisor, lam, d, o[j])
    elif count == 3:
        for j in range(bs.size):
            b = _load(bs[j])
            total = zero + _term(xa[j], b, w[0], are_deltas, d) + _term(xb[j], b, w[1], are_deltas, d)
            total += _term(xc[j], b, w[2], are_deltas, d)
            o[j] = _finish(total, b, normalize, divisor, lam, d, o[j])
    else:
        for j in range(bs.size):
            b = _load(bs[j])
            total = zero + _term(xa[j], b, w[0], are_deltas, d) + _term(xb[j], b, w[1], are_deltas, d)
            total += _term(xc[j], b, w[2], are_deltas, d)
            total += _term(xd[j], b, w[3], are_deltas, d)
            o[j] = _finish(total, b, normalize, divisor, lam, d, o[j])


@declared(_combine_signatures())
def combine(base, xs, weights, out, start, stop, elect, normalize, divisor, lam, are_deltas, d):
    """``gta.combine_eager`` with each torch op's rounding: the weighted deltas summed —
    with ``elect`` (TIES) only those whose sign agrees with the sum's — divided (when
    ``normalize``) by the agreeing weights' sum (a zero sum by 1), or without ``elect`` by
    ``divisor``; times ``lam``; plus the base; over elements [start, stop). ``xs``: the
    models' (pruned) deltas when ``are_deltas``, else the models themselves, whose deltas
    ``x - base`` are made here a tile at a time, rounded to D as ``torch.sub`` rounds them
    (task arithmetic's whole block in one pass over its inputs). The math is done in D (the
    kind of the scalar ``d``); base, models and output may be stored as bfloat16 with D
    float32 (each element widened exactly on load, the result rounded to bfloat16 as
    torch's conversion does). Each step runs over a tile of fp32 scratch, so every loop
    vectorizes."""
    n_models = xs.size
    if not elect and n_models <= 4:  # one pass, the sum in a register
        _combine_few(base, xs, weights, out, start, stop, normalize, divisor, lam, are_deltas, d)
        return
    wd = np.empty((n_models if elect else 0, TILE), np.float32)
    mixed = np.empty(TILE, np.float32)
    total = np.empty(TILE, np.float32)
    div = np.empty(TILE, np.float32)
    for lo in range(start, stop, TILE):
        n = min(TILE, stop - lo)
        b, o = base[lo : lo + n], out[lo : lo + n]
        if not elect:  # each model's weighted delta added as it is made: no tile per model
            for j in range(n):  # torch's sum starts from +0 (so -0 deltas sum to +0)
                mixed[j] = np.float32(0)
        for m in range(n_models):
            w, x = weights[m], _model(xs, m, base.size, base)[lo : lo + n]
            if elect:
                wdm = wd[m]
                if are_deltas:
                    for j in range(n):
                        wdm[j] = _rounded(_load(x[j]) * w, d)
                else:
                    for j in range(n):
                        wdm[j] = _rounded(_rounded(_load(x[j]) - _load(b[j]), d) * w, d)
            elif are_deltas:
                for j in range(n):
                    mixed[j] += _rounded(_load(x[j]) * w, d)
            else:
                for j in range(n):
                    mixed[j] += _rounded(_rounded(_load(x[j]) - _load(b[j]), d) * w, d)
        if elect:
            _elect_tile(wd, weights, b, o, n, normalize, lam, mixed, total, div, d)
            continue
        for j in range(n):
            o[j] = _finish(mixed[j], _load(b[j]), normalize, divisor, lam, d, o[j])


@_loop("void({T}[:, ::1], {T}[::1])")
def variance(xs, out):
    """``torch.var(xs, dim=0, unbiased=False)``, bit for bit: torch's Welford recurrence in
    float64 over the rows in order (mean += delta / k; m2 += delta * (x - mean)), then
    m2 / n through float32 to the dtype (checked against torch.var in tests)."""
    n_rows = xs.shape[0]
    mean = np.empty(TILE, np.float64)
    m2 = np.empty(TILE, np.float64)
    for lo in range(0, xs.shape[1], TILE):
        n = min(TILE, xs.shape[1] - lo)
        for j in range(n):
            mean[j] = 0.0
            m2[j] = 0.0
        for r in range(n_rows):
            x, k = xs[r, lo : lo + n], np.float64(r + 1)
            for j in range(n):
                v = np.float64(_load(x[j]))
                delta = v - mean[j]
                mean[j] += delta / k
                m2[j] += delta * (v - mean[j])
        o = out[lo : lo + n]
        for j in range(n):
            o[j] = _round_scalar(np.float32(m2[j] / n_rows), o[j])


@_loop("void({T}[::1], {T}[:, ::1], float32[::1], {T}[::1])")
def sce_combine(base, tvs, weights, out):
    """sce's erase and merge (``sce.sce``'s torch ops, each rounded as torch rounds): the
    majority sign of the summed task vectors (+ where the sum is >= 0), each model's
    weight where its task vector has that sign, the weighted agreeing task vectors
    summed, divided by the agreeing weights' sum (at least 1e-6), plus the base."""
    n_models = tvs.shape[0]
    total = np.empty(TILE, np.float32)
    merged = np.empty(TILE, np.float32)
    den = np.empty(TILE, np.float32)
    floor = np.float32(1e-6)
    for lo in range(0, base.size, TILE):
        n = min(TILE, base.size - lo)
        b = base[lo : lo + n]
        for j in range(n):  # torch's sums start from +0
            total[j] = np.float32(0)
            merged[j] = np.float32(0)
            den[j] = np.float32(0)
        for m in range(n_models):
            t = tvs[m, lo : lo + n]
            for j in range(n):
                total[j] += _load(t[j])
        for m in range(n_models):
            w, t = weights[m], tvs[m, lo : lo + n]
            for j in range(n):
                v = _load(t[j])
                positive = _rounded(total[j], b[j]) >= 0
                erased = w * np.float32(((v > 0) & positive) | ((v < 0) & ~positive))
                merged[j] += _rounded(v * erased, b[j])
                den[j] += erased
        o = out[lo : lo + n]
        for j in range(n):
            d = _rounded(den[j], b[j])
            d = _rounded(floor, b[j]) if d < floor else d  # clamp(min=1e-6), NaN kept
            q = _rounded(_rounded(merged[j], b[j]) / d, b[j])
            o[j] = _round(_load(b[j]) + q, b[j])


def _weighted_sum_signatures() -> list:
    """(the inputs' ``addresses``, float32 weights, output bits, divisor bits) for bfloat16
    (uint16) and float32 (uint32) bits: the inputs are stored as the output is."""
    out = []
    for t in (numba.uint16, numba.uint32):
        array = numba.types.Array(t, 1, "C")
        out.append(numba.void(numba.int64[::1], numba.float32[::1], array, numba.uint32))
    return out


@numba.njit(inline="always", **_JIT)
def _weighted(acc, divisor, has_divisor, like):
    """A weighted sum's result: ``acc / divisor`` (or ``acc``) rounded to ``like``'s dtype."""
    return _round(acc / divisor if has_divisor else acc, like)


@declared(_weighted_sum_signatures())
def weighted_sum(xs, weights, out, divisor_bits):
    """``linear``'s loop: ``out`` = the eager ops' bits: acc = +0, then fma(x, c, acc) per input in order, then
    acc / divisor when ``divisor_bits`` is not 0's (float32 bits of Σ c, as torch sums
    them), rounded to the inputs' dtype. Up to four inputs in one pass with the sum in a
    register (twice as fast as tiles); more in tiles, one pass over a tile per input."""
    n, count = out.size, xs.size
    divisor, has_divisor = _f32(divisor_bits), divisor_bits != 0
    zero = np.float32(0)
    if count <= 4:
        a, w = _model(xs, 0, n, out), weights
        b = _model(xs, min(1, count - 1), n, out)
        c = _model(xs, min(2, count - 1), n, out)
        d = _model(xs, min(3, count - 1), n, out)
        if count == 1:
            for j in range(n):
                out[j] = _weighted(_fma(_load(a[j]), w[0], zero), divisor, has_divisor, out[j])
        elif count == 2:
            for j in range(n):
                acc = _fma(_load(b[j]), w[1], _fma(_load(a[j]), w[0], zero))
                out[j] = _weighted(acc, divisor, has_divisor, out[j])
        elif count == 3:
            for j in range(n):
                acc = _fma(_load(c[j]), w[2], _fma(_load(b[j]), w[1], _fma(_load(a[j]), w[0], zero)))
                out[j] = _weighted(acc, divisor, has_divisor, out[j])
        else:
            for j in range(n):
                acc = _fma(_load(c[j]), w[2], _fma(_load(b[j]), w[1], _fma(_load(a[j]), w[0], zero)))
                out[j] = _weighted(_fma(_load(d[j]), w[3], acc), divisor, has_divisor, out[j])
        return
    acc = np.empty(TILE, np.float32)
    for lo in range(0, n, TILE):
        m = min(TILE, n - lo)
        for j in range(m):
            acc[j] = zero
        for k in range(count):
            x, c = _model(xs, k, n, out)[lo : lo + m], weights[k]
            for j in range(m):
                acc[j] = _fma(_load(x[j]), c, acc[j])
        o = out[lo : lo + m]
        for j in range(m):
            o[j] = _weighted(acc[j], divisor, has_divisor, o[j])


@_loop("void({T}[::1], float32, {T}[::1])")
def scaled(x, scale, out):
    """``passthrough``'s scale: ``out`` = ``x * scale`` rounded to x's dtype, as ``torch.mul``
    by a Python float does it (the scale as float32, D = the stored dtype)."""
    for j in range(x.size):
        out[j] = _round(_load(x[j]) * scale, x[j])


@numba.njit(inline="always", **_JIT)
def add_squares(d, acc, n):
    """``acc[j] += d[j]²`` in fp64 for the first ``n`` elements (one lane per element)."""
    for j in range(n):
        v = np.float64(d[j])
        acc[j] += v * v


@numba.njit(**_JIT)
def lane_totals(lanes, out):
    """``out[r]`` = the sum of row ``r`` of ``lanes`` (fp64): eight partial sums by lane
    index mod 8, added in order."""
    eight = np.empty(8)
    for r in range(out.size):
        eight[:] = 0.0
        _add_lanes(lanes[r], eight)
        s = 0.0
        for k in range(8):
            s += eight[k]
        out[r] = s


@numba.njit(**_JIT)  # compiled per number of fine-tunes (a tuple of arrays), cached on disk
def stock_sums(base, xs, span, out):
    """model_stock's statistics. Row k of ``out``, for the k-th ``span``-element block: for each pair a < b of
    fine-tunes, Σ round(d_a·d_b); then for each, Σ d_a² (fp64; ``d_a`` = round(x_a − base)):
    one partial sum per element position in a tile from the block's start (so the adds
    vectorize), those summed by ``lane_totals``."""
    n = len(xs)
    d = np.empty((n, TILE), np.float32)
    lanes = np.zeros((out.shape[1], TILE))
    for k in range(out.shape[0]):
        lanes[:] = 0.0
        stop = min((k + 1) * span, base.size)
        for lo in range(k * span, stop, TILE):
            hi = min(lo + TILE, stop)
            b = base[lo:hi]
            for a in range(n):
                x, da = xs[a][lo:hi], d[a]
                for j in range(hi - lo):
                    da[j] = _rounded(_load(x[j]) - _load(b[j]), b[j])
            row = 0
            for a in range(n):
                for c in range(a + 1, n):
                    da, dc, acc = d[a], d[c], lanes[row]
                    for j in range(hi - lo):
                        acc[j] += np.float64(_rounded(da[j] * dc[j], b[j]))
                    row += 1
            for a in range(n):
                add_squares(d[a], lanes[row + a], hi - lo)
        lane_totals(lanes, out[k])


@numba.njit(**_JIT)
def stock_combine(base, xs, t, one_minus_t, count, out):
    """model_stock's combine: ``out`` = round(round(t·round(Σ x_i / N)) + round((1 − t)·base)), the sum a left
    fold from +0 rounded after each addition, as the eager ops."""
    acc = np.empty(TILE, np.float32)
    for lo in range(0, base.size, TILE):
        hi = min(lo + TILE, base.size)
        b, x = base[lo:hi], xs[0][lo:hi]
        for j in range(hi - lo):
            acc[j] = _rounded(np.float32(0) + _load(x[j]), b[j])
        for a in range(1, len(xs)):
            x = xs[a][lo:hi]
            for j in range(hi - lo):
                acc[j] = _rounded(acc[j] + _load(x[j]), b[j])
        o = out[lo:hi]
        for j in range(hi - lo):
            mean = _rounded(acc[j] / count, b[j])
            o[j] = _round(_rounded(t * mean, b[j]) + _rounded(one_minus_t * _load(b[j]), b[j]), b[j])


def pointers(arrays: list[np.ndarray]) -> np.ndarray:
    """The data addresses of contiguous arrays, as a loop taking any number of models wants
    them (``tensors.addresses`` for torch tensors). The caller keeps the arrays alive."""
    if not all(a.flags.c_contiguous for a in arrays):
        raise ValueError("pointers: every array must be contiguous")
    return np.array([a.ctypes.data for a in arrays], np.int64)
