"""methods: tiny hand-derived cases, chunk invariance, spec <-> kernel agreement."""

from __future__ import annotations

import inspect

import pytest
import torch

from streammerge.methods import SPECS, Scope, get_kernel

bf16, f32 = torch.bfloat16, torch.float32


def t(values, dtype=f32):
    return torch.tensor(values, dtype=dtype)


def test_linear_normalized_weighted_mean():
    # (0.25*1 + 0.75*3) / (0.25 + 0.75) = 2.5 ; (0.25*2 + 0.75*4) / 1 = 3.5
    out = get_kernel("linear")([t([1.0, 2.0]), t([3.0, 4.0])], weight=[0.25, 0.75])
    assert out.tolist() == [2.5, 3.5]


def test_linear_without_normalize_is_a_weighted_sum():
    # 2*1 + 3*10 = 32 ; 2*-1 + 3*0.5 = -0.5
    out = get_kernel("linear")([t([1.0, -1.0]), t([10.0, 0.5])], weight=[2.0, 3.0], normalize=False)
    assert out.tolist() == [32.0, -0.5]


def test_linear_bf16_rounds_once_to_nearest_even():
    # 1.0078125 is the bf16 after 1.0. Their mean 1.00390625 lies exactly halfway; round to
    # nearest even picks 1.0 (even mantissa). 1.0078125 and 1.015625: mean 1.01171875,
    # halfway between 1.0078125 (odd) and 1.015625 (even) -> 1.015625.
    a, b = t([1.0, 1.0078125], bf16), t([1.0078125, 1.015625], bf16)
    out = get_kernel("linear")([a, b], weight=[0.5, 0.5])
    assert out.dtype == bf16 and out.tolist() == [1.0, 1.015625]


def test_task_arithmetic_hand_derived():
    # deltas: ft1-base = [1, -1], ft2-base = [0.5, 2]; weighted by [1, 0.5]: [1, -1], [0.25, 1]
    # sum [1.25, 0]; lambda 0.5 -> [0.625, 0]; + base [1, 1] -> [1.625, 1]
    base, ft1, ft2 = t([1.0, 1.0]), t([2.0, 0.0]), t([1.5, 3.0])
    ta = get_kernel("task_arithmetic")
    out = ta([ft1, ft2, base], base_index=2, weight=[1.0, 0.5, None], **{"lambda": 0.5})
    assert out.tolist() == [1.625, 1.0]
    # normalize divides by the weight sum 1.5: fp32(1.25/1.5) = 0.8333333134651184, plus 1
    # rounds in fp32 to 1.8333332538604736; the second element stays 1 + 0/1.5 = 1
    out = ta([ft1, ft2, base], base_index=2, weight=[1.0, 0.5, None], normalize=True)
    assert out.tolist() == [1.8333332538604736, 1.0]


def test_task_arithmetic_rounds_weights_to_bf16_like_mergekit():
    # mergekit builds the weights with torch.tensor(weights, dtype=D): bf16(0.3) = 0.30078125
    out = get_kernel("task_arithmetic")([t([1.0], bf16), t([0.0], bf16)], base_index=1, weight=[0.3, None])
    assert out.tolist() == [0.30078125]


def test_task_arithmetic_zero_weight_sum_is_guarded():
    # weights 1 and -1 sum to 0: mergekit replaces the divisor by 1, so normalize is a no-op
    out = get_kernel("task_arithmetic")(
        [t([2.0]), t([4.0]), t([1.0])], base_index=2, weight=[1.0, -1.0, None], normalize=True
    )
    assert out.tolist() == [1.0 + (1.0 - 3.0)]


def test_passthrough_scales_or_returns_the_input():
    x = t([1.0, -3.0], bf16)
    pt = get_kernel("passthrough")
    assert pt([x], scale=[1.0]) is x
    assert pt([x], scale=[0.5]).tolist() == [0.5, -1.5]


def _inputs(method, n, numel, dtype, gen):
    xs = [(torch.randn(numel, generator=gen) * 0.02).to(dtype) for _ in range(n)]
    spec = SPECS[method]
    base = n - 1 if spec.requires_base else None
    kwargs = {}
    for p in spec.params:
        if p.scope is Scope.SHARED:
            kwargs[p.name] = {"normalize": True, "lambda": 0.7}.get(p.name, p.default)
        else:
            vals = [0.3, 0.45, 0.9, 0.25][:n] if p.name == "weight" else [0.5] * n
            kwargs[p.name] = [
                None if (i == base and p.scope is Scope.NON_BASE) else v for i, v in enumerate(vals)
            ]
    if n == 1:
        kwargs = {k: (v[:1] if isinstance(v, list) else v) for k, v in kwargs.items()}
    return xs, base, kwargs


@pytest.mark.parametrize("method", sorted(SPECS))
@pytest.mark.parametrize("dtype", [bf16, f32, torch.float16])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_are_chunk_invariant(method, dtype, threads):
    """Any split into blocks, odd sizes included, gives the same bits as one call."""
    gen = torch.Generator().manual_seed(7)
    n = 1 if SPECS[method].max_inputs == 1 else 3
    numel = 20_011
    xs, base, kwargs = _inputs(method, n, numel, dtype, gen)
    kernel = get_kernel(method)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = kernel(xs, base_index=base, **kwargs)
        for block in (97, 1000, 8192):
            parts = [kernel([x[s : s + block] for x in xs], base_index=base, **kwargs)
                     for s in range(0, numel, block)]  # fmt: skip
            assert torch.equal(torch.cat(parts).view(torch.uint8), whole.view(torch.uint8)), block
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("method", sorted(SPECS))
def test_spec_params_match_kernel_signature(method):
    sig = inspect.signature(get_kernel(method))
    accepted = {n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY} - {"base_index"}
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    names = {p.name for p in SPECS[method].params}
    assert accepted <= names
    assert names - accepted == set() or takes_var_kw
    for p in SPECS[method].params:
        if p.name in sig.parameters and sig.parameters[p.name].default is not inspect.Parameter.empty:
            assert sig.parameters[p.name].default == p.default, p.name
