"""``ram`` and ``ramplus_tl``: Reinforced Agent Merging (arXiv:2601.13572), as mergekit 0.1.5.

Per element, over the task vectors ``TV_i = x_i − B`` (working dtype D): ``A_i = |TV_i| > ε``,
``c = Σ_i A_i``; an element only one model changes (c = 1) takes that change whole, one
several models change is averaged over them: ``R = B + Σ_i (TV_i·A_i·[c=1] + TV_i·A_i·[c>1]/c)``.
``ramplus_tl`` scales each model's unique changes by ``λ_i = 1 + r·clamp(ρ_i, 0, α)`` with
``ρ_i = #(A_i ∧ c>1) / max(#(A_i ∧ c=1), ε)`` counted over the whole tensor (one statistics
pass of exact integer counts). Every elementwise step runs mergekit's own torch ops on each
block, so results are bit-identical. Difference: mergekit returns ``ramplus_tl`` in fp32 for
bf16/fp16 inputs (its config.json then claims bf16); we cast back to the output dtype.
"""

from __future__ import annotations

import torch

from . import register


def _prepare(xs, base_index, epsilon):
    """mergekit's _prepare_ram_vectors on one block: (n_models, elements) views and masks."""
    base = xs[base_index]
    tensors = [x for i, x in enumerate(xs) if i != base_index]
    tv_flat = torch.stack([t - base for t in tensors], dim=0).view(len(tensors), -1)
    nonzero = tv_flat.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return base, tv_flat, nonzero, counts, counts > 1, counts == 1


@register("ram")
def ram(xs, *, base_index, epsilon=1e-5):
    if len(xs) == 1:
        return xs[base_index]
    base, tv_flat, nonzero, counts, overlap, unique = _prepare(xs, base_index, epsilon)
    tv_z = tv_flat * nonzero
    merged = ((tv_z * unique) + (tv_z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_fold(i, acc, xs, *, base_index, r=0.1, alpha=0.2, epsilon=1e-5):
    """The one statistics pass: per model, elements it changes alone and together."""
    _, _, nonzero, _, overlap, unique = _prepare(xs, base_index, epsilon)
    shared = (nonzero & overlap).sum(dim=1)
    alone = (nonzero & unique).sum(dim=1)
    return (shared, alone) if acc is None else (acc[0] + shared, acc[1] + alone)


def ramplus_finish(i, acc, *, base_index, r=0.1, alpha=0.2, epsilon=1e-5):
    shared, alone = acc
    rho = shared / alone.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)  # λ_i, fp32 as in mergekit


@register("ramplus_tl", fold=ramplus_fold, finish=ramplus_finish)
def ramplus_tl(xs, *, stats, base_index, r=0.1, alpha=0.2, epsilon=1e-5):
    if len(xs) == 1:
        return xs[base_index]
    base, tv_flat, nonzero, counts, overlap, unique = _prepare(xs, base_index, epsilon)
    lam = stats[0]
    tv_z = tv_flat * nonzero
    merged = ((tv_z * unique * lam.unsqueeze(-1)) + (tv_z * overlap / counts.clamp(min=1))).sum(
        dim=0, keepdim=True
    )
    return base + merged.reshape_as(base)
