"""Merges straight from the read bytes (``direct.loop``, no torch) give the bits of the
usual path: each input converted to D, combined, the result converted to the output dtype.

linear and the gta family with nothing pruned and no statistics pass (task_arithmetic; dare
at density 1 without rescaling) run their compiled loop on the inputs as stored and write
the output dtype, model_stock its statistics and combine where inputs, D and output are one
dtype; every other job must get no loops and run the kernels. Special values (NaN,
infinities, signed zeros, subnormals, bfloat16 rounding ties) sit at the start and in the
last, partial tile and vector of each block.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys

import numpy as np
import pytest
import torch

import streammerge.execute as ex
from streammerge.methods import direct, parallel

BF16, F32 = torch.bfloat16, torch.float32
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39, 3e38, 1.00390625, 1.01171875]

# (stored, D, output): the first three can run direct, the rest must decline
DTYPES = [(BF16, BF16, BF16), (BF16, F32, BF16), (F32, F32, F32), (BF16, F32, F32), (F32, BF16, BF16),
          (BF16, BF16, F32), (F32, F32, BF16)]  # fmt: skip
DIRECT = {(BF16, BF16, BF16), (BF16, F32, BF16), (F32, F32, F32)}
SAME = {(BF16, BF16, BF16), (F32, F32, F32)}  # one dtype throughout
CODES = {BF16: "BF16", F32: "F32"}

# (method, parameters, the dtype triples where it runs direct)
METHODS = [
    ("linear", {"weight": [0.4, 0.35, 0.25]}, DIRECT),
    ("linear", {"weight": [1.0, -0.3, 0.7], "normalize": False}, DIRECT),
    ("task_arithmetic", {"weight": [1.0, 0.6, None], "lambda": 0.8}, DIRECT),
    ("task_arithmetic", {"weight": [0.3, 0.3, None], "normalize": True}, DIRECT),
    # nothing pruned but statistics passes planned (ties' threshold, dare's L1 rescale): no loop
    ("ties", {"weight": [1.0, 0.5, None], "density": [1.0, 1.0, None]}, set()),
    ("dare_linear", {"weight": [0.7, 0.5, None], "density": [1.0, 1.0, None]}, set()),
    ("dare_linear", {"weight": [0.7, 0.5, None], "density": [1.0, 1.0, None], "rescale": False}, DIRECT),
    ("ties", {"weight": [1.0, 0.5, None], "density": [0.5, 1.0, None]}, set()),  # prunes: declines
    ("model_stock", {}, SAME),  # its loop rounds to the inputs' dtype
]
STOCK = [("model_stock", {}, SAME)]  # more fine-tunes: 3 pairs (torch sums them in order), 6 (it does not)


def _inputs(n: int, stored: torch.dtype, fine_tunes: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g)
    xs = [
        base + torch.randn(n, generator=g) * 10 ** torch.empty(n).uniform_(-6, 1, generator=g)
        for _ in range(fine_tunes)
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
    real = direct.loop
    made: list[bool] = []  # per job, whether loops were made

    def loop(job):
        made.append(real(job) is not None)
        return real(job)

    monkeypatch.setattr(direct, "loop", loop)
    got = ex.merge_tensors(method, xs, **kwargs)
    assert made == [(stored, work, out) in can]
    monkeypatch.setattr(direct, "loop", lambda job: None)
    want = ex.merge_tensors(method, xs, **kwargs)
    assert got.dtype == want.dtype == out
    bits = torch.int16 if out == BF16 else torch.int32
    assert torch.equal(got.view(bits), want.view(bits))


def _weights(seed: int, n: int) -> list[float]:
    """Weights as configs have them (short decimals) and as they never are (any double, some
    on bfloat16 rounding ties, sums near zero)."""
    rng = np.random.default_rng(seed)
    kind = seed % 4
    if kind == 0:
        return [round(float(w), 2) for w in rng.uniform(-1, 1, n)]
    if kind == 1:
        return [float(w) for w in rng.standard_normal(n) * 10.0 ** rng.integers(-6, 6, n)]
    if kind == 2:  # float32 values halfway between two bfloat16s, nudged by less than a float32 ulp
        ties = (rng.integers(0x3C00, 0x4100, n).astype(np.uint32) << 16) | 0x8000
        return [float(t) * (1 + float(e)) for t, e in zip(ties.view(np.float32), rng.uniform(-1e-9, 1e-9, n))]
    w = [float(v) for v in rng.uniform(0.1, 1, n)]
    return [*w[:-1], -sum(w[:-1]) + float(rng.uniform(-1e-7, 1e-7))]


@pytest.mark.parametrize("n", range(1, 9))
def test_scalars_are_rounded_and_summed_as_torch_does(n):
    """The loops' scalars, made without torch, are the kernels' torch scalars bit for bit:
    linear's float32 weight sum (in order up to ``IN_ORDER_SUM``, torch's own beyond), gta's
    weights in D and its divisor (float32 cumsum rounded to D, 1 under 1e-8 or for "sum")."""
    for seed in range(400):
        weights = _weights(seed, n)
        c = torch.tensor(weights, dtype=torch.float32)
        divisor = direct.linear_divisor(c.numpy(), True)
        assert np.float32(divisor).view(np.uint32) == c.sum().view(torch.int32).item() & 0xFFFFFFFF
        assert direct.linear_divisor(c.numpy(), False) is None
        for work in (BF16, F32):
            w = torch.tensor(weights, dtype=work)
            total = w.float().cumsum(0)[-1:].to(work).float().item()
            for consensus in (None, "sum"):
                want = 1.0 if consensus == "sum" or abs(total) < 1e-8 else total
                got_w, (_, _, got_divisor, _), _ = direct.gta_scalars(
                    weights, CODES[work], consensus, True, 1.0
                )
                assert np.array_equal(got_w.view(np.uint32), w.float().numpy().view(np.uint32)), (
                    seed,
                    weights,
                )
                assert np.float32(want).view(np.uint32) == got_divisor.view(np.uint32), (seed, weights)


@pytest.mark.parametrize(("fine_tunes", "loops"), [(3, True), (4, False)])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_model_stock_loops_take_as_many_pairs_as_torch_sums_in_order(monkeypatch, fine_tunes, loops, dtype):
    xs = _inputs(70001, dtype, fine_tunes)
    kwargs = dict(base_index=fine_tunes, chunk_elems=1 << 15, block_elems=1 << 14)
    assert (direct.loop(_job("model_stock", xs, fine_tunes)) is not None) == loops
    got = ex.merge_tensors("model_stock", xs, **kwargs)
    monkeypatch.setattr(direct, "loop", lambda job: None)
    want = ex.merge_tensors("model_stock", xs, **kwargs)
    bits = torch.int16 if dtype == BF16 else torch.int32
    assert torch.equal(got.view(bits), want.view(bits))


def _job(method: str, xs: list[torch.Tensor], base_index: int | None):
    from streammerge.checkpoint import TensorRef
    from streammerge.plan import Job

    code = CODES[xs[0].dtype]
    refs = tuple(TensorRef("<memory>", 0, code, tuple(xs[0].shape)) for _ in xs)
    params = tuple({} for _ in xs)
    return Job("t", method, refs, base_index, params, {}, code, code, tuple(xs[0].shape), 0, 0)


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_model_stock_t_is_made_as_torch_makes_it(count, dtype):
    """``direct.stock_t`` (numpy float32 ops rounded to D) against the kernel's torch ops:
    cosines anywhere in [-1, 1], near the singular -1/(N-1), near 0, clamped, and norms
    over twenty decades."""
    from streammerge.methods.model_stock import _finish_t, _pairs

    rng = np.random.default_rng(count)
    pairs = _pairs(count)
    for trial in range(2000):
        sq = [float(v) for v in rng.uniform(0.1, 10, count) * 10.0 ** rng.integers(-10, 10)]
        centre = (0.0, -1.0 / (count - 1), 0.0, 1.0)[trial % 4]
        spread = (1.0, 1e-3, 1e-3, 1e-2)[trial % 4]
        dots = [
            float(rng.uniform(centre - spread, centre + spread)) * (sq[i] * sq[j]) ** 0.5 for i, j in pairs
        ]
        t = _finish_t(dict(zip(pairs, dots)), sq, count, dtype, pairs)
        want = np.array([t.float().item(), (1 - t).float().item()], np.float32)
        got = np.array(direct.stock_t(dots + sq, count, CODES[dtype]), np.float32)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (trial, sq, dots)


@pytest.mark.parametrize("scale", [0.5, 0.3, -1.7, 1e-3, 3.1e38, 1e-45, float("inf")])
def test_passthrough_scale_is_torch_mul(scale):
    """``fused.scaled`` (a scaled copy with no torch) is ``torch.mul`` by a Python float:
    every bfloat16 bit pattern, and float32 over 30 decades with the specials."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(BF16)
    g = torch.Generator().manual_seed(1)
    f32 = torch.randn(1 << 16, generator=g) * 10 ** torch.empty(1 << 16).uniform_(-40, 38, generator=g)
    f32[: len(SPECIAL)] = torch.tensor(SPECIAL)
    for x in (every, f32):
        out = torch.empty_like(x)
        bits = direct.BITS[CODES[x.dtype]]
        direct.scale_into(x.numpy().view(bits) if x.dtype == F32 else x.view(torch.int16).numpy().view(bits),
                          scale, out.view(torch.int16 if x.dtype == BF16 else torch.int32).numpy().view(bits))  # fmt: skip
        expect = torch.mul(x, scale)
        same = out.view(torch.uint8) == expect.view(torch.uint8)
        assert bool(same.all()), (x.dtype, scale, x[~same.view(len(x), -1).all(1)][:5])


