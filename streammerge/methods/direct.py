"""Jobs merged by one compiled loop straight from the stored bytes into the output, with no
torch: linear, and the gta family where no fine-tune is pruned (task_arithmetic; ties and
dare at density 1), wherever the plan counts the job as direct (``plan.direct``: one stored
dtype, the output's, bfloat16 or float32, with D that dtype or float32 over bfloat16) and
torch-free (``plan.torch_free``). A merge made of these and bit copies never imports torch:
~2 s of start-up and ~200 MiB, against the ~3 s a 3 x 2.9 GB linear merge takes to read
and write here.

Each loop gives the bits of the torch path (every input converted to D, the kernel's
combine, the result converted to the output dtype; ``tests/test_direct.py``): the same
float32 operations (``fused``), and the scalars rounded as the kernels round them
(``linear_divisor``, ``gta_scalars``, checked against torch in tests).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import fused, parallel
from .spec import GTA

BITS = {"BF16": np.uint16, "F32": np.uint32}  # the loops' dtypes, as the integers they take
Loop = Callable[[list[np.ndarray], np.ndarray], None]


def loop(job) -> Loop | None:
    """``job``'s loop, ``run(xs, out)``: a block of each input's bits (as stored, in gather
    order) merged into the same block of the output's bits; None where the job needs the
    torch kernels (``plan.torch_free``; bit copies are the executor's own)."""
    from ..plan import copies, torch_free

    if copies(job) or not torch_free(job):
        return None
    params = {k: [p.get(k) for p in job.input_params] for k in ("weight", "density")}
    normalize = job.shared_params.get("normalize", True)
    if job.method == "linear":
        weights = np.array(params["weight"], np.float32)  # as torch.tensor(weight, float32) rounds
        divisor = linear_divisor(weights, normalize)
        if divisor == 0:  # x / +0 is not "no division": the eager ops keep torch's inf/NaN
            return None  # (the planner rejects it)
        return lambda xs, out: fused.weighted_sum(fused.pointers(xs), weights, out, bits_of(divisor))
    base = job.base_index
    others = [m for m in range(len(job.inputs)) if m != base]
    consensus = GTA[job.method].consensus
    weights, divisor = gta_scalars([params["weight"][m] for m in others], job.work_dtype, consensus)
    flags = (consensus == "sum", bool(normalize), divisor, np.float32(job.shared_params.get("lambda", 1.0)))
    kind = BITS[job.work_dtype](0)  # D's kind, for the loop's roundings

    def run(xs: list[np.ndarray], out: np.ndarray) -> None:
        b, models = xs[base], fused.pointers([xs[m] for m in others])
        parallel.run(
            lambda lo, hi: fused.combine(b, models, weights, out, lo, hi, *flags, False, kind), b.size
        )

    return run


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


def bits_of(divisor: np.float32 | None) -> np.uint32:
    """``weighted_sum``'s divisor argument: the float32's bits; 0 (no division) for None."""
    return np.uint32(0) if divisor is None else np.float32(divisor).view(np.uint32)


def gta_scalars(weights: list[float], work: str, consensus: str | None) -> tuple[np.ndarray, np.float32]:
    """(weights, divisor) for ``fused.combine``: the fine-tunes' weights as
    ``torch.tensor(weights, dtype=D)`` rounds them (through float32), as float32; and their
    sum as ``cumsum`` makes it (in order, in float64) rounded to float32 and to D, or 1 for the "sum" consensus or a sum under 1e-8
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
    return w, np.float32(1.0 if consensus == "sum" or abs(total) < 1e-8 else total)


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (to nearest, ties to even), back as float32."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)
