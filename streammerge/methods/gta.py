"""The generalized task arithmetic family: task_arithmetic, ties, dare_ties, dare_linear,
breadcrumbs, breadcrumbs_ties, della, della_linear — one pipeline, a preset each
(``spec.GTA``): sparsify each task vector → elect signs → combine → add to the base.

Papers: task arithmetic (Ilharco et al. 2023, arXiv:2212.04089); TIES (Yadav et al.
2023, arXiv:2306.01708); DARE (Yu et al. 2024, arXiv:2311.03099); model breadcrumbs
(Davari & Belilovsky 2024, arXiv:2312.06795); DELLA (Deep et al. 2024, arXiv:2406.11617).

mergekit 0.1.5 semantics (``generalized_task_arithmetic.py``, ``sparsify.py``), op by op:
deltas ``x_m − base`` in the working dtype D; weights rounded to D; signs elected from the
*weighted* pruned deltas (the TIES paper uses unweighted ones); ``normalize`` divides by
the sum of the weights that agree with the elected sign; ``lambda`` scales; base added.
Deliberate differences, each because mergekit's choice depends on the machine or order:
- magnitude pruning keeps exactly k = max(1, int(density·n)) elements like mergekit, but
  breaks ties at the threshold by flat index as a *stable* sort would (top-k: earliest
  wins; breadcrumbs' ascending window: earliest ranks lowest), where mergekit's unstable
  sorts keep an arbitrary subset. Verified: mergekit with ``stable=True`` sorts gives
  byte-identical output;
- DARE and DELLA masks come from a keyed counter generator (``rng``), keyed by (seed,
  tensor, model), not torch's global generator: the same in distribution, identical for
  any chunking, thread count or order; DELLA ranks use a stable sort;
- L1 rescale norms are summed in fp64 per fixed statistics block (256K elements aligned
  to the tensor start; della: whole rows), the block sums added in block order, then
  rounded to the work dtype (mergekit: torch's whole-tensor sum), so a rescale factor can
  differ in the last bit.
Paper-faithful options (ours; mergekit's behaviour is the default): ``sign_election:
unweighted`` elects signs from the pruned deltas before weighting (TIES paper, §3);
``rescale_mode: density`` divides kept deltas by their keep probability (DARE eq. 2; DELLA
§3.1 per element) instead of the L1 factor.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch

from . import BlockContext, direct, fused, parallel, register, select, tensors
from .rng import stream_key, uniform, uniform_bits24
from .select import (
    Boundary,
    apply_mask,
    histogram,
    keep_window,
    key_bits,
    locate,
    magnitude_keys,
    magnitude_keys_np,
)
from .spec import GTA, combines_in_torch_order

RESCALE_EPS = 1e-7


def _rank_window(sparsifier: str, n: int, density: float, gamma: float) -> tuple[int, int]:
    """Ascending-rank window [lo, hi) of |delta| that the sparsifier keeps."""
    if sparsifier == "magnitude":
        k = 0 if density <= 0 or n == 0 else max(1, int(density * n))
        return n - k, n
    target = int(density * n)  # magnitude_outliers (mergekit 0.1.5)
    bottom = max(0, n - target - int(gamma * n))
    return bottom, bottom + target


def _pass_kinds(ctx: BlockContext, dtype: torch.dtype, rescale: bool) -> list[str]:
    sparsifier = GTA[ctx.method].sparsifier
    kinds = []
    if sparsifier in ("magnitude", "magnitude_outliers"):
        kinds += ["select_high", "select_low"] if key_bits(dtype) == 32 else ["select"]
    if sparsifier is not None and rescale:
        kinds.append("l1")
    return kinds


def _others(xs: list, base_index: int) -> list[int]:
    return [i for i in range(len(xs)) if i != base_index]


def _prunes(density: float | None) -> bool:
    return density is not None and density < 1


def _pruned(preset, others, density) -> bool:
    """Whether any fine-tune of ``others`` is pruned (else gta is one compiled combine pass)."""
    return preset.sparsifier is not None and any(_prunes(density[m]) for m in others)


def gta_fold(i: int, acc, xs, *, ctx, stats, base_index, weight, normalize, rescale=False, density=None,
             gamma=None, epsilon=None, int8_mask=False, rescale_mode="l1", **shared):  # fmt: skip
    """Statistics pass ``i`` over one more block of a run: histograms for the magnitude
    windows (counted in place), or one entry per block of L1 terms, summed in block order
    only in ``gta_finish``, so how blocks are grouped into runs never changes a bit."""
    kind = _pass_kinds(ctx, xs[0].dtype, rescale and rescale_mode == "l1")[i]
    base = xs[base_index]
    acc = {} if acc is None else acc
    sparsifier = GTA[ctx.method].sparsifier
    for m in _others(xs, base_index):
        if not _prunes(density[m]):
            continue
        if tensors.supports(base) and (kind != "l1" or sparsifier in ("random", "della_magprune")):
            _fold_fused(kind, acc, xs[m], base, m, ctx, stats, density[m], _get(epsilon, m))
            continue
        delta = xs[m] - base
        if kind == "l1" and sparsifier in ("magnitude", "magnitude_outliers"):
            acc.setdefault(m, []).append(_l1_window_block(delta, ctx, stats, m))
        elif kind == "l1":
            pruned = _sparsify(
                delta, m, ctx, stats, None, density[m], _get(gamma, m), _get(epsilon, m), None, False
            )
            acc.setdefault(m, []).append((_abs_sum(delta), _abs_sum(pruned)))
        elif kind in ("select", "select_high"):
            shift = 16 if kind == "select_high" else 0
            acc[m] = histogram(magnitude_keys(delta.reshape(-1)), shift, None, acc.get(m))
        else:  # select_low: low 16 bits of the keys in each boundary's high bin
            keys = magnitude_keys(delta.reshape(-1))
            lows = acc.setdefault(m, {})
            for high in {b.key for b in stats[0][m]}:
                lows[high] = histogram(keys, 0, high, lows.get(high))
    return acc


def _fold_fused(kind: str, acc: dict, x, base, m: int, ctx, stats, density: float, epsilon) -> None:
    """``gta_fold``'s step for one model in one compiled loop: the histogram of a select
    pass, or a DARE or DELLA block's L1 terms."""
    x, b = tensors.bits(x), tensors.bits(base)
    if kind == "l1" and GTA[ctx.method].sparsifier == "della_magprune":
        acc.setdefault(m, []).append(fused.l1_della(x, b, *_della_keep(ctx, m, density, epsilon)))
        return
    if kind == "l1":
        acc.setdefault(m, []).append(fused.l1_random(x, b, *_random_keep(ctx, m, density)))
        return
    highs = [-1] if kind != "select_low" else sorted({bd.key for bd in stats[0][m]})
    shift = 16 if kind == "select_high" else 0
    for high in highs:
        counts = acc if high < 0 else acc.setdefault(m, {})
        slot = m if high < 0 else high
        if slot not in counts:
            counts[slot] = np.zeros(65536, np.int64)
        fused.delta_histogram(x, b, shift, high, counts[slot])


