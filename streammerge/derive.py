"""Inputs computed on read: F8 dequantisation, LoRA deltas, vocabulary row maps.

A ``TensorRef`` whose ``derive`` is set does not hold its bytes on disk as declared:
the executor's reader thread calls ``read_derived`` to fill a chunk of its presented
dtype from the files it names. Each kind works on element ranges in blocks of at most
``DERIVE_BLOCK`` elements, so memory does not grow with the tensor; ``scratch_nbytes``
is what the plan budgets for it. Planning imports this module without torch (the
kernels import it lazily: this module belongs to the executor's torch room).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DERIVE_BLOCK = 1 << 16  # elements per derivation block
# Freed temporaries stay in the reader thread's malloc arena: measured, about 16 fp32
# words per block element.
SLACK = 16 * 4 * DERIVE_BLOCK


@dataclass(frozen=True, slots=True)
class Dequant:
    """F8 (E4M3/E5M2) weights dequantised to BF16: ``bf16(f8 * scale)``.

    ``scale`` is None (a plain cast, exact), a scalar, one value per row, or one per
    ``block`` of rows x columns (DeepSeek-V3's ``weight_scale_inv``)."""

    raw: object  # TensorRef of the F8 data
    scale: object | None  # TensorRef (F32/BF16) or None
    block: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Lora:
    """W + scale * B @ A (PEFT's merge: the delta is rounded to the adapter's dtype, then
    added to W in W's dtype). For an embedding, B @ A is transposed."""

    a: object  # TensorRef (r, in) or, for an embedding, (r, vocab)
    b: object  # TensorRef (out, r) or, for an embedding, (hidden, r)
    scale: float
    embedding: bool = False


@dataclass(frozen=True, slots=True)
class RowMap:
    """A token-indexed tensor re-laid out for the output vocabulary.

    Output row k is ``sources[rows[k]]``'s row ``src_rows[k]``, or, where ``rows[k]`` is
    -1, the mean of the ``(source, row)`` pairs in ``defaults[k]`` (zeros if none).
    Rows from ``n_real`` on are padding: the mean of the real rows. Math in ``dtype``."""

    sources: tuple  # TensorRef of each model's tensor
    rows: tuple[int, ...]  # source index per output row, -1 for a default row
    src_rows: tuple[int, ...]
    defaults: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]  # (row, ((source, row), ...))
    n_real: int
    dtype: str


def scratch_nbytes(ref) -> int:
    """Bytes the reader thread allocates while deriving one chunk of ``ref``."""
    d = ref.derive
    if d is None:
        return 0
    block = DERIVE_BLOCK
    if isinstance(d, Dequant):
        scale = d.scale.numel * 4 if d.scale is not None else 0
        cols = ref.shape[-1] if ref.shape else 1
        rows = max(block, cols)  # whole rows, at least one
        return SLACK + rows * (1 + 4 + 4 + 2) + 2 * scale + 8 * cols
    if isinstance(d, Lora):
        # A whole in its dtype and fp32, a block of B rows, the fp32 product and W block.
        return SLACK + d.a.nbytes + d.a.numel * 4 + d.b.nbytes + d.b.numel * 4 + block * 4 * 4
    if isinstance(d, RowMap):
        from .header import ITEMSIZE

        hidden = math.prod(ref.shape[1:])
        item = max(ITEMSIZE[s.dtype] for s in d.sources)
        work = ITEMSIZE[d.dtype]
        rows = max(block, hidden)  # a run of rows, or one row wider than a block
        return SLACK + rows * (item + 2 * work) + hidden * (item + 2 * work + 8 * 2)
    raise AssertionError(d)


def read_derived(reader, ref, start: int, stop: int, out) -> None:
    """Fill ``out`` (a uint8 numpy view of ``(stop - start) * itemsize`` bytes in
    ``ref.dtype``) with elements ``[start, stop)`` of the derived tensor ``ref``."""
    import torch

    from .methods.tensors import DTYPES

    dst = torch.from_numpy(out).view(DTYPES[ref.dtype])
    d = ref.derive
    if isinstance(d, Dequant):
        _dequant(reader, d, ref.shape, start, stop, dst)
    elif isinstance(d, Lora):
        _lora(reader, ref, d, start, stop, dst)
    elif isinstance(d, RowMap):
        _rowmap(reader, ref, d, start, stop, dst)
    else:
        raise AssertionError(d)


def _read(reader, ref, start: int, stop: int):
    """Elements ``[start, stop)`` of a plain on-disk ref as a fresh torch tensor."""
    import numpy as np
    import torch

    from .header import ITEMSIZE
    from .methods.tensors import DTYPES

    buf = np.empty((stop - start) * ITEMSIZE[ref.dtype], np.uint8)
    reader.read(ref, start, stop, memoryview(buf))
    return torch.from_numpy(buf).view(DTYPES[ref.dtype])


def _whole(reader, ref):
    return _read(reader, ref, 0, ref.numel).reshape(ref.shape)


