"""arcee_fusion, linear, nearswap, ram, ramplus_tl and passthrough's fast paths give the eager ops' bits.

linear's and nearswap's compiled loops against its eager torch ops (special values, NaN payloads
included); arcee_fusion streamed in small chunks and blocks (its first pass keeps the rows'
KL sums, folded on both cores; compiled histogram and combine) against the whole-tensor
eager computation with sorted quantiles; ram's and ramplus_tl's loops (and the statistics
pass's counts) against mergekit's ops, for every count of models changing an element;
passthrough's scale written straight into the output buffer against ``x * scale``, and its
plan without kernel scratch or kernel modules.
"""

from __future__ import annotations

import pytest
import torch

from streammerge.execute import merge_tensors
from streammerge.methods import arcee_fusion as af
from streammerge.methods import linear as lin
from streammerge.methods import nearswap as ns
from streammerge.methods import ram
from streammerge.plan import RUNTIME_NBYTES, compute_scratch, copies, make_plan

SPECIAL = [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-30, -1e-30, 3e38, 1e-40, 5.0]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [0.001, 0.0, 0.5, 1e-7, 3.3])
def test_nearswap_loop_is_the_eager_ops(dtype, t):
    g = torch.Generator().manual_seed(1)
    n = 1 << 14
    b = torch.randn(n, generator=g)
    x = b + torch.randn(n, generator=g) * torch.logspace(-9, 1, n)[torch.randperm(n, generator=g)]
    x[:20] = b[:20]
    x[20:30], b[40:50] = torch.tensor(SPECIAL), torch.tensor(SPECIAL)
    b, x = b.to(dtype), x.to(dtype)
    got = ns.nearswap([b, x], base_index=0, t=t)
    assert torch.equal(_bits(got), _bits(ns._eager(b, x, t)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 13, 2049, 1 << 14])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(
    "weight", [[0.5], [0.7, -0.2], [0.4, 0.4, 0.2], [1.0, -0.3, 0.7, 0.01], [0.3, 0.1, -0.2, 0.5, 0.25]]
)  # one pass per count up to four, tiles beyond
def test_linear_loop_is_the_eager_ops(dtype, n, normalize, weight):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, generator=g) * 3 for _ in weight]
    for i, x in enumerate(xs):  # specials against each other: NaN, inf - inf, -0 + -0
        x[: min(n, len(SPECIAL))] = torch.tensor(SPECIAL[i:] + SPECIAL[:i])[: min(n, len(SPECIAL))]
    xs = [x.to(dtype) for x in xs]
    got = lin.linear(xs, weight=weight, normalize=normalize)
    assert torch.equal(_bits(got), _bits(lin._eager(xs, weight, normalize)))


def test_linear_zero_weight_sum_keeps_torchs_inf_and_nan():
    xs = [torch.tensor([1.0, -1.0, 0.0], dtype=torch.bfloat16)] * 2
    got = lin.linear(xs, weight=[1.0, -1.0], normalize=True)
    assert torch.equal(_bits(got), _bits(lin._eager(xs, [1.0, -1.0], True)))


