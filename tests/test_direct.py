"""Kernels that merge straight from the read bytes (``Kernel.direct``) give the bits of the
usual path: each input converted to D, combined, the result converted to the output dtype.

linear and the gta family with nothing pruned (task_arithmetic; ties and dare at density 1)
run their compiled loop on the inputs as stored and write the output dtype, model_stock
where inputs, D and output are one dtype; every other case must decline (write nothing)
and leave the block to the usual path. Special values
(NaN, infinities, signed zeros, subnormals, bfloat16 rounding ties) sit at the start and in
the last, partial tile and vector of each block.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import streammerge.execute as ex

BF16, F32 = torch.bfloat16, torch.float32
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39, 3e38, 1.00390625, 1.01171875]

# (stored, D, output): the first three can run direct, the rest must decline
DTYPES = [(BF16, BF16, BF16), (BF16, F32, BF16), (F32, F32, F32), (BF16, F32, F32), (F32, BF16, BF16),
          (BF16, BF16, F32), (F32, F32, BF16)]  # fmt: skip
DIRECT = {(BF16, BF16, BF16), (BF16, F32, BF16), (F32, F32, F32)}
SAME = {(BF16, BF16, BF16), (F32, F32, F32)}  # one dtype throughout

# (method, parameters, the dtype triples where it runs direct)
METHODS = [
    ("linear", {"weight": [0.4, 0.35, 0.25]}, DIRECT),
    ("linear", {"weight": [1.0, -0.3, 0.7], "normalize": False}, DIRECT),
    ("task_arithmetic", {"weight": [1.0, 0.6, None], "lambda": 0.8}, DIRECT),
    ("task_arithmetic", {"weight": [0.3, 0.3, None], "normalize": True}, DIRECT),
    ("ties", {"weight": [1.0, 0.5, None], "density": [1.0, 1.0, None]}, DIRECT),
    ("dare_linear", {"weight": [0.7, 0.5, None], "density": [1.0, 1.0, None]}, DIRECT),
    ("ties", {"weight": [1.0, 0.5, None], "density": [0.5, 1.0, None]}, set()),  # prunes: declines
    ("model_stock", {}, SAME),  # its loop rounds to the inputs' dtype
]


def _inputs(n: int, stored: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g)
    xs = [
        base + torch.randn(n, generator=g) * 10 ** torch.empty(n).uniform_(-6, 1, generator=g)
        for _ in range(2)
    ]
    for k, x in enumerate([*xs, base]):
        for at in (0, max(0, n - len(SPECIAL) - 3)):
            x[at : at + len(SPECIAL)] = torch.tensor(SPECIAL).roll(k)[: n - at]
    return [x.to(stored) for x in [*xs, base]]


@pytest.mark.parametrize(("stored", "work", "out"), DTYPES)
@pytest.mark.parametrize(("method", "params", "can"), METHODS)
@pytest.mark.parametrize("n", [1, 13, 2049, 70001])
def test_direct_gives_the_bits_of_convert_combine_convert(
    monkeypatch, stored, work, out, method, params, can, n
):
    xs = _inputs(n, stored)
    base_index = None if method == "linear" else 2
    kwargs = dict(
        params, base_index=base_index, dtype=work, out_dtype=out, chunk_elems=1 << 15, block_elems=1 << 14
    )
    real = ex.get_kernel
    ran: list[bool] = []

    def spied(name):
        k = real(name)

        @functools.wraps(k.direct)  # the executor passes what its signature asks for
        def direct(*a, **kw):
            ran.append(k.direct(*a, **kw))
            return ran[-1]

        return dataclasses.replace(k, direct=direct)

    monkeypatch.setattr(ex, "get_kernel", spied)
    got = ex.merge_tensors(method, xs, **kwargs)
    assert ran and all(r == ((stored, work, out) in can) for r in ran), ran
    monkeypatch.setattr(ex, "get_kernel", lambda name: dataclasses.replace(real(name), direct=None))
    want = ex.merge_tensors(method, xs, **kwargs)
    assert got.dtype == want.dtype == out
    bits = torch.int16 if out == BF16 else torch.int32
    assert torch.equal(got.view(bits), want.view(bits))


@pytest.mark.parametrize(("method", "params"), [
    ("linear", {"weight": [0.4, 0.35, 0.25], "base_index": None}),
    ("task_arithmetic", {"weight": [1.0, 0.6, None], "normalize": False, "base_index": 2}),
    ("ram", {"base_index": 2}),
    ("nearswap", {"base_index": 1, "t": 0.5}),
])  # fmt: skip
def test_loops_taking_addresses_accept_strided_blocks(method, params):
    """A strided block (a transposed view) gives the same bits as a dense one: the loops
    that take models by address leave it to the eager ops, and a compiled loop's output is
    allocated contiguous (``empty_like`` keeps the input's strides: the loop wrote into a
    contiguous copy and the result was never filled). Finite values: torch's eager ops give
    NaN other payloads on strided tensors. The executor's blocks are always contiguous."""
    from streammerge.methods import BlockContext

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(96, 70, generator=g).to(BF16).t() for _ in range(2 if method == "nearswap" else 3)]
    kernel = ex.get_kernel(method)
    ctx = BlockContext(method, "t", (70, 96), 0, 0, BF16)
    wanted = {
        k: v for k, v in {"ctx": ctx, "stats": [], "state": {}}.items() if k in ex._wants(kernel.combine)
    }
    strided = kernel.combine(xs, **wanted, **params)
    dense = kernel.combine([x.contiguous() for x in xs], **wanted, **params)
    assert torch.equal(strided.contiguous().view(torch.int16), dense.contiguous().view(torch.int16))


