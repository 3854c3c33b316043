"""``passthrough``: copy the single input, optionally multiplied by ``scale``.

Matches mergekit: ``x * scale`` in the working dtype (a Python float enters at fp32
precision, rounded once to D). ``scale`` 1 copies the bits untouched. When the input,
working and output dtypes are one, the executor writes the product straight into its
output buffer (``scale_into``; ``plan.copies``): no block temporaries, no kernel modules.
"""

from __future__ import annotations

import torch

from . import register


def scale_into(x: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """``out[:] = x * scale``, the same bits as the kernel, without a temporary."""
    torch.mul(x, scale, out=out)


@register("passthrough")
def passthrough(xs: list[torch.Tensor], *, base_index: int | None = None, scale: list[float]) -> torch.Tensor:
    (x,) = xs
    return x if scale[0] == 1.0 else x * scale[0]
