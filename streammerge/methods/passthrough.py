"""``passthrough``: copy the single input, optionally multiplied by ``scale``.

Matches mergekit: ``x * scale`` in the working dtype (a Python float enters at fp32
precision, rounded once to D). ``scale`` 1 copies the bits untouched.
"""

from __future__ import annotations

import torch

from . import register


@register("passthrough")
def passthrough(xs: list[torch.Tensor], *, base_index: int | None = None, scale: list[float]) -> torch.Tensor:
    (x,) = xs
    return x if scale[0] == 1.0 else x * scale[0]