def _arcee_eager(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The whole tensor at once, quantiles from a sort (mergekit for <= 1e6 elements)."""
    imp = af.importance(base, x, base.shape[-1])
    ranked = torch.sort(imp).values
    q1, median, q3 = (ranked[r] for r in af.quantile_ranks(imp.numel()))
    mask = (imp >= median + 1.5 * (q3 - q1)).float().reshape(base.shape)
    return (base + (x - base) * mask).to(base.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(96, 700), (5000,)])
def test_arcee_fusion_streamed_is_the_whole_tensor_eager(dtype, shape):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 4
    x = (base.float() + noise).to(dtype)
    want = _arcee_eager(base, x)
    assert not torch.equal(want, x) and not torch.equal(want, base)  # the mask keeps some changes
    for chunk, block in ((None, 1 << 16), (2800, 1 << 10)):
        got = merge_tensors("arcee_fusion", [x, base], base_index=1, chunk_elems=chunk, block_elems=block)
        assert torch.equal(_bits(got), _bits(want)), (chunk, block)


def test_passthrough_scales_straight_into_the_output():
    x = torch.tensor([1.0, -3.0, 1e-40, -1e-39, 3e38, float("inf"), 0.1] * 40000).to(torch.bfloat16)
    for scale in (0.5, 0.3, -2.0, 1.0):
        got = merge_tensors("passthrough", [x], scale=[scale], chunk_elems=1 << 16)
        assert torch.equal(_bits(got), _bits(x * scale)), scale


def test_passthrough_plan_has_no_kernel_scratch(tiny, tmp_path):
    cfg = tmp_path / "p.yml"
    cfg.write_text(
        f"merge_method: passthrough\nmodels:\n  - model: {tiny['ft1']}\n    parameters: {{scale: 0.5}}\n"
    )
    plan = make_plan(cfg, max_memory=64 << 20)
    assert all(copies(j) and compute_scratch(j, plan.estimate.block_elems) == 0 for j in plan.jobs)
    e = plan.estimate
    assert e.scratch_nbytes == 0
    # bfloat16 scaled by a compiled loop (torch's multiply, rounded to the output dtype): no torch
    assert not e.torch and e.peak_rss_nbytes == RUNTIME_NBYTES + e.peak_nbytes  # no block temporaries
    # at scale 1 a bit copy
    cfg.write_text(cfg.read_text().replace("scale: 0.5", "scale: 1.0"))
    e = make_plan(cfg, max_memory=64 << 20).estimate
    assert not e.torch and e.peak_rss_nbytes == RUNTIME_NBYTES + e.peak_nbytes
    # a dtype change needs the kernel: x.to(D) * scale, rounded to the output dtype
    cfg.write_text(
        cfg.read_text().replace("scale: 1.0", "scale: 0.5") + "dtype: float32\nout_dtype: bfloat16\n"
    )
    e = make_plan(cfg, max_memory=64 << 20).estimate
    assert e.torch and e.scratch_nbytes > 0


def _ram_inputs(n: int, models: int, dtype: torch.dtype, base_index: int) -> list[torch.Tensor]:
    """A base and fine-tunes changing each element by 1e-7..1 or not at all (so every
    count of models over ε occurs), specials against each other and against the base."""
    g = torch.Generator().manual_seed(5)
    b = torch.randn(n, generator=g)
    xs = []
    for i in range(models):
        x = b + torch.randn(n, generator=g) * torch.logspace(-7, 0, n)[torch.randperm(n, generator=g)]
        same = torch.rand(n, generator=g) < 0.3
        x[same] = b[same]
        if n >= 2 * len(SPECIAL):
            x[: len(SPECIAL)] = torch.tensor(SPECIAL[i:] + SPECIAL[:i])
        xs.append(x)
    if n >= 2 * len(SPECIAL):
        b[len(SPECIAL) : 2 * len(SPECIAL)] = torch.tensor(SPECIAL)
        b[-1] = -0.0  # every change a tiny negative: -0 terms, summed from +0
        for x in xs:
            x[-1] = -1e-30
    xs = [x.to(dtype) for x in xs]
    xs.insert(base_index, b.to(dtype))
    return xs


def _same(got: torch.Tensor, want: torch.Tensor, inputs: torch.dtype) -> bool:
    """Equal bits; NaNs only as NaNs for float32 inputs (the NaN payload a float32 sum of two
    NaNs keeps is LLVM's choice); with bfloat16 inputs every NaN is 0xFFFF, in a float32
    result too."""
    if got.dtype != want.dtype:
        return False
    if inputs == torch.float32:
        nan = want.isnan()
        return torch.equal(got.isnan(), nan) and torch.equal(_bits(got)[~nan], _bits(want)[~nan])
    return torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("models", [1, 2, 3, 4, 6, 8])  # float32 sums 5+ out of order: eager there
@pytest.mark.parametrize("base_index", [0, 1])
@pytest.mark.parametrize("epsilon", [1e-5, 0.0005, 0.0, 0.3])
@pytest.mark.parametrize("n", [5, 50, 5000])
def test_ram_loops_are_the_eager_ops(dtype, models, base_index, epsilon, n):
    xs = _ram_inputs(n, models, dtype, base_index)
    assert _same(
        ram.ram(xs, base_index=base_index, epsilon=epsilon), ram._ram_eager(xs, base_index, epsilon), dtype
    )
    counts = ram.ramplus_fold(0, None, xs, base_index=base_index, epsilon=epsilon)
    want = ram._counts_eager(xs, base_index, epsilon)
    assert all(torch.equal(a, b) for a, b in zip(counts, want)), (counts, want)
    lam = ram.ramplus_finish(0, counts, base_index=base_index, epsilon=epsilon)
    got = ram.ramplus_tl(xs, stats=[lam], base_index=base_index, epsilon=epsilon)
    assert _same(got, ram._ramplus_eager(xs, lam, base_index, epsilon), dtype)
