"""``karcher``: the Karcher (Riemannian) mean of the inputs' directions on the unit sphere,
scaled by their mean norm (mergekit 0.1.5's ``karcher``; Grove & Karcher 1973, and
arXiv:2603.04972 for its use in merging). Every input, the base included, has weight 1/N.

Streaming: the mean direction only ever moves inside the span of the inputs (it starts as
their normalised average and each step adds a combination of ``unit_i − cos·mean``), so it
is tracked as coefficients ``mean = Σ a_j x_j`` and every dot product and norm of
mergekit's iteration comes from the inputs' Gram matrix ``G_ij = x_i·x_j``: one statistics
pass (fp64 sums over fixed blocks), then the same iteration as mergekit (``max_iter``
steps, the same ``tol`` tests) on N coefficients in fp64, then one combine pass
``R = rnd_D(scale · rnd_D(Σ a_j x_j))``. Difference: mergekit rounds the N unit vectors
and the running mean to D after every step; we round once at the end, so results are the
more accurate ones and differ from mergekit's by a few ulps in bf16 (counted by the parity
tool) — whatever the chunk size or thread count.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import register


def karcher_fold(i, acc, xs, *, base_index=None, max_iter=10, tol=1e-5):
    """The statistics pass: the Gram matrix of the inputs (products in fp32, summed in fp64),
    on the CPU whatever the device, so the sums (and the output) are the same bits."""
    flat = torch.stack([x.reshape(-1).float().cpu() for x in xs]).double()
    gram = (flat @ flat.T).numpy()
    return gram if acc is None else acc + gram


def karcher_finish(i, acc, *, base_index=None, max_iter=10, tol=1e-5):
    return coefficients(np.asarray(acc, dtype=np.float64), int(max_iter), tol)


def coefficients(gram: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, float]:
    """(a, scale): the Karcher mean direction as ``Σ a_j x_j`` and ``Σ α_i n_i``, from the
    Gram matrix of the N inputs, following mergekit's iteration step for step."""
    n = len(gram)
    alpha = 1.0 / n
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    scale = float(np.float32(sum(np.float32(alpha) * np.float32(v) for v in norms)))
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return np.zeros(n), 0.0
    beta = 1.0 / len(valid)
    units = np.zeros((n, n))  # row i: unit_i as coefficients over the inputs
    for i in valid:
        units[i, i] = 1.0 / norms[i]

    def dot(u, v):
        return float(u @ gram @ v)

    def normalise(u):
        length = math.sqrt(max(dot(u, u), 0.0))
        return u / length if length > tol else u

    mean = sum(beta * units[i] for i in valid)
    length = math.sqrt(max(dot(mean, mean), 0.0))
    mean = units[valid[0]].copy() if length < tol else mean / length
    for _ in range(max_iter):
        tangent = np.zeros(n)
        for i in valid:
            c = min(max(dot(mean, units[i]), -1.0), 1.0)
            theta = math.acos(c)
            if theta < tol:
                continue
            tangent += beta * (theta / math.sin(theta)) * (units[i] - c * mean)
        tangent_norm = math.sqrt(max(dot(tangent, tangent), 0.0))
        if tangent_norm < tol:
            break
        mean = normalise(math.cos(tangent_norm) * mean + math.sin(tangent_norm) * tangent / tangent_norm)
    return mean, scale


@register("karcher", fold=karcher_fold, finish=karcher_finish)
def karcher(xs, *, stats, base_index=None, max_iter=10, tol=1e-5):
    if len(xs) == 1:
        return xs[0]
    a, scale = stats[0]
    direction = sum(float(c) * x.float() for c, x in zip(a, xs)).to(xs[0].dtype)
    # ``fp32 scale * direction`` as the CPU computes it, spelled out: the scale rounded to D,
    # the product in fp32, rounded to D. A CUDA kernel skips the first rounding.
    scale_d = torch.tensor(scale, dtype=torch.float32).to(direction.dtype).item()
    wide = torch.float64 if direction.dtype == torch.float64 else torch.float32
    return (direction.to(wide) * scale_d).to(direction.dtype)
