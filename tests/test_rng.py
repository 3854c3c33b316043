"""rng: the keyed counter stream behind DARE and DELLA masks."""

from __future__ import annotations

import numpy as np

from streammerge.methods.rng import stream_key, uniform, uniform_bits24


def test_any_window_of_the_stream_is_the_same_numbers():
    key = stream_key(0, "model.layers.0.mlp.up_proj.weight", 1)
    whole = uniform_bits24(key, 0, 10_001)
    for start, n in [(0, 1), (1, 1), (1, 10_000), (7, 333), (5000, 5001), (9_999, 2)]:
        assert np.array_equal(uniform_bits24(key, start, n), whole[start : start + n]), (start, n)


def test_keys_differ_by_seed_tensor_and_stream():
    keys = [stream_key(0, "a", 0), stream_key(1, "a", 0), stream_key(0, "b", 0), stream_key(0, "a", 1)]
    streams = [uniform_bits24(k, 0, 1000) for k in keys]
    for i in range(len(streams)):
        for j in range(i + 1, len(streams)):
            assert (streams[i] == streams[j]).mean() < 0.01


def test_uniform_is_uniform_and_uncorrelated():
    u = uniform(stream_key(3, "t", 2), 0, 1 << 20)
    assert u.min() >= 0 and u.max() < 1
    counts = np.bincount((u * 64).astype(int), minlength=64)
    expected = len(u) / 64
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 120  # 63 degrees of freedom: p ~ 1e-5
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01  # neighbours (same and next counter)
    assert abs(np.corrcoef(u[0::2], u[1::2])[0, 1]) < 0.01  # the two halves of one counter