def _dare_p(ctx: BlockContext, density: float) -> float:
    """DARE's keep probability as mergekit has it: ``full_like(delta, density, work)``."""
    return torch.tensor(density, dtype=_work_dtype(ctx.work_dtype)).item()


def _threshold24(p: float) -> np.uint32:
    """Keep where u < p, u on a 2^-24 grid: the 24-bit integers compared with ceil(p * 2^24)."""
    return np.uint32(math.ceil(p * 2**24))


def _random_keep(ctx: BlockContext, m: int, density: float) -> tuple[np.uint64, int, np.uint32]:
    """DARE's keep rule for model ``m``'s block, as the compiled loops take it: (stream
    key, first element index, 24-bit threshold)."""
    return stream_key(ctx.seed, ctx.tensor, m)[0], ctx.offset, _threshold24(_dare_p(ctx, density))


def gta_reduce(i: int, acc, partial, **params):
    """Join the next run's ``partial`` onto ``acc`` (runs arrive in order): lists of block
    terms are concatenated, histograms added."""
    if acc is None:
        return partial
    for m, part in partial.items():
        if m not in acc:
            acc[m] = part
        elif isinstance(part, list):
            acc[m].extend(part)
        elif isinstance(part, dict):
            for high, counts in part.items():
                acc[m][high] += counts
        else:
            acc[m] += part
    return acc


def _abs_sum(x: torch.Tensor) -> float:
    return x.abs().double().sum().item()


