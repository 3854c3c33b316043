"""Torch tensors as the compiled loops (``fused``) take them: integer views of their bits,
their data addresses, and whether a loop can take them at all; and the torch dtype of each
safetensors dtype code. The kernels' (and the executor's) torch room: ``fused`` and
``direct`` stay torch-free.
"""

from __future__ import annotations

import numpy as np
import torch

DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32,
    "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
BITS = {torch.bfloat16: torch.uint16, torch.float32: torch.uint32}  # the loops' dtypes, as bits
KEY = {torch.bfloat16: np.uint16, torch.float32: np.uint32}  # magnitude keys, as the loops take them
CODE = {torch.bfloat16: "BF16", torch.float32: "F32"}  # the loops' dtypes as safetensors codes


def supports(x: torch.Tensor) -> bool:
    """Whether the loops take ``x``: a CPU tensor of bfloat16 or float32."""
    return x.dtype in BITS and x.device.type == "cpu"


def bits(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor's elements as a flat numpy integer view (a view when contiguous, so
    a loop's writes land in the tensor)."""
    return x.contiguous().view(BITS[x.dtype]).reshape(-1).numpy()


def one_thread(fn, *args):
    """``fn(*args)`` with torch on one thread: a reduction's bits, and some kernels' speed,
    depend on its thread count. The count is restored after."""
    threads = torch.get_num_threads()
    if threads == 1:
        return fn(*args)
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def addresses(xs: list[torch.Tensor]) -> np.ndarray:
    """The data addresses of contiguous CPU tensors, as a loop taking any number of models
    wants them. The caller keeps the tensors alive while the loop runs."""
    if not all(x.is_contiguous() and x.device.type == "cpu" for x in xs):
        raise ValueError("addresses: every tensor must be a contiguous CPU tensor")
    return np.array([x.data_ptr() for x in xs], np.int64)
