"""Jobs merged by compiled loops straight from the stored bytes into the output, with no
torch, wherever ``plan.torch_free`` says so: linear, and the gta family where no fine-tune
is pruned and no statistics pass is planned (task_arithmetic; dare at density 1 without
rescaling), over one stored dtype that is the output's (bfloat16 or float32) with D that
dtype or float32 over bfloat16; and model_stock over the whole tensor with inputs, D and
output one dtype. A merge made of these and bit copies never imports torch: ~2 s of
start-up and ~200 MiB, against the ~3 s a 3 x 2.9 GB linear merge takes to read and write
here.

Each loop gives the bits of the torch path (every input converted to D, the kernel's
combine, the result converted to the output dtype; ``tests/test_direct.py``): the same
float32 operations (``fused``), and the scalars rounded as the kernels round them
(``linear_scalars``, ``gta_scalars``, ``stock_t``, checked against torch in tests). The
kernels call the same functions for their compiled paths, so each rule is written once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import fused, parallel
from .spec import GTA

BITS = {"BF16": np.uint16, "F32": np.uint32}  # the loops' dtypes, as the integers they take


def scale_into(x: np.ndarray, scale: float, out: np.ndarray) -> None:
    """A passthrough's ``out`` = ``x * scale`` (bits of one of ``BITS``' dtypes), on every core."""
    parallel.run(lambda lo, hi: fused.scaled(x[lo:hi], np.float32(scale), out[lo:hi]), x.size)


@dataclass(frozen=True, slots=True)
class Loop:
    """A job's compiled loops over bits (blocks of each input as stored, in gather order).
    ``combine(xs, out, stats)`` merges a block into the same block of the output's bits;
    with a statistics pass, ``fold(xs, span)`` gives one row of sums per ``span``-element
    block of ``xs`` and ``finish(rows)`` (the tensor's rows in block order) the statistic
    ``combine`` finds in ``stats``."""

    combine: Callable[[list[np.ndarray], np.ndarray, list], None]
    fold: Callable[[list[np.ndarray], int], list] | None = None
    finish: Callable[[list], object] | None = None


def loop(job) -> Loop | None:
    """``job``'s loops; None where the job needs the torch kernels (``plan.torch_free``;
    bit copies are the executor's own)."""
    from ..plan import copies, torch_free

    if copies(job) or not torch_free(job):
        return None
    if job.method == "model_stock":
        return _stock(job)
    weight = [p.get("weight") for p in job.input_params]
    normalize = job.shared_params.get("normalize", True)
    if job.method == "linear":
        scalars = linear_scalars(weight, normalize)
        if scalars is None:  # the eager ops keep torch's inf/NaN (the planner rejects it)
            return None
        weights, divisor = scalars
        return Loop(lambda xs, out, stats: fused.weighted_sum(fused.pointers(xs), weights, out, divisor))
    base = job.base_index
    others = [m for m in range(len(job.inputs)) if m != base]
    lam = job.shared_params.get("lambda", 1.0)
    scalars = gta_scalars(
        [weight[m] for m in others], job.work_dtype, GTA[job.method].consensus, normalize, lam
    )

    def combine(xs: list[np.ndarray], out: np.ndarray, stats: list) -> None:
        gta_combine(xs[base], fused.pointers([xs[m] for m in others]), out, scalars, are_deltas=False)

    return Loop(combine)


def _stock(job) -> Loop:
    """model_stock over the whole tensor: the kernel's compiled statistics and combine, and
    its t made as the kernel makes it (``stock_t``)."""
    base = job.base_index
    others = [m for m in range(len(job.inputs)) if m != base]
    count, work = len(others), job.work_dtype

    def fold(xs: list[np.ndarray], span: int) -> list:
        return stock_rows(xs[base], [xs[m] for m in others], span)

    def finish(rows: list) -> tuple[np.float32, np.float32]:
        return stock_t(stock_totals(rows), count, work)

    def combine(xs: list[np.ndarray], out: np.ndarray, stats: list) -> None:
        t, one_minus_t = stats[0]
        fused.stock_combine(xs[base], tuple(xs[m] for m in others), t, one_minus_t, np.float32(count), out)

    return Loop(combine, fold, finish)


def stock_rows(base: np.ndarray, models: list[np.ndarray], span: int) -> list[tuple]:
    """model_stock's statistics of each ``span``-element block of the bits ``base`` and
    ``models`` (``fused.stock_sums``): a row per block of each pair's dot product, then
    each delta's squared norm."""
    count = len(models)
    rows = np.empty((max(1, -(-base.size // span)), count * (count - 1) // 2 + count))
    fused.stock_sums(base, tuple(models), max(span, 1), rows)
    return [tuple(row) for row in rows.tolist()]


def stock_totals(rows: list[tuple]) -> list[float]:
    """The rows of a tensor's blocks summed column by column, in block order."""
    totals = [0.0] * len(rows[0])
    for row in rows:
        totals = [s + r for s, r in zip(totals, row)]
    return totals


def stock_t(totals: list[float], count: int, work: str) -> tuple[np.float32, np.float32]:
    """(t, 1 − t) of model_stock from the summed statistics (each pair's dot product, then
    each delta's squared norm, as plain floats), each op a float32 op rounded to D as
    ``model_stock._finish_t`` does it in torch: the cosines (clamped), their mean, then
    ``t = N·c / (1 + (N − 1)·c)``, 0 where the denominator is within 1e-6 of 0."""
    d = _to(work)
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    dots, sq_norms = dict(zip(pairs, totals)), totals[len(pairs) :]
    tiny, one = d(1e-6), np.float32(1)
    cos = []
    for i, j in pairs:
        product = d(d(sq_norms[i] ** 0.5) * d(sq_norms[j] ** 0.5))
        c = d(d(dots[(i, j)]) / np.maximum(product, tiny))
        cos.append(np.minimum(np.maximum(c, -one), one))
    total = np.float32(0)
    for c in cos:
        total = np.float32(total + c)
    c = d(total / np.float32(len(cos)))
    denominator = d(one + d(np.float32(count - 1) * c))
    singular = abs(denominator) < tiny
    t = np.float32(0) if singular else d(d(np.float32(count) * c) / denominator)
    return t, d(one - t)


def _to(work: str) -> Callable[[float], np.float32]:
    """A value (a float, or a float32 op's result) rounded to D, as a float32."""
    if work == "F32":
        return np.float32
    return lambda x: _bf16(np.array([x], np.float32))[0]


def linear_scalars(weight: list[float], normalize: bool) -> tuple[np.ndarray, np.uint32] | None:
    """``fused.weighted_sum``'s (weights, divisor bits): the weights as
    ``torch.tensor(weight, dtype=float32)`` rounds them, and the bits of their sum
    (``linear_divisor``; 0 for no division); None for a zero sum with ``normalize`` (x / +0
    is not "no division": the eager ops keep torch's inf/NaN)."""
    weights = np.array(weight, np.float32)
    divisor = linear_divisor(weights, normalize)
    if divisor == 0:
        return None
    return weights, np.uint32(0) if divisor is None else np.float32(divisor).view(np.uint32)


def linear_divisor(coefficients: np.ndarray, normalize: bool) -> np.float32 | None:
    """Σ c of linear's float32 weights as torch sums them (``coefficients.sum()``), None
    without ``normalize`` (no division). Torch adds up to ``IN_ORDER_SUM`` in order; beyond
    that its vectorized sum has an order of its own, so torch is asked."""
    from ..plan import IN_ORDER_SUM

    if not normalize:
        return None
    if len(coefficients) > IN_ORDER_SUM:
        import torch

        return np.float32(torch.from_numpy(coefficients).sum().item())
    total = np.float32(0)
    for c in coefficients:
        total = np.float32(total + c)
    return total


def gta_scalars(weights: list[float], work: str, consensus: str | None, normalize: bool, lam: float) -> tuple:
    """``fused.combine``'s scalars for the fine-tunes' ``weights``, D (``work``) and the
    preset's ``consensus``: (the weights as ``torch.tensor(weights, dtype=D)`` rounds them,
    through float32, as float32; the flags elect, normalize, divisor, lambda; D's kind).
    The divisor is the weights' sum as ``cumsum`` makes it (in order, in float64) rounded to
    float32 and to D, or 1 for the "sum" consensus or a sum under 1e-8
    (``gta.combine_eager``'s rule)."""
    w = np.array(weights, np.float32)
    if work == "BF16":
        w = _bf16(w)
    total = np.float64(0)  # torch's CPU cumsum of float32 adds in float64
    for v in w:
        total += np.float64(v)
    total = np.float32(total)
    if work == "BF16":
        total = _bf16(np.array([total]))[0]
    divisor = np.float32(1.0 if consensus == "sum" or abs(total) < 1e-8 else total)
    return w, (consensus == "sum", bool(normalize), divisor, np.float32(lam)), BITS[work](0)


def gta_combine(
    base: np.ndarray, models: np.ndarray, out: np.ndarray, scalars: tuple, are_deltas: bool
) -> None:
    """``fused.combine`` over all of ``base`` (bits) in parts on every core: ``models`` the
    fine-tunes' addresses (their pruned deltas when ``are_deltas``), ``scalars`` from
    ``gta_scalars``."""
    w, flags, kind = scalars
    parallel.run(
        lambda lo, hi: fused.combine(base, models, w, out, lo, hi, *flags, are_deltas, kind), base.size
    )


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (to nearest, ties to even; NaN as 0x7FC0, as
    torch rounds), back as float32."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32)
    return np.where(np.isnan(x), np.uint32(0x7FC00000), rounded).view(np.float32)
