"""Exact order statistics of |x| in bounded memory: radix select over the bit patterns.

Keys are the magnitudes' bit patterns as integers (sign bit cleared), which sort like the
magnitudes themselves. A pass histograms 16 bits of every key (65,536 counters, whatever
the tensor size); 16-bit dtypes need one pass, fp32 two. Ties are broken by flat index,
the way a *stable* torch sort would order them (mergekit's sorts are unstable, so it keeps
an arbitrary subset of tied elements): with ``earliest_high`` the earlier of two equal
magnitudes ranks higher (a stable descending sort, as for TIES' top-k), otherwise lower (a
stable ascending sort, as for breadcrumbs). A rank window ``[lo, hi)`` in ascending order
then selects the same elements for any chunking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import tensors

_SIGN_CLEAR = {torch.bfloat16: 0x7FFF, torch.float16: 0x7FFF, torch.float32: 0x7FFFFFFF}
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """Non-negative integer keys ordered like |x|: int16 for bf16/fp16, int32 for fp32."""
    return x.contiguous().view(_INT_VIEW[x.dtype]) & _SIGN_CLEAR[x.dtype]


def key_bits(dtype: torch.dtype) -> int:
    return 16 if dtype in (torch.bfloat16, torch.float16) else 32


@dataclass(frozen=True, slots=True)
class Boundary:
    """The element at ascending rank ``rank``: its key, and how many keys are below it
    (``below``) and equal to it (``equal``)."""

    key: int
    below: int
    equal: int


def histogram(keys: torch.Tensor, shift: int, prefix: int | None, acc: np.ndarray | None) -> np.ndarray:
    """Add the counts of ``(keys >> shift) & 0xFFFF`` to ``acc``; only keys whose bits above
    ``shift + 16`` equal ``prefix`` count when a prefix is given."""
    if prefix is not None:
        keys = keys[(keys >> (shift + 16)) == prefix]
    digits = keys >> shift if shift else keys if keys.dtype == torch.int16 else keys & 0xFFFF
    counts = _bincount(digits).cpu().numpy()
    if acc is None:
        return counts.astype(np.int64, copy=True)
    acc += counts  # in place: a fresh array per block would fragment the heap
    return acc


def _bincount(digits: torch.Tensor) -> torch.Tensor:
    """``torch.bincount`` over 65,536 bins on one thread: its multi-threaded CPU kernel keeps
    a histogram per thread and merges them, 25x slower per 64K-element block with 2 threads."""
    if digits.device.type != "cpu":
        return torch.bincount(digits, minlength=65536)
    return tensors.one_thread(torch.bincount, digits, None, 65536)


def locate(counts: np.ndarray, rank: int, below: int = 0) -> tuple[int, int, int]:
    """Bin holding ascending ``rank`` (0-based, counting ``below`` smaller keys first):
    (bin, keys below the bin, keys in the bin)."""
    cum = np.cumsum(counts) + below
    b = int(np.searchsorted(cum, rank, side="right"))
    start = int(cum[b - 1]) if b else below
    return b, start, int(counts[b])


def refine(high: tuple[Boundary, ...], ranks, lows: dict[int, np.ndarray]) -> tuple[Boundary, ...]:
    """Second pass of a 32-bit select: each first-pass boundary (its key = the high 16 bits)
    refined to the exact key from ``lows``, the low-16-bit histogram of its high bin."""
    refined = []
    for rank, b in zip(ranks, high):
        low, below, equal = locate(lows[b.key], rank, below=b.below)
        refined.append(Boundary((b.key << 16) | low, below, equal))
    return tuple(refined)


def tie_span(b: Boundary, rank_lo: int, rank_hi: int, earliest_high: bool) -> tuple[int, int]:
    """[first, last): positions p, among the elements with key ``b.key`` in flat order, whose
    ascending rank is in ``[rank_lo, rank_hi)``. A stable sort ranks tie p at ``below + p``,
    or at ``below + equal - 1 - p`` when the earliest of equal magnitudes ranks highest."""
    if earliest_high:
        top = b.below + b.equal - 1
        return top - rank_hi + 1, top - rank_lo + 1
    return rank_lo - b.below, rank_hi - b.below


def keep_window(x: torch.Tensor, lo: Boundary, hi: Boundary, rank_lo: int, rank_hi: int,
                seen: dict[int, int], earliest_high: bool) -> np.ndarray:  # fmt: skip
    """Boolean mask (numpy, flat) of the elements of ``x`` whose ascending magnitude rank is
    in ``[rank_lo, rank_hi)``.

    ``lo``/``hi`` are the boundaries at ``rank_lo`` and ``rank_hi - 1``; ``seen`` counts,
    per boundary key, the equal keys in earlier blocks (updated here: call in block order).
    numpy compares 16/32-bit integer keys several times faster than torch's bool ops.
    """
    keys = magnitude_keys_np(x)
    mask = (keys > lo.key) & (keys < hi.key)
    for b in {lo.key: lo, hi.key: hi}.values():
        tied = keys == b.key
        count = int(np.count_nonzero(tied))
        if not count:
            continue
        before = seen.get(b.key, 0)  # this block's ties are positions [before, before + count)
        first, last = tie_span(b, rank_lo, rank_hi, earliest_high)
        inside = max(0, min(last, before + count) - max(first, before))
        if 0 < inside < count:  # the window's edge falls in this block: find it
            # tie position in flat order (valid where tied); block-sized arrays only, so the
            # allocator reuses them block after block instead of fragmenting on odd sizes
            p = np.cumsum(tied, dtype=np.int64)
            p += before - 1
            tied &= (p >= first) & (p < last)
        if inside:
            mask |= tied
        seen[b.key] = before + count
    return mask


_NP_INT = {torch.bfloat16: np.int16, torch.float16: np.int16, torch.float32: np.int32}


def magnitude_keys_np(x: torch.Tensor) -> np.ndarray:
    """``magnitude_keys`` as a flat numpy array (int16 or int32)."""
    bits = x.detach().cpu().contiguous().reshape(-1).view(_INT_VIEW[x.dtype]).numpy()
    return bits & _NP_INT[x.dtype](_SIGN_CLEAR[x.dtype])


def apply_mask(x: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """``x * mask`` for a 0/1 mask, bit for bit (a dropped element becomes a zero with its
    sign, as ``x * 0.0`` gives for finite x), done on the integer bit patterns. A mask
    shorter than ``x`` applies to each of its consecutive runs of ``mask.size`` elements."""
    bits = x.detach().cpu().contiguous().reshape(-1, mask.size).view(_INT_VIEW[x.dtype]).numpy()
    np_int = _NP_INT[x.dtype]
    sign_only = np_int(np.iinfo(np_int).min)  # 0x8000 / 0x80000000
    keep = (-mask.astype(np_int)) | sign_only  # all ones where kept, the sign bit elsewhere
    out = torch.from_numpy(bits & keep).view(x.dtype).reshape(x.shape)
    return out.to(x.device)
