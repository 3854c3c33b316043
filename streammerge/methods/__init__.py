"""Merge methods: torch-free specs (``spec``) and pure torch kernels, one module per family.

A kernel's ``combine`` maps one block of the inputs (same shape, working dtype D, base at
``base_index``) to the merged block. Methods that need whole-tensor statistics also give
``fold(i, acc, xs, ...) -> acc`` and ``finish(i, acc, ...) -> stat`` for each statistics
pass ``i``: the executor folds every block of the tensor, in order, then hands the
finished statistics to the next pass and to ``combine`` as ``stats``. A kernel may also
ask for ``ctx`` (a ``BlockContext``: tensor name, shape, block offset, seed) and
``state`` (a dict that lives for one pass over one tensor).

Using every core without changing a bit: a kernel that gives ``reduce(i, acc, partial)
-> acc`` has its statistics blocks folded in runs of consecutive blocks on all threads
(each run from ``None``) and the runs' partials joined in order (``acc`` is None before
the first); its ``fold`` keeps no ``state``, and must give the same bits however the blocks
are grouped into runs (integer counts, or per-block terms summed in ``finish``). With
``spans`` it is also handed a whole run at once, ``span`` elements per statistics block
(when the inputs are already in D), and must give what folding its blocks one by one
gives: a call per block costs more than a 64K-element block's compiled loop where
threads share the GIL. Combine blocks are independent, so they run one per thread at once, unless the kernel registers
as ``ordered`` (its combine keeps ``state`` from block to block).

Straight from the read bytes, with no kernel and no torch: jobs of linear, the gta family
and model_stock whose inputs are stored as the loops take them run ``direct``'s compiled
loops on the bytes as read, into the output dtype, with exactly the bits of converting
to D, combining and converting the result (CPU only: it saves a conversion of every
input, a copy of the result and torch's start-up).

``get_kernel(name)`` imports the kernel modules on first use, so planning never pays
for torch, nor does a merge whose jobs all run ``direct`` loops or copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .spec import GTA, SPECS, MethodSpec, Param, Scope

__all__ = [
    "GTA", "SPECS", "BlockContext", "Kernel", "MethodSpec", "Param", "Scope", "get_kernel", "register", "row_elems",
]  # fmt: skip

_KERNELS: dict[str, Kernel] = {}
_KERNEL_MODULES = (
    "linear", "gta", "slerp", "nuslerp", "multislerp", "karcher", "sce", "model_stock", "ram", "nearswap",
    "arcee_fusion", "passthrough",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class BlockContext:
    method: str
    tensor: str  # output tensor name (keys the random streams)
    shape: tuple[int, ...]  # the whole tensor's shape
    offset: int  # flat index of the block's first element
    seed: int
    work_dtype: object = None  # the torch.dtype of D

    @property
    def row(self) -> int:
        return row_elems(self.shape)


def row_elems(shape: tuple[int, ...]) -> int:
    """Elements per row (the last dimension); a 1-D tensor is one row (at least 1)."""
    return shape[-1] if len(shape) >= 2 else max(math.prod(shape), 1)


@dataclass(frozen=True, slots=True)
class Kernel:
    combine: Callable
    fold: Callable | None = None
    finish: Callable | None = None
    reduce: Callable | None = None
    ordered: bool = False  # combine sees a tensor's blocks in order (it keeps ``state``)
    spans: bool = False  # fold takes a run of statistics blocks at once (keyword ``span``)


def register(
    name: str,
    *,
    fold: Callable | None = None,
    finish: Callable | None = None,
    reduce: Callable | None = None,
    ordered: bool = False,
    spans: bool = False,
):
    """Decorator: make ``fn`` the combine kernel of method ``name`` (which needs a spec)."""

    def deco(fn: Callable) -> Callable:
        assert name in SPECS, f"kernel {name} has no MethodSpec"
        _KERNELS[name] = Kernel(fn, fold, finish, reduce, ordered, spans)
        return fn

    return deco


def get_kernel(name: str) -> Kernel:
    if name not in _KERNELS:  # a kernel module imported on its own registers only its own
        import importlib

        from .heap import keep_freed_heap

        keep_freed_heap()  # kernels are about to make block-sized temporaries
        for module in _KERNEL_MODULES:
            importlib.import_module(f"{__name__}.{module}")
        from . import parallel

        parallel.torch_loaded()  # the kernels brought torch: give it --threads
    return _KERNELS[name]
