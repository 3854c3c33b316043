"""``nearswap``: take the other model where it is close to the base, blend elsewhere
(alchemonaut, QuartetAnemoi-70B-t0.0001).

``w = clamp(t / clamp(|B − X|, min=1e-6), 0, 1);  R = w·X + (1 − w)·B``, every op in the
working dtype, as mergekit 0.1.5: entries with ``|B − X| ≤ t`` take X fully.
"""

from __future__ import annotations

import torch

from . import register


@register("nearswap")
def nearswap(xs: list[torch.Tensor], *, base_index: int, t: float) -> torch.Tensor:
    base, other = xs[base_index], xs[1 - base_index]
    absdiff = torch.abs(base - other)
    weight = (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base
