"""methods: tiny hand-derived cases, chunk invariance, spec <-> kernel agreement.

Every case runs through ``execute.merge_tensors``, the executor's own chunk/pass/block
machinery, so what is tested here is what a streamed merge computes.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from streammerge.errors import MethodError
from streammerge.execute import merge_tensors
from streammerge.methods import SPECS, Scope, get_kernel, parallel

bf16, f32 = torch.bfloat16, torch.float32


def t(values, dtype=f32):
    return torch.tensor(values, dtype=dtype)


def test_linear_normalized_weighted_mean():
    # (0.25*1 + 0.75*3) / (0.25 + 0.75) = 2.5 ; (0.25*2 + 0.75*4) / 1 = 3.5
    out = merge_tensors("linear", [t([1.0, 2.0]), t([3.0, 4.0])], weight=[0.25, 0.75])
    assert out.tolist() == [2.5, 3.5]


def test_linear_without_normalize_is_a_weighted_sum():
    # 2*1 + 3*10 = 32 ; 2*-1 + 3*0.5 = -0.5
    out = merge_tensors("linear", [t([1.0, -1.0]), t([10.0, 0.5])], weight=[2.0, 3.0], normalize=False)
    assert out.tolist() == [32.0, -0.5]


def test_linear_bf16_rounds_once_to_nearest_even():
    # 1.0078125 is the bf16 after 1.0. Their mean 1.00390625 lies exactly halfway; round to
    # nearest even picks 1.0 (even mantissa). 1.0078125 and 1.015625: mean 1.01171875,
    # halfway between 1.0078125 (odd) and 1.015625 (even) -> 1.015625.
    a, b = t([1.0, 1.0078125], bf16), t([1.0078125, 1.015625], bf16)
    out = merge_tensors("linear", [a, b], weight=[0.5, 0.5])
    assert out.dtype == bf16 and out.tolist() == [1.0, 1.015625]


def test_task_arithmetic_hand_derived():
    # deltas: ft1-base = [1, -1], ft2-base = [0.5, 2]; weighted by [1, 0.5]: [1, -1], [0.25, 1]
    # sum [1.25, 0]; lambda 0.5 -> [0.625, 0]; + base [1, 1] -> [1.625, 1]
    base, ft1, ft2 = t([1.0, 1.0]), t([2.0, 0.0]), t([1.5, 3.0])
    args = dict(base_index=2, weight=[1.0, 0.5, None])
    assert merge_tensors("task_arithmetic", [ft1, ft2, base], **args, **{"lambda": 0.5}).tolist() == [
        1.625,
        1.0,
    ]
    # normalize divides by the weight sum 1.5: fp32(1.25/1.5) = 0.8333333134651184, plus 1
    # rounds in fp32 to 1.8333332538604736; the second element stays 1 + 0/1.5 = 1
    assert merge_tensors("task_arithmetic", [ft1, ft2, base], **args, normalize=True).tolist() == [
        1.8333332538604736, 1.0]  # fmt: skip


def test_task_arithmetic_rounds_weights_to_bf16_like_mergekit():
    # mergekit builds the weights with torch.tensor(weights, dtype=D): bf16(0.3) = 0.30078125
    out = merge_tensors("task_arithmetic", [t([1.0], bf16), t([0.0], bf16)], base_index=1, weight=[0.3, None])
    assert out.tolist() == [0.30078125]


def test_task_arithmetic_zero_weight_sum_is_guarded():
    # weights 1 and -1 sum to 0: mergekit replaces the divisor by 1, so normalize is a no-op
    out = merge_tensors("task_arithmetic", [t([2.0]), t([4.0]), t([1.0])], base_index=2,
                        weight=[1.0, -1.0, None], normalize=True)  # fmt: skip
    assert out.tolist() == [1.0 + (1.0 - 3.0)]


def test_ties_hand_derived():
    # d1 = [1, -2, 3, -0.5], d2 = [-1, 1, 2, 4]; density 0.5 keeps k = 2 per model:
    #   d1 -> [0, -2, 3, 0], d2 -> [0, 0, 2, 4]
    # elected sign of the weighted sum [0, -2, 5, 4]: [+, -, +, +] (0 counts as +)
    # agreeing entries: d1 at 1, 2; d2 at 2, 3 -> mixed [0, -2, 5, 4], divisor [1, 1, 2, 1]
    # normalize (ties default) -> [0, -2, 2.5, 4]; + base 0
    base = t([0.0, 0.0, 0.0, 0.0])
    out = merge_tensors("ties", [t([1.0, -2.0, 3.0, -0.5]), t([-1.0, 1.0, 2.0, 4.0]), base], base_index=2,
                        weight=[1.0, 1.0, None], density=[0.5, 0.5, None])  # fmt: skip
    assert out.tolist() == [0.0, -2.0, 2.5, 4.0]


@pytest.mark.parametrize("dtype", [bf16, f32])
def test_ties_breaks_threshold_ties_by_flat_index(dtype):
    # |d| all equal: k = int(0.5 * 6) = 3 -> the three earliest elements survive
    out = merge_tensors("ties", [t([1.0, -1, 1, -1, 1, -1], dtype), t([0.0] * 6, dtype)], base_index=1,
                        weight=[1.0, None], density=[0.5, None])  # fmt: skip
    assert out.tolist() == [1.0, -1.0, 1.0, 0.0, 0.0, 0.0]


def test_breadcrumbs_breaks_ties_like_a_stable_ascending_sort():
    # all |d| equal, n = 6, density 0.5 -> keep 3, gamma 0.2 -> drop int(1.2) = 1 on top,
    # bottom = 6 - 3 - 1 = 2: stable ascending order is the flat order, keep ranks 2, 3, 4
    out = merge_tensors("breadcrumbs", [t([1.0, -1, 1, -1, 1, -1]), t([0.0] * 6)], base_index=1,
                        weight=[1.0, None], density=[0.5, None], gamma=[0.2, None])  # fmt: skip
    assert out.tolist() == [0.0, 0.0, 1.0, -1.0, 1.0, 0.0]


def test_breadcrumbs_drops_the_top_gamma_and_the_bottom():
    # n = 10, density 0.5 -> keep 5; gamma 0.1 -> drop the 1 largest; bottom = 10 - 5 - 1 = 4
    # ascending |d|: .05 .1 .2 .5 | 1 2 2.5 3 4 | 5  -> keep ranks 4..8 (1, 2, 2.5, -3, 4)
    d = [0.1, -5, 2, -3, 1, 0.5, 4, -0.2, 2.5, 0.05]
    out = merge_tensors("breadcrumbs", [t(d), t([0.0] * 10)], base_index=1, weight=[1.0, None],
                        density=[0.5, None], gamma=[0.1, None])  # fmt: skip
    assert out.tolist() == [0.0, 0.0, 2.0, -3.0, 1.0, 0.0, 4.0, 0.0, 2.5, 0.0]


def _random_deltas(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 0.01


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_keeps_density_and_rescales_l1(method):
    base = torch.zeros(1 << 20)
    delta = _random_deltas(1 << 20)
    out = merge_tensors(method, [delta, base], base_index=1, weight=[1.0, None], density=[0.3, None], seed=7)
    kept = (out != 0).double().mean().item()
    assert abs(kept - 0.3) < 0.003  # 1M Bernoulli(0.3) draws: sd 0.00046
    # rescale multiplies the survivors by sum|d| / sum|kept d|: the L1 norm is preserved
    assert out.abs().double().sum().item() == pytest.approx(delta.abs().double().sum().item(), rel=1e-5)
    again = merge_tensors(
        method, [delta, base], base_index=1, weight=[1.0, None], density=[0.3, None], seed=7
    )
    other = merge_tensors(
        method, [delta, base], base_index=1, weight=[1.0, None], density=[0.3, None], seed=8
    )
    assert torch.equal(out, again) and not torch.equal(out, other)


@pytest.mark.parametrize("method, earliest_high", [("ties", True), ("breadcrumbs", False)])
def test_magnitude_window_with_l1_rescale_counts_boundary_ties_in_element_order(method, earliest_high):
    # 200,003 deltas with 3 magnitudes, so ties at each window boundary span many 64K
    # statistics blocks. Expected: the stable-sort window of |d| (ties by position), scaled
    # by fp32(sum|d|) / fp32(sum|kept d|) from fp64 sums, as one whole-tensor computation.
    n, density, gamma = 200_003, 0.45, 0.2
    g = torch.Generator().manual_seed(3)
    mags = torch.tensor([0.25, 0.5, 1.0])[torch.randint(0, 3, (n,), generator=g)]
    delta = mags * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    order = torch.sort(delta.abs(), stable=True, descending=earliest_high).indices  # rank order
    if earliest_high:  # ties: the top k
        chosen = order[: int(density * n)]
    else:  # breadcrumbs: ascending ranks [n - target - gamma n, n - gamma n)
        bottom = n - int(density * n) - int(gamma * n)
        chosen = order[bottom : bottom + int(density * n)]
    keep = torch.zeros(n, dtype=torch.bool)
    keep[chosen] = True
    kept = delta * keep
    factor = torch.tensor(delta.abs().double().sum().item()) / torch.tensor(kept.abs().double().sum().item())
    params = {"gamma": [gamma, None]} if method == "breadcrumbs" else {}
    out = merge_tensors(method, [delta, torch.zeros(n)], base_index=1, weight=[1.0, None], density=[density, None],
                        rescale=True, **params)  # fmt: skip
    assert torch.equal(out, kept * factor)


def test_della_keeps_density_and_favours_large_magnitudes():
    rows = _random_deltas(512 * 1024).reshape(512, 1024)
    out = merge_tensors("della_linear", [rows, torch.zeros_like(rows)], base_index=1, weight=[1.0, None],
                        density=[0.5, None], epsilon=[0.2, None], seed=3)  # fmt: skip
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.5) < 0.005  # mean keep probability = density
    big = rows.abs() > rows.abs().median(dim=1, keepdim=True).values
    # keep probability runs linearly from 0.3 (smallest) to 0.7 (largest): halves at 0.4 / 0.6
    assert kept[big].double().mean().item() == pytest.approx(0.6, abs=0.01)
    assert kept[~big].double().mean().item() == pytest.approx(0.4, abs=0.01)


def test_slerp_hand_derived():
    # orthogonal unit vectors: theta = pi/2, both coefficients sin(pi/4)/sin(pi/2) = 0.70710677 (fp32)
    out = merge_tensors("slerp", [t([1.0, 0.0]), t([0.0, 1.0])], base_index=0, t=0.5)
    assert out.tolist() == pytest.approx([math.sqrt(0.5)] * 2, abs=1e-7)
    # parallel vectors (dot 1 > 0.9995) fall back to lerp: 0.75*[1, 2] + 0.25*[2, 4]
    assert merge_tensors("slerp", [t([1.0, 2.0]), t([2.0, 4.0])], base_index=0, t=0.25).tolist() == [
        1.25,
        2.5,
    ]


@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_hand_derived(flatten):
    # rows [1, 0] and [0, 1] (orthogonal unit vectors), equal weights -> t = 0.5, theta = pi/2:
    # both coefficients sin(pi/4) / sin(pi/2); flattened, the 2x2 tensors are also orthogonal
    p, q = t([[1.0, 0.0], [2.0, 0.0]]), t([[0.0, 1.0], [0.0, 2.0]])
    out = merge_tensors("nuslerp", [p, q], weight=[1.0, 1.0], nuslerp_flatten=flatten)
    assert out.reshape(-1).tolist() == pytest.approx(
        [math.sqrt(0.5), math.sqrt(0.5), math.sqrt(2), math.sqrt(2)], abs=1e-6
    )


def test_nuslerp_row_wise_slerps_each_column():
    # columns are the vectors: column 0 is [1,0] -> [0,1], column 1 is [2,0] -> [0,2]; both at
    # 90 degrees, t = 0.5: sin(45°)·(v0 + v1) = [0.7071, 0.7071] and [1.4142, 1.4142]
    v0, v1 = t([[1.0, 2.0], [0.0, 0.0]]), t([[0.0, 0.0], [1.0, 2.0]])
    out = merge_tensors("nuslerp", [v0, v1], weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    r = math.sqrt(0.5)
    assert out.flatten().tolist() == pytest.approx([r, 2 * r, r, 2 * r], rel=1e-6)


def test_nearswap_hand_derived():
    # |B - X| = [.05, .5, 2]; w = clamp(0.1 / |B - X|, 0, 1) = [1, .2, .05]; R = w*X + (1-w)*B
    out = merge_tensors("nearswap", [t([0.0, 0.0, 0.0]), t([0.05, 0.5, -2.0])], base_index=0, t=0.1)
    assert out.tolist() == pytest.approx([0.05, 0.1, -0.1], abs=1e-8)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_hand_derived(filter_wise):
    # d1 = [1, 1], d2 = [1, 0]: cos = 1 / (sqrt(2) * 1) = 0.7071; N = 2: t = 2c / (1 + c) = 0.8284
    # R = t * mean(w1, w2) + (1 - t) * w0 = 0.8284 * [1, 0.5] + 0 = [0.8284, 0.4142]
    out = merge_tensors("model_stock", [t([0.0, 0.0]), t([1.0, 1.0]), t([1.0, 0.0])], base_index=0,
                        filter_wise=filter_wise)  # fmt: skip
    assert out.tolist() == pytest.approx([0.8284271, 0.41421357], abs=1e-7)


def test_ram_keeps_unique_changes_and_averages_shared_ones():
    # TV1 = [1, 1, 0], TV2 = [0, 3, 0]; changed-by counts c = [1, 2, 0]
    # element 0: only ft1 changed it -> 1; element 1: both -> (1 + 3) / 2 = 2; element 2: 0
    xs = [t([1.0, 1.0, 0.0]), t([0.0, 3.0, 0.0]), t([0.0, 0.0, 0.0])]
    assert merge_tensors("ram", xs, base_index=2).tolist() == [1.0, 2.0, 0.0]
    # ramplus_tl: ft1 shares 1 element and owns 1 -> rho 1; ft2 shares 1, owns 0 -> rho 1/eps;
    # both clamp to alpha 0.2: lambda = 1 + 0.1 * 0.2 = 1.02 scales ft1's unique change
    out = merge_tensors("ramplus_tl", xs, base_index=2)
    assert out.tolist() == pytest.approx([1.02, 2.0, 0.0], abs=1e-6)


def test_passthrough_scales():
    assert merge_tensors("passthrough", [t([1.0, -3.0], bf16)], scale=[0.5]).tolist() == [0.5, -1.5]


def test_ties_unweighted_sign_election_follows_the_paper():
    base, x0, x1 = t([0.0]), t([1.0]), t([-3.0])
    # mergekit elects from weighted deltas: 0.9*1 + 0.1*(-3) = 0.6 > 0 -> x0 alone: 0.9*1/0.9 = 1
    assert merge_tensors("ties", [x0, x1, base], base_index=2, weight=[0.9, 0.1, None],
                         density=[1.0, 1.0, None]).tolist() == [1.0]  # fmt: skip
    # the TIES paper elects from the task vectors themselves: 1 - 3 < 0 -> x1 alone: -3
    out = merge_tensors("ties", [x0, x1, base], base_index=2, weight=[0.9, 0.1, None],
                        density=[1.0, 1.0, None], sign_election="unweighted")  # fmt: skip
    assert out.tolist() == [-3.0]


def test_dare_rescale_by_density_divides_kept_deltas_by_p():
    # DARE paper: a kept delta becomes delta / p; with p = 0.5 every output is 0 or 2*delta
    gen = torch.Generator().manual_seed(3)
    base = torch.zeros(20_000)
    delta = torch.randn(20_000, generator=gen)
    out = merge_tensors("dare_linear", [base + delta, base], base_index=1, weight=[1.0, None],
                        density=[0.5, None], rescale_mode="density")  # fmt: skip
    kept = out != 0
    assert torch.equal(out[kept], 2 * delta[kept])
    assert abs(kept.float().mean().item() - 0.5) < 0.02


def test_della_rescale_by_density_divides_by_each_elements_p():
    # rows of 3: ranks of |delta| 0, 1, 2 -> p = 0.5 - 0.2, 0.5, 0.5 + 0.2 = 0.3, 0.5, 0.7
    rows = torch.tensor([[1.0, -2.0, 3.0]]).repeat(3000, 1)
    base = torch.zeros_like(rows)
    out = merge_tensors("della_linear", [rows, base], base_index=1, weight=[1.0, None],
                        density=[0.5, None], epsilon=[0.2, None], rescale_mode="density")  # fmt: skip
    p = torch.tensor([0.3, 0.5, 0.7])
    expected = rows / p
    kept = out != 0
    assert torch.allclose(out[kept], expected[kept], rtol=1e-6)
    assert kept.float().mean(dim=0).tolist() == pytest.approx([0.3, 0.5, 0.7], abs=0.03)


def test_parallel_ranges_cover_the_block_in_aligned_parts():
    assert parallel.ranges(10, threads=1) == [(0, 10)]
    n = 5 * parallel.MIN_PART + 3
    assert parallel.ranges(n, threads=2) == [(0, (n + 1) // 2), ((n + 1) // 2, n)]
    parts = parallel.ranges(n, align=1000, threads=3)
    assert [lo for lo, _ in parts[1:]] == [hi for _, hi in parts[:-1]] and parts[-1][1] == n
    assert all(lo % 1000 == 0 for lo, _ in parts)


def test_the_default_thread_count_outlives_the_pool_threads():
    """Pool threads run torch on one thread, and torch.set_num_threads(1) there becomes the
    count of every thread torch meets later: a thread count read from torch made the next
    merge in the process (a batch's compute thread, say) run on one core."""
    import threading

    expected = parallel.thread_count()
    parallel.run(lambda lo, hi: torch.ones(hi - lo).sum(), 4 * parallel.MIN_PART)  # pool threads
    seen = []
    later = threading.Thread(target=lambda: seen.append((parallel.thread_count(), torch.ones(1).sum())))
    later.start()
    later.join()
    assert seen[0][0] == expected


def test_multislerp_hand_derived():
    # norms 1 and 2; unit vectors [1,0], [0,1]; mean of units [0.5,0.5] -> direction
    # [1,1]/sqrt(2); mean norm 0.5*1 + 0.5*2 = 1.5 -> 1.5/sqrt(2) = 1.0606601717798212 each
    out = merge_tensors("multislerp", [t([1.0, 0.0]), t([0.0, 2.0])], weight=[1.0, 1.0])
    assert out.tolist() == pytest.approx([1.0606601717798212] * 2, rel=1e-6)
    # with a base the same happens to the task vectors, then the base is added back
    out = merge_tensors("multislerp", [t([2.0, 1.0]), t([1.0, 3.0]), t([1.0, 1.0])], base_index=2,
                        weight=[1.0, 1.0, None])  # fmt: skip
    assert out.tolist() == pytest.approx([2.0606601717798212] * 2, rel=1e-6)


def test_multislerp_single_input_is_returned_and_antipodes_fall_back_or_fail():
    assert merge_tensors("multislerp", [t([3.0, -1.0]), t([0.0, 0.0])], base_index=1,
                         weight=[1.0, None]).tolist() == [3.0, -1.0]  # fmt: skip
    # units [1,0] and [-1,0] with equal weights: zero mean; two inputs fall back to the
    # weighted sum 0.5*[2,0] + 0.5*[-1,0] = [0.5, 0]
    out = merge_tensors("multislerp", [t([2.0, 0.0]), t([-1.0, 0.0])], weight=[1.0, 1.0])
    assert out.tolist() == [0.5, 0.0]
    with pytest.raises(MethodError, match="weighted mean of the inputs' directions is zero"):
        merge_tensors("multislerp", [t([1.0, 0.0]), t([-1.0, 0.0]), t([2.0, 0.0])], weight=[1.0, 2.0, 1.0])


def test_karcher_hand_derived():
    # directions [1,0] and [0,1]: their Karcher mean is the midpoint [1,1]/sqrt(2); the
    # mean norm (3 + 1)/2 = 2 scales it: sqrt(2) = 1.4142135623730951 each
    out = merge_tensors("karcher", [t([3.0, 0.0]), t([0.0, 1.0])])
    assert out.tolist() == pytest.approx([1.4142135623730951] * 2, rel=1e-6)
    # three directions 0, 60 and 90 degrees in a plane, equal norms 1: the Karcher mean is the
    # angle minimising the squared arc distances, (0 + 60 + 90)/3 = 50 degrees
    c60, s60 = math.cos(math.pi / 3), math.sin(math.pi / 3)
    out = merge_tensors("karcher", [t([1.0, 0.0]), t([c60, s60]), t([0.0, 1.0])], max_iter=50, tol=1e-9)
    expected = [math.cos(math.radians(50)), math.sin(math.radians(50))]
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_sce_hand_derived():
    base = t([0.0, 0.0, 0.0, 0.0])
    x0, x1 = t([1.0, -2.0, 0.5, 0.0]), t([3.0, 2.0, 0.5, 0.0])
    # all kept: signs from the sums [4, 0, 1, 0] -> all +; mean squares 5.25/4 and 13.25/4,
    # weights 1.3125/4.625 and 3.3125/4.625; element 0: (1*w0 + 3*w1)/(w0 + w1) = 11.25/4.625;
    # element 1: only x1 agrees -> 2; element 2: 0.5; element 3: nothing agrees (sign 0) -> 0
    out = merge_tensors("sce", [x0, x1, base], base_index=2)
    assert out.tolist() == pytest.approx([11.25 / 4.625, 2.0, 0.5, 0.0], rel=1e-6)
    # select_topk 0.5: variances [1, 4, 0, 0], 2 nonzero -> k = 1: only element 1 survives;
    # its sum is 0 -> sign +, only x1 agrees -> 2
    out = merge_tensors("sce", [x0, x1, base], base_index=2, select_topk=0.5)
    assert out.tolist() == [0.0, 2.0, 0.0, 0.0]


def test_arcee_fusion_keeps_only_the_outlier_change():
    # one row: I = |X - B| * KL(row), so I is proportional to |d|. Sorted |d| ranks
    # int(q * 7) = 1, 3, 5 -> Q1 = 0.2, median 0.4, Q3 = 0.6 (times KL): threshold
    # 0.4 + 1.5 * 0.4 = 1.0 (times KL); only the change of 5 reaches it
    base = torch.zeros(8)
    d = t([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 5.0])
    out = merge_tensors("arcee_fusion", [base + d, base], base_index=1)
    assert out.tolist() == [0.0] * 7 + [5.0]
    assert merge_tensors("arcee_fusion", [(base + d).to(bf16), base.to(bf16)], base_index=1).dtype == bf16


def _case(method: str, numel: int, dtype, gen):
    spec = SPECS[method]
    n = 1 if spec.max_inputs == 1 else 2 if spec.max_inputs == 2 else 3
    base = n - 1 if spec.requires_base or method == "nuslerp" else None  # nuslerp: optional base
    xs = [(torch.randn(numel, generator=gen) * 0.02).to(dtype) for _ in range(n)]
    if base is not None:  # fine-tunes are the base plus a small delta
        xs = [xs[base] + x * 0.1 if i != base else xs[base] for i, x in enumerate(xs)]
        xs = [x.to(dtype) for x in xs]
    values = {"weight": [0.3, 0.45, 0.9], "density": [0.4, 0.6, 0.5], "gamma": [0.05] * 3,
              "epsilon": [0.1] * 3, "scale": [0.5] * 3}  # fmt: skip
    kwargs: dict = {}
    for p in spec.params:
        if p.scope is Scope.SHARED:
            kwargs[p.name] = {"t": 0.3, "lambda": 0.7, "select_topk": 0.3}.get(p.name, p.default)
        else:
            kwargs[p.name] = [
                None if (i == base and p.scope is Scope.NON_BASE) else values[p.name][i] for i in range(n)
            ]
    return xs, base, kwargs


@pytest.mark.parametrize(
    "method, filter_wise", [(m, False) for m in sorted(SPECS)] + [("model_stock", True), ("nuslerp", True)]
)
@pytest.mark.parametrize("dtype", [bf16, f32])
def test_methods_are_chunk_and_thread_invariant(method, filter_wise, dtype, monkeypatch):
    """Chunks and blocks of any size, and 1 or 2 threads, give the same bits as one call."""
    monkeypatch.setattr(parallel, "MIN_PART", 1 << 12)  # split blocks across threads here too
    gen = torch.Generator().manual_seed(7)
    numel = (1 << 20) + 12_345 if method == "slerp" else 200_003  # several statistics blocks
    xs, base, kwargs = _case(method, numel, dtype, gen)
    if SPECS[method].rows({"filter_wise": True, "nuslerp_flatten": False}):  # rows of 1000: 2-D tensors
        numel = 200_000
        xs = [x[:numel].reshape(200, 1000) for x in xs]
    if "rescale" in kwargs:
        kwargs["rescale"] = True
    if "filter_wise" in kwargs:  # model_stock: rows, and the whole-tensor statistics pass
        kwargs["filter_wise"] = filter_wise
    if "nuslerp_flatten" in kwargs:  # nuslerp: the "filter_wise" flag means rows here
        kwargs["nuslerp_flatten"] = not filter_wise
    whole = merge_tensors(method, xs, base_index=base, seed=1, **kwargs)
    old = torch.get_num_threads()
    try:
        for threads, chunk, block in [(1, 70_000, 1 << 14), (2, 130_000, 1 << 16), (2, 1 << 21, 1 << 20)]:
            parallel.set_threads(threads)
            part = merge_tensors(
                method, xs, base_index=base, seed=1, chunk_elems=chunk, block_elems=block, **kwargs
            )
            assert torch.equal(part.view(torch.uint8), whole.view(torch.uint8)), (threads, chunk, block)
    finally:
        parallel.set_threads(None)
        torch.set_num_threads(old)


@pytest.mark.parametrize("method", sorted(SPECS))
def test_spec_params_match_kernel_signature(method):
    fn = get_kernel(method).combine
    sig = inspect.signature(fn)
    context = {"base_index", "ctx", "stats", "state"}
    accepted = {n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY} - context
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    names = {p.name for p in SPECS[method].params}
    assert accepted <= names | {"gamma", "epsilon", "density", "rescale", "rescale_mode", "sign_election"}
    assert names - accepted == set() or takes_var_kw


@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize("n_models", [1, 2, 3, 4, 5, 8])  # one pass up to 4 without election
@pytest.mark.parametrize("consensus", ["sum", None])
def test_compiled_gta_combine_is_mergekits_op_sequence_bit_for_bit(dtype, n_models, consensus):
    """The compiled combine (fused.combine, fp32 with explicit rounding) against combine_eager
    (mergekit's torch ops): exact zeros and cancellations, negative and tiny weights, normalize
    and lambda, subnormal, huge and infinite values included."""
    from streammerge.methods.gta import _combine_fused, combine_eager, fast_combine_exact

    if not fast_combine_exact(dtype, n_models):
        pytest.skip("torch sums 5+ fp32 models out of order; gta() uses combine_eager there")
    gen = torch.Generator().manual_seed(n_models)
    n = 50_000 + 3  # not a whole number of the loop's tiles
    base = (torch.randn(n, generator=gen) * 0.02).to(dtype)
    deltas = (torch.randn(n_models, n, generator=gen) * 0.003).to(dtype)
    deltas[:, ::7] = 0  # pruned elements
    deltas[0, ::11] = -0.0
    base[::17] = -0.0
    deltas[0, 5::101] = torch.finfo(dtype).tiny / 8  # subnormal
    deltas[0, 6::103] = torch.finfo(dtype).max / 2  # overflows when summed
    deltas[-1, 7::107] = float("-inf")
    if n_models > 1:  # equal weights cancel exactly: the elected sign of a zero total is +
        deltas[1, ::13] = -deltas[0, ::13]
    for weights in ([0.6, -0.3, 0.9, 0.25, 1e-3, 2.0, -1.5, 0.1][:n_models], [1.0] * n_models):
        for normalize, lam in [(True, 1.0), (False, 0.7), (True, 1.3)]:
            args = (base, deltas, weights, consensus, normalize, lam)
            fast, eager = _combine_fused(*args), combine_eager(*args)
            assert torch.equal(fast.view(torch.uint8), eager.view(torch.uint8)), (weights, normalize, lam)
            # unpruned models instead of deltas: the loop makes each delta (x - base, in D)
            models = [base + d for d in deltas]
            made = torch.stack([m - base for m in models])
            fast = _combine_fused(base, models, weights, consensus, normalize, lam)
            eager = combine_eager(base, made, weights, consensus, normalize, lam)
            assert torch.equal(fast.view(torch.uint8), eager.view(torch.uint8)), (
                "models",
                weights,
                normalize,
                lam,
            )
