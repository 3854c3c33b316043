"""``multislerp``: barycentric interpolation on the hypersphere of several models (or of
their task vectors from an optional base), mergekit 0.1.5's ``multislerp``
(https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).

In the working dtype D, over the flattened inputs ``F_i`` (minus the base when given):
``n_i = ‖F_i‖``, ``U_i = F_i/(n_i + eps)``, ``m = Σ w_i U_i`` (weights normalised to sum 1
by default), ``R = m/‖m‖ · Σ w_i n_i`` (+ base). With one non-base input it is returned
unchanged; when ``‖m‖ < eps`` two inputs fall back to ``w_0 F_0 + w_1 F_1`` and more are an
error, as in mergekit.

Streaming: the norms and ‖m‖ come from two statistics passes, summed in fp64 over fixed
blocks and rounded to D (mergekit: torch's whole-tensor reductions in D). Difference:
mergekit then projects the U_i onto the tangent space at m/‖m‖ and maps their weighted sum
back with the exponential map; in exact arithmetic that tangent sum is zero
(``Σ w_i (U_i − (U_i·m̂) m̂) = m − ‖m‖ m̂ = 0``), so mergekit adds rounding noise of about
one ulp whose bits depend on its reduction order. We take it as the zero it is: outputs
differ from mergekit's in the last bit of some elements (counted by the parity tool).
"""

from __future__ import annotations

import torch

from ..errors import MethodError
from . import register


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


def multislerp_fold(i, acc, xs, *, stats, base_index, weight, normalize_weights=True, eps=1e-8):
    """Pass 0: each input's sum of squares (fp32 squares, like torch.norm). Pass 1: the sum
    of squares of the weighted mean of the unit vectors (D)."""
    _, flat = _flat(xs, base_index)
    if i == 0:
        sums = flat.float().double().square().sum(dim=1)
    else:
        norms, w = stats[0]
        mean = (_units(flat, norms, eps) * w.view(-1, 1)).sum(0)
        sums = mean.float().double().square().sum().reshape(1)
    return sums if acc is None else acc + sums


def multislerp_finish(i, acc, *, ctx, stats, base_index, weight, normalize_weights=True, eps=1e-8):
    dtype = ctx.work_dtype
    if i == 0:
        return acc.sqrt().to(dtype).view(-1, 1), _weights(
            weight, base_index, dtype, normalize_weights, acc.device
        )
    mean_norm = acc.sqrt().to(dtype)[0]
    if mean_norm < eps and len(stats[0][1]) > 2:
        raise MethodError(
            f"multislerp: tensor {ctx.tensor}: the weighted mean of the inputs' directions is zero "
            "(antipodal inputs with balancing weights); change the weights"
        )
    return mean_norm


@register("multislerp", fold=multislerp_fold, finish=multislerp_finish)
def multislerp(xs, *, stats, base_index, weight, normalize_weights=True, eps=1e-8):
    base, others = _inputs(xs, base_index)
    if len(others) == 1:
        return others[0]
    (norms, w), mean_norm = stats
    _, flat = _flat(xs, base_index)
    if mean_norm < eps:  # two inputs: mergekit's linear fallback
        result = flat[0] * w[0] + flat[1] * w[1]
    else:
        mean = (_units(flat, norms, eps) * w.view(-1, 1)).sum(0) / mean_norm
        result = mean * (norms.squeeze(-1) * w).sum()
    result = result.view(others[0].shape)
    return result if base is None else result + base