def _l1_window_block(delta, ctx, stats, m) -> tuple:
    """One block's L1 terms for a magnitude window: (sum |delta|, sum |delta| strictly
    inside the window's boundary keys, {boundary key: (elements with it, their |value|)})."""
    lo, hi = _boundaries(stats, ctx, m)
    keys = magnitude_keys_np(delta)
    a = delta.reshape(-1).abs().double()
    inside = torch.from_numpy((keys > lo.key) & (keys < hi.key))
    ties = {}
    for key in {lo.key, hi.key}:
        tied = keys == key
        count = int(np.count_nonzero(tied))
        if count:
            ties[key] = (count, a[int(np.argmax(tied))].item())
    return a.sum().item(), (a * inside).sum().item(), ties


def _window_l1(blocks: list, boundaries, window, earliest_high: bool) -> tuple[float, float]:
    """sum |delta| and sum |kept delta| of a magnitude window from its blocks' terms, in
    block order: boundary ties are kept by their position among all ties of that key in
    element order, as ``keep_window`` keeps them in the combine pass."""
    before = after = 0.0
    seen: dict[int, int] = {}
    for block_before, inside, ties in blocks:
        kept_ties = 0.0
        for key, (count, value) in ties.items():
            b = next(b for b in boundaries if b.key == key)
            first = seen.get(key, 0)
            lo_p, hi_p = select.tie_span(b, *window, earliest_high)
            kept_ties += max(0, min(hi_p, first + count) - max(lo_p, first)) * value
            seen[key] = first + count
        before += block_before
        after += inside + kept_ties
    return before, after


def gta_finish(i: int, acc, *, ctx, stats, base_index, weight, normalize, rescale=False,
               density=None, gamma=None, epsilon=None, int8_mask=False, rescale_mode="l1", **shared):  # fmt: skip
    """Turn a pass's folded counts into boundaries (select passes) or rescale factors (l1)."""
    kind = _pass_kinds(ctx, ctx.work_dtype, rescale and rescale_mode == "l1")[i]
    n = int(np.prod(ctx.shape))
    sparsifier = GTA[ctx.method].sparsifier
    out = {}
    for m, counts in (acc or {}).items():
        window = _rank_window(sparsifier, n, density[m], _get(gamma, m) or 0.0)
        if kind == "l1":
            if sparsifier in ("magnitude", "magnitude_outliers"):
                boundaries = _boundaries(stats, ctx, m)
                sums = _window_l1(counts, boundaries, window, sparsifier == "magnitude")
                work = ctx.work_dtype
            else:
                sums = (0.0, 0.0)
                for block in counts:  # in block order
                    sums = (sums[0] + block[0], sums[1] + block[1])
                work = _work_dtype(ctx.work_dtype)
            before, after = (torch.tensor(v, dtype=work) for v in sums)
            ok = bool(before >= RESCALE_EPS) and bool(after >= RESCALE_EPS)
            out[m] = before / after if ok else None
            continue
        ranks = (window[0], max(window[0], window[1] - 1))
        if kind == "select":
            out[m] = tuple(Boundary(*locate(counts, r)) for r in ranks)
        elif kind == "select_high":
            out[m] = tuple(Boundary(*locate(counts, r)) for r in ranks)  # key = the high 16 bits
        else:  # select_low: refine each boundary's high bin to the exact 32-bit key
            out[m] = select.refine(stats[0][m], ranks, counts)
    return out


def _boundaries(stats, ctx: BlockContext, m: int) -> tuple[Boundary, Boundary]:
    """Model ``m``'s magnitude-window boundaries: selection passes come first, and the exact
    boundaries are the last of them (the second pass for 32-bit keys)."""
    return stats[1 if key_bits(ctx.work_dtype) == 32 else 0][m]


def _get(values, m):
    return None if values is None else values[m]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """mergekit's work dtype for random masks on CPU: bf16 stays bf16, others go to fp32."""
    return dtype if dtype == torch.bfloat16 else torch.float32