def _dequant(reader, d: Dequant, shape, start, stop, dst) -> None:
    """Whole rows at a time (a chunk's partial first/last row is read whole, written in
    part), so a per-row or block scale is a broadcast, not a per-element gather."""
    import torch

    cols = shape[-1] if len(shape) >= 2 else max(math.prod(shape), 1)
    n_rows = max(math.prod(shape) // cols, 1)
    scale = _whole(reader, d.scale).float() if d.scale is not None else None
    col_block = torch.arange(cols) // d.block[1] if d.block is not None else None
    rows_per = max(1, DERIVE_BLOCK // cols)
    first, last = start // cols, min(n_rows, -(-stop // cols))
    for r0 in range(first, last, rows_per):
        r1 = min(last, r0 + rows_per)
        x = _read(reader, d.raw, r0 * cols, r1 * cols).float().reshape(r1 - r0, cols)
        if scale is None:
            pass
        elif scale.numel() == 1:
            x *= scale.reshape(())
        elif d.block is None:  # one scale per row
            x *= scale.reshape(-1, 1)[r0:r1]
        else:
            band = torch.arange(r0, r1) // d.block[0]
            x *= scale[band][:, col_block]  # (rows, cols)
        lo, hi = max(start, r0 * cols), min(stop, r1 * cols)
        dst[lo - start : hi - start] = x.reshape(-1)[lo - r0 * cols : hi - r0 * cols]


def _lora(reader, ref, d: Lora, start, stop, dst) -> None:

    from .methods.tensors import DTYPES

    cols = ref.shape[-1]
    lora_dtype = DTYPES[d.b.dtype]
    a = _whole(reader, d.a).float()
    b = _whole(reader, d.b).float()
    if d.embedding:  # delta = (B @ A).T: row k is A[:, k] @ B.T
        left, right = a.T, b.T
    else:
        left, right = b, a
    rows_per = max(1, DERIVE_BLOCK // cols)
    first, last = start // cols, -(-stop // cols)
    for r0 in range(first, last, rows_per):
        r1 = min(last, r0 + rows_per)
        delta = ((left[r0:r1] @ right) * d.scale).to(lora_dtype).reshape(-1)
        lo, hi = max(start, r0 * cols), min(stop, r1 * cols)
        w = dst[lo - start : hi - start]
        _read_plain_into(reader, ref, lo, hi, w)
        piece = delta[lo - r0 * cols : hi - r0 * cols]
        w.copy_(w.float() + piece.float())


def _read_plain_into(reader, ref, start, stop, dst) -> None:
    """Read the on-disk bytes of ``ref`` (ignoring its derive) straight into ``dst``."""
    import torch

    from .checkpoint import TensorRef

    plain = TensorRef(ref.path, ref.offset, ref.dtype, ref.shape)
    reader.read(plain, start, stop, memoryview(dst.view(torch.uint8).numpy()))


def _rowmap(reader, ref, d: RowMap, start, stop, dst) -> None:
    from .methods.tensors import DTYPES

    hidden = math.prod(ref.shape[1:])
    work = DTYPES[d.dtype]
    defaults = dict(d.defaults)
    pad_mean = None
    k, last = start // hidden, -(-stop // hidden)
    while k < last:
        # A run of output rows that are consecutive rows of one source is one read.
        n = 1
        if k < d.n_real and d.rows[k] >= 0:
            while (
                k + n < min(last, d.n_real)
                and (n + 1) * hidden <= DERIVE_BLOCK
                and d.rows[k + n] == d.rows[k]
                and d.src_rows[k + n] == d.src_rows[k] + n
            ):
                n += 1
            r = d.src_rows[k]
            rows = _read(reader, d.sources[d.rows[k]], r * hidden, (r + n) * hidden).to(work)
        elif k >= d.n_real:
            if pad_mean is None:
                pad_mean = _real_mean(reader, d, defaults, hidden, work)
            rows = pad_mean
        else:
            rows = _default_row(reader, d, defaults, k, hidden, work)
        lo, hi = max(start, k * hidden), min(stop, (k + n) * hidden)
        dst[lo - start : hi - start] = rows[lo - k * hidden : hi - k * hidden].to(dst.dtype)
        k += n


def _default_row(reader, d: RowMap, defaults, k: int, hidden: int, work):
    import torch

    pairs = defaults.get(k, ())
    acc = torch.zeros(hidden, dtype=work)
    for i, r in pairs:  # mergekit adds one model at a time in D, then divides
        acc = acc + _read(reader, d.sources[i], r * hidden, (r + 1) * hidden).to(work)
    return acc / len(pairs) if pairs else acc


def _real_mean(reader, d: RowMap, defaults, hidden: int, work):
    """The mean of the real rows (mergekit: ``torch.mean`` over them in D), summed row by
    row in float64 so memory stays one row; rounding may differ from torch's by 1 ulp."""
    import torch

    acc = torch.zeros(hidden, dtype=torch.float64)
    for k in range(d.n_real):
        if d.rows[k] >= 0:
            src, r = d.sources[d.rows[k]], d.src_rows[k]
            acc += _read(reader, src, r * hidden, (r + 1) * hidden).to(work).double()
        else:
            acc += _default_row(reader, d, defaults, k, hidden, work).double()
    return (acc / max(d.n_real, 1)).to(work)
