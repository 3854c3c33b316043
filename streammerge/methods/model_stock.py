"""``model_stock``: move from the base towards the average fine-tune by a factor set by the
angle between the fine-tunes' deltas (Jang et al. 2024, Model Stock, arXiv:2403.19522).

mergekit 0.1.5, op by op in the working dtype D: ``d_i = w_i − w_0``; the mean over pairs
of ``cos_ij = clamp(d_i·d_j / max(‖d_i‖‖d_j‖, 1e-6), −1, 1)``; ``t = N·c/(1 + (N−1)·c)``
(0 where the denominator is within 1e-6 of 0); ``R = t·mean(w_i) + (1 − t)·w_0`` with the
mean as a left fold. ``filter_wise`` does all of that per row (last dimension).
Difference: over the whole tensor (the default) the dot products and norms are summed in
fp64 per fixed 128K-element block (in the compiled loops for bfloat16 and float32, one
partial sum per element position in a 2048-element tile, those summed as eight sums by
position mod 8; torch's sum otherwise), the block sums added in block order, then
rounded to D. mergekit sums them in D with torch's whole-tensor
reduction, whose order depends on the thread count; for nearly orthogonal deltas the dot
product cancels heavily, so its t is noisy: measured on the demo models, t differs in 7 of
39 tensors in bf16 (0.02% of output elements) and in 30 of 39 in fp32 (about half the
elements). Our t is the accurate one and does not depend on chunking or threads. Per row
(``filter_wise``) the computation is mergekit's own.

On CPU in bfloat16 and float32 the statistics and the combine run as compiled loops
(``fused``'s rounding after every float32 op, bit-identical to the eager ops here).
"""

from __future__ import annotations

import numpy as np
import torch

from . import direct, register, tensors
from .fused import stock_combine


def _offsets(xs, base_index):
    w0 = xs[base_index]
    ws = [x for i, x in enumerate(xs) if i != base_index]
    return w0, ws, [w - w0 for w in ws]


def _finish_t(dots, sq_norms, count: int, dtype, pairs):
    """t from the pairwise dot products and the offsets' squared norms (plain floats)."""
    cos = []
    for i, j in pairs:
        norm_product = torch.tensor(sq_norms[i] ** 0.5, dtype=dtype) * torch.tensor(
            sq_norms[j] ** 0.5, dtype=dtype
        )
        cos.append((torch.tensor(dots[(i, j)], dtype=dtype) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    return _t(torch.stack(cos).mean(dim=0), count)


def _t(cos_theta: torch.Tensor, count: int) -> torch.Tensor:
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)


def _pairs(n: int):
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def model_stock_fold(i, acc, xs, *, base_index, filter_wise=False, span=None):
    """The single statistics pass: one block's fp64 sums of d_a·d_b (products rounded to
    D, as mergekit multiplies in D) for each pair, then of each d_a² (in fp32 like
    torch.norm), appended to the tensor's list of block sums (added up in ``finish``, so
    any runs of blocks give the same bits). ``span``: ``xs`` holds consecutive blocks of
    that many elements, each summed on its own (in one compiled call)."""
    acc = [] if acc is None else acc
    w0, ws = xs[base_index], [x for i, x in enumerate(xs) if i != base_index]
    n = w0.numel()
    span = n if span is None else span
    if tensors.supports(w0):
        acc.extend(direct.stock_rows(tensors.bits(w0), [tensors.bits(w) for w in ws], span))
        return acc
    for lo in range(0, max(n, 1), span):  # block by block: no temporaries the size of the span
        base = w0.reshape(-1)[lo : lo + span]
        offsets = [w.reshape(-1)[lo : lo + span] - base for w in ws]
        dots = [(offsets[a] * offsets[b]).double().sum().item() for a, b in _pairs(len(ws))]
        acc.append((*dots, *(o.float().double().square().sum().item() for o in offsets)))
    return acc


def model_stock_reduce(i, acc, partial, **params):
    return partial if acc is None else acc + partial


def model_stock_finish(i, acc, *, ctx, base_index, filter_wise=False):
    totals = direct.stock_totals(acc)
    count = round(((8 * len(totals) + 1) ** 0.5 - 1) / 2)  # len(totals) = count·(count + 1)/2
    pairs = _pairs(count)
    return _finish_t(dict(zip(pairs, totals)), totals[len(pairs) :], count, ctx.work_dtype, pairs)


def _row_wise(xs, rows: int, base_index):
    """``filter_wise``: exactly mergekit's computation on whole rows (blocks hold whole
    rows; a 1-D tensor whole)."""
    w0, ws, offsets = _offsets(xs, base_index)
    count = len(ws)
    w0r, offs = w0.reshape(-1, rows), [o.reshape(-1, rows) for o in offsets]
    cos = []
    for a, b in _pairs(count):
        norm_product = torch.norm(offs[a], dim=-1) * torch.norm(offs[b], dim=-1)
        cos.append(((offs[a] * offs[b]).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    t = _t(torch.stack(cos).mean(dim=0).unsqueeze(-1), count)
    average = sum(w.reshape(-1, rows) for w in ws) / count
    return (t * average + (1 - t) * w0r).reshape(w0.shape)


def _combine_into(xs, t, base_index, out) -> None:
    """``stock_combine`` of the blocks ``xs`` (base at ``base_index``) into ``out``."""
    w0, ws = xs[base_index], [x for i, x in enumerate(xs) if i != base_index]
    weights = (np.float32(t.float().item()), np.float32((1 - t).float().item()), np.float32(len(ws)))
    stock_combine(tensors.bits(w0), tuple(tensors.bits(w) for w in ws), *weights, tensors.bits(out))


@register(
    "model_stock", fold=model_stock_fold, finish=model_stock_finish, reduce=model_stock_reduce, spans=True
)  # fmt: skip
def model_stock(xs, *, ctx, stats, base_index, filter_wise=False):
    if filter_wise:
        return _row_wise(xs, ctx.row, base_index)
    w0, ws = xs[base_index], [x for i, x in enumerate(xs) if i != base_index]
    t = stats[0]
    if tensors.supports(w0):
        out = torch.empty_like(w0, memory_format=torch.contiguous_format)
        _combine_into(xs, t, base_index, out)
        return out
    average = sum(ws) / len(ws)
    return t * average + (1 - t) * w0
