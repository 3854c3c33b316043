"""Merge methods: torch-free specs (``spec``) and pure torch kernels, one module per family.

``get_kernel(name)`` imports the kernel modules on first use, so planning never pays
for torch.
"""

from __future__ import annotations

from collections.abc import Callable

from .spec import SPECS, MethodSpec, Param, Scope

__all__ = ["SPECS", "MethodSpec", "Param", "Scope", "get_kernel", "register"]

_KERNELS: dict[str, Callable] = {}
_KERNEL_MODULES = ("linear", "task_arithmetic", "passthrough")


def register(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` the kernel of method ``name`` (which must have a spec)."""

    def deco(fn: Callable) -> Callable:
        assert name in SPECS, f"kernel {name} has no MethodSpec"
        _KERNELS[name] = fn
        return fn

    return deco


def get_kernel(name: str) -> Callable:
    if not _KERNELS:
        import importlib

        for module in _KERNEL_MODULES:
            importlib.import_module(f"{__name__}.{module}")
    return _KERNELS[name]