def _sparsify(delta, m, ctx, stats, state, density, gamma, epsilon, factor, by_density):
    """Prune model ``m``'s delta block; ``factor`` is its L1 rescale (None: none), and
    ``by_density`` divides each kept element by its keep probability instead (papers)."""
    sparsifier = GTA[ctx.method].sparsifier
    if sparsifier in ("magnitude", "magnitude_outliers"):
        n = int(np.prod(ctx.shape))
        lo, hi = _rank_window(sparsifier, n, density, gamma or 0.0)
        if hi <= lo:
            return torch.zeros_like(delta)
        boundaries = _boundaries(stats, ctx, m)
        seen = state.setdefault(("seen", m), {})
        # Tie order of a stable sort: descending for top-k, ascending for breadcrumbs.
        keep = keep_window(delta, *boundaries, lo, hi, seen, earliest_high=sparsifier == "magnitude")
        masked = apply_mask(delta, keep)
        if by_density:
            return masked / max(density, 1e-30)
        return masked if factor is None else masked * factor
    work = _work_dtype(delta.dtype)
    d = delta.to(work)
    key = stream_key(ctx.seed, ctx.tensor, m)
    if sparsifier == "random":
        p = _dare_p(ctx, density)
        mask = uniform_bits24(key, ctx.offset, d.numel()) < _threshold24(p)
        keep_p = p  # DARE (Yu et al. 2024, eq. 2): kept deltas / p
    else:  # della_magprune: keep probability linear in the magnitude's rank within its row
        if density <= 0:
            return torch.zeros_like(delta)
        u = uniform(key, ctx.offset, d.numel())
        ranks = _row_ranks(d.reshape(-1, ctx.row))
        table, table_work = _della_probs(ctx.row, density, epsilon, work)
        mask = u < table[ranks]  # both exact in fp32
        # DELLA (Deep et al. 2024, §3.1): each kept delta / its p_i, gathered only when used
        keep_p = table_work[torch.from_numpy(ranks)] if by_density else None
    masked = apply_mask(d, mask)  # = d * mask in the work dtype, bit for bit
    if by_density:  # a dropped element is a zero; p = 0 only where nothing is kept
        keep_p = torch.as_tensor(keep_p, dtype=work, device=masked.device)
        masked = masked / keep_p.clamp(min=torch.finfo(work).tiny)
    elif factor is not None:
        masked = masked * factor
    return masked.to(delta.dtype)


def _row_ranks(rows: torch.Tensor) -> np.ndarray:
    """Flat ascending rank of each |element| within its row, ties by position (a stable
    sort); numpy sorts 16-bit keys by radix, 10x faster than torch.sort."""
    n_rows, row = rows.shape
    order = np.argsort(select.magnitude_keys_np(rows).reshape(rows.shape), axis=1, kind="stable")
    index = np.int32 if rows.numel() < 2**31 else np.int64
    order = order.astype(index, copy=False)
    order += (np.arange(n_rows, dtype=index) * row)[:, None]
    ranks = np.empty(rows.numel(), index)
    ranks[order] = np.arange(row, dtype=index)  # the inverse permutation, row by row
    return ranks


def _della_keep(ctx: BlockContext, m: int, density: float, epsilon: float) -> tuple:
    """DELLA's keep rule for model ``m``'s block, as the compiled loops take it: (row length,
    stream key, first element index, keep probability by rank in fp32 (``_della_probs``);
    nothing is kept at density <= 0, as ``_sparsify`` keeps nothing there)."""
    if density <= 0:
        table = np.zeros(ctx.row, np.float32)
    else:
        table = _della_probs(ctx.row, density, epsilon, _work_dtype(ctx.work_dtype))[0]
    return ctx.row, stream_key(ctx.seed, ctx.tensor, m)[0], ctx.offset, table


@functools.lru_cache(maxsize=64)
def _della_probs(
    row: int, density: float, epsilon: float, work: torch.dtype
) -> tuple[np.ndarray, torch.Tensor]:
    """Keep probability of the element of each rank in a row of ``row``, by mergekit's
    ops in the work dtype: ranks 1..row, rescaled by the row's min and max rank to [0, 1],
    then density ± epsilon. Every row holds each rank once, so its min and max are those
    of ``arange``, and the table is exact for any row. (fp32 copy, work-dtype copy)."""
    ranks = (torch.arange(row).to(work) + 1).reshape(1, -1)
    lo_r, hi_r = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo_r) / (hi_r - lo_r)).clamp(0, 1)
    probs = ((density - epsilon) + rank_norm * 2 * epsilon).reshape(-1)
    return probs.float().numpy(), probs


