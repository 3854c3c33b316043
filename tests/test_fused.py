"""fused: each compiled loop against the numpy/torch ops it replaces, bit for bit, on data
chosen to hit its edges (ties in every tile, spans that end inside a tile, equal boundary
keys, blocks split anywhere, signed zeros, NaN and infinities)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from streammerge.methods import direct, fused, select, tensors
from streammerge.methods.rng import stream_key, uniform_bits24

bf16, f32 = torch.bfloat16, torch.float32


def _pair(dtype, n, seed, levels=9):
    """x, base whose deltas take few distinct magnitudes: ties everywhere."""
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=gen) * 0.02).to(dtype)
    steps = torch.randint(-levels, levels + 1, (n,), generator=gen).float() * 2**-10
    x = (base.float() + steps).to(dtype)
    x[::97] = base[::97]  # zero deltas
    return x, base


def _cuts(n, seed, parts=5):
    rng = np.random.default_rng(seed)
    inner = sorted(rng.choice(np.arange(1, n), size=parts - 1, replace=False).tolist())
    return list(zip([0, *inner], [*inner, n]))


@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize("earliest_high", [True, False])
@pytest.mark.parametrize("scale", [False, True])
def test_prune_window_is_keep_window_then_the_mask_in_any_blocks(dtype, earliest_high, scale):
    n = 3 * fused.TILE + 171
    x, base = _pair(dtype, n, seed=int(earliest_high) + 2 * int(scale))
    delta = x - base
    keys = np.sort(select.magnitude_keys_np(delta).astype(np.int64))
    factor = torch.tensor(1.37, dtype=dtype)
    for rank_lo, rank_hi in [(n // 2, n), (n // 3, n // 3 + 1), (5, n - 7), (0, n), (n // 2, n // 2 + 900)]:
        bounds = [select.Boundary(int(keys[r]), int(np.searchsorted(keys, keys[r])),
                                  int(np.count_nonzero(keys == keys[r]))) for r in (rank_lo, rank_hi - 1)]  # fmt: skip
        expect_seen: dict = {}
        mask = select.keep_window(delta, *bounds, rank_lo, rank_hi, expect_seen, earliest_high)
        expect = select.apply_mask(delta, mask)
        if scale:
            expect = expect * factor
        spans = [np.array(select.tie_span(b, rank_lo, rank_hi, earliest_high), np.int64) for b in bounds]
        key = tensors.KEY[dtype]
        out = torch.empty_like(x)
        seen = np.zeros(2, np.int64)
        for lo, hi in _cuts(n, rank_lo):  # blocks in order, ties carried in ``seen``
            fused.prune_window(tensors.bits(x[lo:hi]), tensors.bits(base[lo:hi]), tensors.bits(out[lo:hi]),
                               key(bounds[0].key), key(bounds[1].key), *spans, seen, scale,
                               np.float32(factor.float()))  # fmt: skip
        assert torch.equal(out.view(torch.uint8), expect.view(torch.uint8)), (rank_lo, rank_hi)
        assert int(np.count_nonzero(mask)) == rank_hi - rank_lo
        counted = np.zeros(2, np.int64)
        fused.count_ties(tensors.bits(x), tensors.bits(base), key(bounds[0].key), key(bounds[1].key), counted)
        assert seen.tolist() == counted.tolist()
        assert sum(expect_seen.values()) == counted.sum()


@pytest.mark.parametrize("earliest_high", [True, False])
@pytest.mark.parametrize("dtype", [bf16, f32])
def test_keep_window_in_any_blocks_keeps_a_stable_sorts_ranks(dtype, earliest_high):
    """Few magnitude levels, so thousands of ties at each boundary: blocks whose ties lie all
    inside the window, all outside it, or across its edge, against a stable sort's ranks."""
    n = 3 * fused.TILE + 171
    x, base = _pair(dtype, n, seed=5 + int(earliest_high), levels=6)
    delta = x - base
    keys = select.magnitude_keys_np(delta).astype(np.int64)
    ranks = np.empty(n, np.int64)
    if earliest_high:  # the earliest of equal magnitudes ranks highest
        ranks[np.argsort(-keys, kind="stable")] = np.arange(n - 1, -1, -1)
    else:
        ranks[np.argsort(keys, kind="stable")] = np.arange(n)
    ordered = np.sort(keys)
    for rank_lo, rank_hi in [(n // 2, n), (n // 3, n // 3 + 1), (5, n - 7), (0, n), (n // 2, n // 2 + 900)]:
        bounds = [select.Boundary(int(ordered[r]), int(np.searchsorted(ordered, ordered[r])),
                                  int(np.count_nonzero(ordered == ordered[r]))) for r in (rank_lo, rank_hi - 1)]  # fmt: skip
        expect = (ranks >= rank_lo) & (ranks < rank_hi)
        for seed in range(3):
            seen: dict = {}
            parts = [select.keep_window(delta[lo:hi], *bounds, rank_lo, rank_hi, seen, earliest_high)
                     for lo, hi in _cuts(n, seed, parts=9)]  # fmt: skip
            assert np.array_equal(np.concatenate(parts), expect), (rank_lo, rank_hi, seed)


@pytest.mark.parametrize("dtype", [bf16, f32])
def test_delta_histogram_is_the_bincount_of_the_keys(dtype):
    x, base = _pair(dtype, 2 * fused.TILE + 5, seed=3, levels=300)
    keys = select.magnitude_keys(x - base)
    shift = 0 if dtype == bf16 else 16
    counts = np.zeros(65536, np.int64)
    for lo, hi in _cuts(x.numel(), 1):
        fused.delta_histogram(tensors.bits(x[lo:hi]), tensors.bits(base[lo:hi]), shift, -1, counts)
    assert np.array_equal(counts, select.histogram(keys, shift, None, None))
    if dtype == f32:  # the low 16 bits within one high bin
        high = int(np.argmax(counts))
        low = np.zeros(65536, np.int64)
        fused.delta_histogram(tensors.bits(x), tensors.bits(base), 0, high, low)
        assert np.array_equal(low, select.histogram(keys, 0, high, None))
        assert low.sum() == counts[high]


@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize("scale", [False, True])
def test_prune_random_is_the_keyed_mask(dtype, scale):
    x, base = _pair(dtype, fused.TILE + 333, seed=4, levels=50)
    x[10] = float("nan")
    x[11] = float("inf")
    key, start, threshold = stream_key(7, "t", 1), 1001, np.uint32(0.3 * 2**24)
    factor = torch.tensor(2.5, dtype=dtype)
    delta = x - base
    expect = select.apply_mask(delta, uniform_bits24(key, start, x.numel()) < threshold)
    if scale:
        expect = expect * factor
    out = torch.empty_like(x)
    for lo, hi in _cuts(x.numel(), 2):
        fused.prune_random(tensors.bits(x[lo:hi]), tensors.bits(base[lo:hi]), tensors.bits(out[lo:hi]), key[0],
                           start + lo, threshold, scale, np.float32(factor.float()))  # fmt: skip
    assert torch.equal(out.view(torch.uint8), expect.view(torch.uint8))
    finite = torch.isfinite(delta)
    before, after = fused.l1_random(
        tensors.bits(x[finite]), tensors.bits(base[finite]), key[0], start, threshold
    )
    assert before == pytest.approx(delta[finite].abs().double().sum().item(), rel=1e-12)
    if not finite.all():
        return
    kept = select.apply_mask(delta, uniform_bits24(key, start, x.numel()) < threshold)
    assert after == pytest.approx(kept.abs().double().sum().item(), rel=1e-12)


@pytest.mark.parametrize("bits", [15, 31])
def test_row_ranks_are_a_stable_sorts(bits):
    """The radix ranks against numpy's stable argsort: keys over the whole range, keys with
    few distinct values (ties everywhere, passes skipped), one key, rows of one element."""
    rng = np.random.default_rng(bits)
    for n, distinct in [(1, 1), (7, 3), (700, 1), (700, 5), (5000, 5000)]:
        values = rng.integers(0, 1 << bits, distinct).astype(np.uint32)
        keys = values[rng.integers(0, distinct, n)]
        ranks = np.empty(n, np.int64)
        fused._row_ranks(
            keys, (bits + 7) // 8, ranks, np.empty((4, n), np.int64), np.empty((4, 256), np.int64)
        )
        expect = np.empty(n, np.int64)
        expect[np.argsort(keys, kind="stable")] = np.arange(n)
        assert np.array_equal(ranks, expect), (n, distinct)


@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize("scale", [False, True])
def test_prune_della_is_the_rank_mask(dtype, scale):
    """della's compiled drop against the eager one (numpy ranks, the keyed uniforms below
    each rank's keep probability, ``apply_mask``) over whole rows split anywhere between
    rows, with ties, signed zeros, NaN and infinities; and its L1 terms."""
    from streammerge.methods import gta
    from streammerge.methods.rng import uniform

    row = 700
    x, base = _pair(dtype, row * 6, seed=6, levels=50)
    x[:row] = (base[:row].float() + torch.randn(row) * 10 ** torch.empty(row).uniform_(-12, 0)).to(dtype)
    x[row + 10], x[row + 11], x[2 * row + 3] = float("nan"), float("inf"), -float("inf")
    key, start = stream_key(7, "t", 1), 3 * row
    table = gta._della_probs(row, 0.5, 0.2, dtype)[0]
    factor = torch.tensor(1.75, dtype=dtype)
    delta = x - base
    keep = uniform(key, start, x.numel()) < table[gta._row_ranks(delta.reshape(-1, row))]
    expect = select.apply_mask(delta, keep)
    if scale:
        expect = expect * factor
    out = torch.empty_like(x)
    for lo, hi in [(0, row), (row, 4 * row), (4 * row, 6 * row)]:
        fused.prune_della(tensors.bits(x[lo:hi]), tensors.bits(base[lo:hi]), tensors.bits(out[lo:hi]), row,
                          key[0], start + lo, table, scale, np.float32(factor.float()))  # fmt: skip
    assert torch.equal(out.view(torch.uint8), expect.view(torch.uint8))
    finite = slice(3 * row, 6 * row)  # rows with no NaN or infinity
    before, after = fused.l1_della(
        tensors.bits(x[finite]), tensors.bits(base[finite]), row, key[0], start + 3 * row, table
    )
    kept = select.apply_mask(delta[finite], keep[3 * row :])
    assert before == pytest.approx(delta[finite].abs().double().sum().item(), rel=1e-12)
    assert after == pytest.approx(kept.abs().double().sum().item(), rel=1e-12)


def test_bfloat16_rounding_is_torchs():
    """Random float32 patterns, exact halfway cases both ways, carries into the exponent,
    overflow to infinity, subnormals and signed zeros round as torch's conversion does."""

    @numba.njit
    def round_all(values, out):
        for i in range(values.size):
            out[i] = fused._round(values[i], out[i])

    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 2**32, (200_000,), generator=gen, dtype=torch.int64).numpy().astype(np.uint32)
    raw[:4096] = (raw[:4096] & ~np.uint32(0xFFFF)) | np.uint32(0x8000)  # exact halfway
    raw[4096:8192] = (raw[4096:8192] & ~np.uint32(0xFFFF)) | np.uint32(0x7FFF)
    values = raw.view(np.float32)
    values = np.concatenate([values[~np.isnan(values)], [0.0, -0.0, 3.4e38, -3.4e38, 1e-45, np.inf]])
    values = values.astype(np.float32)
    out = np.empty(values.size, np.uint16)
    round_all(values, out)
    expect = torch.from_numpy(values).to(bf16).view(torch.uint16).numpy()
    assert np.array_equal(out, expect)
    nan = np.empty(1, np.uint16)
    round_all(np.array([np.nan], np.float32), nan)
    assert nan[0] == torch.full((64,), float("nan")).to(bf16).view(torch.uint16)[0].item()  # 0xFFFF


@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize(
    "method, extra",
    [
        ("task_arithmetic", {}),
        ("task_arithmetic", {"normalize": True, "lambda": 0.7}),
        ("ties", {"density": [1.0, 1.0, 1.0, None]}),  # nothing pruned: deltas made in the loop
        ("dare_linear", {"density": [1.0, 1.0, 1.0, None], "normalize": True}),
        ("ties", {}),
        ("ties", {"rescale": True}),
        ("dare_ties", {}),
        ("dare_linear", {"normalize": True}),
        ("breadcrumbs", {}),
        ("breadcrumbs_ties", {"lambda": 0.8}),
        ("della", {"epsilon": [0.1, 0.2, 0.05, None]}),
        ("della", {"epsilon": [0.3, 0.1, 0.4, None], "rescale": False, "lambda": 1.1}),
        ("della_linear", {"epsilon": [0.1, 0.2, 0.05, None], "normalize": True}),
    ],
)
def test_gta_through_the_compiled_loops_is_the_eager_ops(monkeypatch, dtype, method, extra):
    """A streamed merge (small chunks and blocks) through the compiled loops against the same
    merge with them switched off (the numpy/torch ops, checked against mergekit)."""
    from streammerge.execute import merge_tensors
    from streammerge.methods import SPECS

    gen = torch.Generator().manual_seed(11)
    base = (torch.randn(96, 700, generator=gen) * 0.02).to(dtype)
    xs = [
        (base.float() + torch.randint(-40, 41, base.shape, generator=gen) * 2**-12).to(dtype)
        for _ in range(3)
    ]
    params = {"weight": [0.5, -0.3, 0.9, None], **extra}
    names = {p.name for p in SPECS[method].params}
    if "density" in names and "density" not in extra:
        params["density"] = [0.4, 0.7, 0.55, None]
    kwargs = dict(base_index=3, chunk_elems=24_000, block_elems=8_192, name="layers.0.w", seed=3, **params)
    compiled = merge_tensors(method, [*xs, base], **kwargs)
    monkeypatch.setattr(tensors, "supports", lambda x: False)
    monkeypatch.setattr(direct, "loop", lambda job: None)  # no loop straight from the bytes
    eager = merge_tensors(method, [*xs, base], **kwargs)
    assert torch.equal(compiled.view(torch.uint8), eager.view(torch.uint8))


@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_variance_is_torch_var_over_the_model_axis(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    xs = (torch.randn(rows, fused.TILE + 99, generator=gen) * 0.01).to(dtype)
    xs[:, ::7] = 0
    xs[0, ::11] = -0.0
    xs[-1, ::13] = xs[0, ::13]
    xs[0, 3], xs[-1, 4], xs[0, 5] = float("inf"), float("nan"), torch.finfo(dtype).max
    out = torch.empty(xs.shape[1], dtype=dtype)
    fused.variance(tensors.bits(xs).reshape(rows, -1), tensors.bits(out))
    expect = torch.var(xs, dim=0, unbiased=False)
    assert torch.equal(out.view(torch.uint8), expect.view(torch.uint8))


@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize("n_models", [1, 2, 3])
def test_sce_combine_is_its_eager_ops(dtype, n_models):
    from streammerge.methods.sce import _combine_eager

    gen = torch.Generator().manual_seed(n_models)
    n = fused.TILE + 77
    base = (torch.randn(n, generator=gen) * 0.02).to(dtype)
    tvs = (torch.randn(n_models, n, generator=gen) * 0.003).to(dtype)
    tvs[:, ::5] = 0
    tvs[0, ::7] = -0.0
    tvs[-1, ::11] = -tvs[0, ::11]
    base[::13] = -0.0
    tvs[0, 3], tvs[-1, 4] = float("nan"), float("inf")
    for weights in ([0.7, 0.2, 0.1][:n_models], [0.0] * n_models, [1e-7] * n_models):
        w = torch.tensor(weights, dtype=dtype)
        out = torch.empty_like(base)
        fused.sce_combine(
            tensors.bits(base), tensors.bits(tvs).reshape(n_models, -1), w.float().numpy(), tensors.bits(out)
        )
        expect = _combine_eager(base, tvs, w)
        assert torch.equal(out.view(torch.uint8), expect.view(torch.uint8)), weights


@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce_through_the_compiled_loops_is_the_eager_ops(monkeypatch, dtype, topk):
    from streammerge.execute import merge_tensors

    gen = torch.Generator().manual_seed(5)
    base = (torch.randn(64, 500, generator=gen) * 0.02).to(dtype)
    xs = [
        (base.float() + torch.randint(-30, 31, base.shape, generator=gen) * 2**-12).to(dtype)
        for _ in range(2)
    ]
    kwargs = dict(base_index=2, chunk_elems=12_000, block_elems=4_096, select_topk=topk)
    compiled = merge_tensors("sce", [*xs, base], **kwargs)
    monkeypatch.setattr(tensors, "supports", lambda x: False)
    monkeypatch.setattr(direct, "loop", lambda job: None)  # no loop straight from the bytes
    eager = merge_tensors("sce", [*xs, base], **kwargs)
    assert torch.equal(compiled.view(torch.uint8), eager.view(torch.uint8))


def test_declared_loops_compile_their_signatures_on_first_call():
    """A loop compiles (or loads from the cache) at its first call, not at import, for its
    declared signatures only: Python floats are converted to float32 as numba.njit(sigs)
    converts them, never compiled as float64; arguments of no declared type are an error;
    threads making the first call together compile it once."""
    from concurrent.futures import ThreadPoolExecutor

    @fused.declared(["float32(float32, float32)"])
    def add(a, b):
        return a + b

    assert len(add.overloads) == 0
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: add(0.1, 0.2), range(8)))
    assert results == [float(np.float32(0.1) + np.float32(0.2))] * 8  # 0.30000001192092896
    assert sorted(str(sig) for sig in add.overloads) == ["(float32, float32)"]
    with pytest.raises(TypeError, match="No matching definition"):
        add("x", 1.0)
    assert len(add.overloads) == 1


def test_the_kernel_modules_compile_nothing_at_import():
    """Importing every kernel module compiles (or loads) no loop: a merge compiles what it
    runs. numba.njit(signatures) compiled each at import, ~70 s on 2 cores from an empty cache."""
    import subprocess
    import sys

    code = (
        "import numba, importlib\n"
        "from streammerge.methods import get_kernel, _KERNEL_MODULES\n"
        "get_kernel('linear')\n"
        "mods = ['fused', 'direct', *_KERNEL_MODULES]\n"
        "loops = [(m, n) for m in mods for n, o in vars(importlib.import_module('streammerge.methods.' + m)).items()\n"
        "         if isinstance(o, numba.core.registry.CPUDispatcher) and not o.targetoptions.get('inline')]\n"
        "print(len(loops), [f'{m}.{n}' for m, n in loops\n"
        "       if dict(vars(importlib.import_module('streammerge.methods.' + m)))[n].overloads])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split(" ", 1)
    assert int(out[0]) > 30 and out[1].strip() == "[]", out