SPANS = [
    ("nuslerp", {"weight": [0.4, 0.6, None]}),  # flattened
    ("nuslerp", {"weight": [0.4, 0.6, None], "nuslerp_flatten": False, "nuslerp_row_wise": True}),  # columns
    ("model_stock", {}),
]  # per-row nuslerp has no statistics passes


@pytest.mark.parametrize("dtype", [BF16, F32, torch.float16])  # compiled loops; float16: the eager ops
@pytest.mark.parametrize(("method", "params"), SPANS)
@pytest.mark.parametrize("base", [True, False])
def test_folding_a_span_is_folding_its_blocks_one_by_one(monkeypatch, dtype, method, params, base):
    """Kernels registered with ``spans`` take a run of statistics blocks in one call: the
    same sums, so the same bits, as one call per block."""
    if method == "model_stock" and not base:
        pytest.skip("model_stock needs a base")
    g = torch.Generator().manual_seed(7)
    shape = (600, 2200)  # 1.3M elements: 64K/128K statistics blocks, runs of several, a partial last one
    xs = [torch.randn(shape, generator=g).to(dtype) for _ in range(3 if base else 2)]
    if "weight" in params:
        params = dict(params, weight=params["weight"][: len(xs)])
    kwargs = dict(params, base_index=len(xs) - 1 if base else None, block_elems=1 << 18)
    real = ex.get_kernel
    spanned: list[bool] = []

    def spied(name):
        k = real(name)

        @functools.wraps(k.fold)
        def fold(i, acc, xs, **kw):
            spanned.append(kw.get("span") is not None and xs[0].numel() > kw["span"])
            return k.fold(i, acc, xs, **kw)

        return dataclasses.replace(k, fold=fold)

    monkeypatch.setattr(ex, "get_kernel", spied)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # runs of several blocks, as on 2 cores
    spans = ex.merge_tensors(method, xs, **kwargs)
    assert any(spanned)
    monkeypatch.setattr(ex, "get_kernel", lambda name: dataclasses.replace(real(name), spans=False))
    one_by_one = ex.merge_tensors(method, xs, **kwargs)
    bits = torch.int32 if dtype == F32 else torch.int16
    assert torch.equal(spans.view(bits), one_by_one.view(bits))
