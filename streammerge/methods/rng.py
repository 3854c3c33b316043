"""Order-free randomness: uniform numbers keyed by (seed, tensor, stream) and element index.

Element i of a tensor always gets the same number, however the tensor is chunked,
threaded, or ordered among other tensors, on any device: the number is a pure function
of the key and i. Philox4x64 (numpy) yields 8 uint32 per counter step, so element i is
uint32 number ``i % 8`` of counter step ``i // 8``; its top 24 bits make a float in [0, 1).
"""

from __future__ import annotations

import hashlib

import numpy as np


def philox_key(seed: int, tensor: str, stream: int) -> np.ndarray:
    """128-bit key from the seed, the output tensor's name and a stream number (the model)."""
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{stream}".encode(), digest_size=16).digest()
    return np.frombuffer(digest, dtype=np.uint64).copy()


def uniform_bits24(key: np.ndarray, start: int, n: int) -> np.ndarray:
    """The top 24 bits (uint32) of elements ``[start, start + n)``' random numbers."""
    step, skip = divmod(start, 8)
    gen = np.random.Philox(key=key, counter=np.array([step, 0, 0, 0], dtype=np.uint64))
    raw = gen.random_raw((skip + n + 7) // 8 * 4).astype(np.uint64, copy=False)
    return raw.view(np.uint32)[skip : skip + n] >> 8


def uniform(key: np.ndarray, start: int, n: int) -> np.ndarray:
    """float64 uniforms in [0, 1) on a 2^-24 grid for elements ``[start, start + n)``."""
    return uniform_bits24(key, start, n).astype(np.float64) * 2.0**-24