def gta(xs, *, ctx, stats, state, base_index, weight, normalize, rescale=False, density=None,
        gamma=None, epsilon=None, int8_mask=False, rescale_mode="l1", sign_election="weighted",
        **shared):  # fmt: skip
    """Merge one block: xs in dtype D, the base at ``base_index``. ``lambda`` arrives in
    ``shared`` (a Python keyword). Returns dtype D."""
    lam = shared.pop("lambda", 1.0)
    assert not shared, shared
    base = xs[base_index]
    others = _others(xs, base_index)
    if not others:
        return base
    preset = GTA[ctx.method]
    l1 = rescale and rescale_mode == "l1"
    factors = stats[-1] if preset.sparsifier is not None and l1 and stats else {}
    weights = [weight[m] for m in others]
    unweighted = preset.consensus == "sum" and sign_election == "unweighted"
    fast = tensors.supports(base) and fast_combine_exact(base.dtype, len(others)) and not unweighted
    contiguous = all(x.is_contiguous() for x in xs)  # the loop takes the models' addresses
    if fast and contiguous and not _pruned(preset, others, density):
        # nothing pruned: one compiled pass, no deltas array
        return _combine_fused(base, [xs[m] for m in others], weights, preset.consensus, normalize, lam)
    deltas = base.new_empty((len(others), *base.shape))  # (n_models, *block)
    by_density = rescale and rescale_mode == "density"

    compiled = tensors.supports(base) and not by_density and preset.sparsifier in (
        "magnitude", "magnitude_outliers", "random", "della_magprune", None
    )  # fmt: skip

    def prune(lo: int, hi: int, state: dict = state) -> None:
        part = ctx if lo == 0 and hi == base.numel() else dataclasses.replace(ctx, offset=ctx.offset + lo)
        for row, m in enumerate(others):
            x, b, out = xs[m].reshape(-1)[lo:hi], base.reshape(-1)[lo:hi], deltas[row].view(-1)[lo:hi]
            if preset.sparsifier is None or not _prunes(density[m]):
                torch.sub(x, b, out=out)
            elif compiled:
                _prune_fused(x, b, out, m, part, stats, state, density[m], _get(gamma, m), _get(epsilon, m),
                             factors.get(m))  # fmt: skip
            else:
                out.copy_(_sparsify(x - b, m, part, stats, state, density[m], _get(gamma, m), _get(epsilon, m),
                                    factors.get(m), by_density))  # fmt: skip

    if preset.sparsifier in ("magnitude", "magnitude_outliers"):
        # ties at the threshold are kept in element order: each part starts from the ties
        # counted in the block's earlier parts
        part_states = _tie_offsets(xs, base, others, density, stats, ctx, state)
        parallel.run(lambda lo, hi: prune(lo, hi, part_states[lo]), base.numel())
    else:  # elementwise (keyed random masks), or whole rows for della
        parallel.run(prune, base.numel(), ctx.row if preset.sparsifier == "della_magprune" else 1)
    if fast:
        return _combine_fused(base, deltas, weights, preset.consensus, normalize, lam)
    return combine_eager(
        base, deltas, weights, preset.consensus, normalize, lam, weighted_election=not unweighted
    )


def _prune_fused(x, base, out, m, ctx, stats, state, density, gamma, epsilon, factor) -> None:
    """``_sparsify(x - base)`` into ``out`` by a compiled loop (bfloat16 or float32 on CPU;
    magnitude windows, DARE's random drop and DELLA's rank-based one), the same bits."""
    sparsifier = GTA[ctx.method].sparsifier
    scale = factor is not None
    factor = np.float32(factor.item() if scale else 1)
    xb, bb, ob = tensors.bits(x), tensors.bits(base), tensors.bits(out)
    if sparsifier == "random":
        fused.prune_random(xb, bb, ob, *_random_keep(ctx, m, density), scale, factor)
        return
    if sparsifier == "della_magprune":
        if density <= 0:
            out.zero_()
            return
        fused.prune_della(xb, bb, ob, *_della_keep(ctx, m, density, epsilon), scale, factor)
        return
    lo, hi = _rank_window(sparsifier, int(np.prod(ctx.shape)), density, gamma or 0.0)
    if hi <= lo:
        out.zero_()
        return
    b_lo, b_hi = _boundaries(stats, ctx, m)
    earliest_high = sparsifier == "magnitude"  # tie order of a stable sort: descending for top-k
    spans = [np.array(select.tie_span(b, lo, hi, earliest_high), np.int64) for b in (b_lo, b_hi)]
    key = tensors.KEY[x.dtype]
    seen = state.setdefault(("seen", m), {})
    counts = _seen_pair(seen, b_lo, b_hi)
    fused.prune_window(xb, bb, ob, key(b_lo.key), key(b_hi.key), *spans, counts, scale, factor)
    _store_seen(seen, b_lo, b_hi, counts)


