"""``task_arithmetic``: base + λ·Σ w_i·(x_i − base) (Ilharco et al. 2023, editing models
with task arithmetic, https://arxiv.org/abs/2212.04089).

All in the working dtype D with mergekit 0.1.5's op sequence (its generalized task
arithmetic with no sparsifier and no sign consensus): deltas ``x_i − base`` rounded to D;
weights rounded to D (``torch.tensor(weights, dtype=D)``), each delta multiplied by its
weight; summed over the model axis (fp32 accumulation for bf16/fp16); with ``normalize``
divided by Σ w (1 where |Σ w| < 1e-8); times λ when λ ≠ 1; added to the base.
"""

from __future__ import annotations

import torch

from . import register


@register("task_arithmetic")
def task_arithmetic(
    xs: list[torch.Tensor],
    *,
    base_index: int,
    weight: list[float | None],
    normalize: bool = False,
    **shared: float,
) -> torch.Tensor:
    """xs: inputs in dtype D, the base at ``base_index``; ``lambda`` comes in ``shared``
    (it is a Python keyword). Returns dtype D."""
    lam = shared.pop("lambda", 1.0)
    assert not shared, shared
    base = xs[base_index]
    others = [i for i in range(len(xs)) if i != base_index]
    if not others:
        return base
    deltas = base.new_empty((len(others), *base.shape))  # (n_models, *shape)
    for row, i in enumerate(others):
        torch.sub(xs[i], base, out=deltas[row])
    w = torch.tensor([weight[i] for i in others], dtype=deltas.dtype, device=deltas.device)
    w = w.reshape((len(others),) + (1,) * base.dim())
    deltas.mul_(w)
    mixed = deltas.sum(dim=0)
    divisor = w.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return base + mixed