def _config(method: str, tiny) -> str:
    """A bfloat16 merge of the tiny models by ``method`` (passthrough: ft1 scaled by 0.5)."""
    if method == "passthrough":
        return (
            f"merge_method: passthrough\nmodels:\n  - model: {tiny['ft1']}\n    parameters: {{scale: 0.5}}\n"
        )
    each, shared = ("{}", "{t: 0.3}") if method == "slerp" else ("{weight: 0.5}", "{}")
    each = "{}" if method == "model_stock" else each
    models = [tiny["ft1"], tiny["ft2"]] if method == "model_stock" else [tiny["ft1"], tiny["base"]]
    return (
        f"merge_method: {method}\nbase_model: {tiny['base']}\nmodels:\n"
        + "".join(f"  - model: {m}\n    parameters: {each}\n" for m in models)
        + f"parameters: {shared}\ndtype: bfloat16\n"
    )


def test_a_merge_of_loops_and_copies_never_imports_torch(tiny, tmp_path):
    """linear, task_arithmetic, model_stock and a scaled passthrough over bfloat16 (and the
    copied non-float buffers) run with no torch in the process; a method with no loop here
    brings it in."""
    probe = (
        "import sys; from streammerge.execute import merge; merge(sys.argv[1], sys.argv[2]);"
        "print('torch' in sys.modules)"
    )
    for method, loads in (
        ("linear", False),
        ("task_arithmetic", False),
        ("model_stock", False),
        ("passthrough", False),
        ("slerp", True),
    ):
        cfg = tmp_path / f"{method}.yml"
        cfg.write_text(_config(method, tiny))
        r = subprocess.run(
            [sys.executable, "-c", probe, str(cfg), str(tmp_path / method)], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[-1] == str(loads), (method, r.stdout)


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
    monkeypatch.setattr(
        direct, "loop", lambda job: None
    )  # the kernel's folds (the loops' are compared above)
    monkeypatch.setattr(parallel, "_count", 2)  # runs of several blocks, as on 2 cores
    spans = ex.merge_tensors(method, xs, **kwargs)
    assert any(spanned)
    monkeypatch.setattr(ex, "get_kernel", lambda name: dataclasses.replace(real(name), spans=False))
    one_by_one = ex.merge_tensors(method, xs, **kwargs)
    bits = torch.int32 if dtype == F32 else torch.int16
    assert torch.equal(spans.view(bits), one_by_one.view(bits))