def _seen_pair(seen: dict, lo: Boundary, hi: Boundary) -> np.ndarray:
    """The compiled loops' tie counters [lower key, upper key] from a ``seen`` dict (equal
    keys are counted once, as the upper)."""
    return np.array([0 if lo.key == hi.key else seen.get(lo.key, 0), seen.get(hi.key, 0)], np.int64)


def _store_seen(seen: dict, lo: Boundary, hi: Boundary, counts: np.ndarray) -> None:
    if lo.key != hi.key:
        seen[lo.key] = int(counts[0])
    seen[hi.key] = int(counts[1])


def _combine_fused(base, deltas, weights, consensus, normalize, lam) -> torch.Tensor:
    """``combine_eager`` by the compiled loop, bit for bit, in parts on every core, in D (the
    base's dtype). ``deltas``: the (n_models, *block) pruned deltas, or a list of the models'
    blocks when none is pruned (their deltas are then made inside the loop, a tile at a
    time; ``direct`` runs the same loop from the stored bytes)."""
    scalars = direct.gta_scalars(weights, tensors.CODE[base.dtype], consensus, normalize, lam)
    out = torch.empty_like(base, memory_format=torch.contiguous_format)
    are_deltas = not isinstance(deltas, list)
    models = tensors.addresses(list(deltas.reshape(len(weights), -1)) if are_deltas else deltas)
    direct.gta_combine(tensors.bits(base), models, tensors.bits(out), scalars, are_deltas)
    return out


def _tie_offsets(xs, base, others, density, stats, ctx, state) -> dict[int, dict]:
    """For each part ``parallel.run`` will cut this block into (by its first element): a
    ``state`` whose per-model ``seen`` counts the boundary ties before that part, from
    ``state`` (the earlier blocks). ``state`` moves on past the whole block."""
    boundaries = {m: _boundaries(stats, ctx, m) for m in others if _prunes(density[m])}

    def count(lo: int, hi: int) -> dict:
        counts = {}
        for m, (b_lo, b_hi) in boundaries.items():
            x, b = xs[m].reshape(-1)[lo:hi], base.reshape(-1)[lo:hi]
            if tensors.supports(b):
                pair = _seen_pair({}, b_lo, b_hi)
                fused.count_ties(
                    tensors.bits(x),
                    tensors.bits(b),
                    *(tensors.KEY[b.dtype](k.key) for k in (b_lo, b_hi)),
                    pair,
                )
                _store_seen(counts.setdefault(m, {}), b_lo, b_hi, pair)
                continue
            keys = magnitude_keys_np(x - b)
            counts[m] = {key: int(np.count_nonzero(keys == key)) for key in {b_lo.key, b_hi.key}}
        return lo, counts

    if len(parallel.ranges(base.numel())) == 1:
        return {0: state}
    offsets = {}
    for lo, counts in parallel.run(count, base.numel()):
        offsets[lo] = {("seen", m): dict(state.get(("seen", m), {})) for m in boundaries}
        for m, per_key in counts.items():
            seen = state.setdefault(("seen", m), {})
            for key, n in per_key.items():
                seen[key] = seen.get(key, 0) + n
    return offsets


def combine_eager(base, deltas, weights, consensus, normalize, lam, weighted_election=True):
    """mergekit's own op sequence on (n_models, *block) pruned deltas in dtype D. With
    ``weighted_election=False`` the signs are elected from the unweighted deltas, as in the
    TIES paper (Yadav et al. 2023, §3 step 2: γ = sgn(Σ τ̂_t)); the rest is unchanged."""
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)
    w = w.reshape((len(weights),) + (1,) * base.dim())
    unweighted = deltas
    deltas = deltas * w
    if consensus == "sum":  # mergekit's get_mask(method="sum"): a bool mask
        voters = deltas if weighted_election else unweighted
        elected = (voters.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        mask = voters.sign() == elected
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return base + mixed


def fast_combine_exact(dtype: torch.dtype, n_models: int) -> bool:
    """Whether ``fused.combine`` reproduces ``combine_eager``: it adds the models in order
    into fp32, as torch's ``sum(dim=0)`` does up to ``spec.FUSED_COMBINE_MODELS``."""
    return combines_in_torch_order(tensors.CODE.get(dtype), n_models)


for _name in GTA:
    magnitude = GTA[_name].sparsifier in ("magnitude", "magnitude_outliers")  # ties counted in order
    register(_name, fold=gta_fold, finish=gta_finish, reduce=gta_reduce, ordered=magnitude)(gta)
