"""What planning needs to know about each method, without importing torch.

A ``MethodSpec`` lists the parameters a method takes, their scope and defaults, and the
inputs it accepts. Kernels live in their own modules; a test checks that every spec's
parameters match its kernel's keyword arguments, so the two cannot drift apart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Scope(enum.Enum):
    SHARED = "shared"  # one value per output tensor
    INPUT = "input"  # one value per input, the base included (linear weight)
    NON_BASE = "non_base"  # one value per non-base input; never resolved for the base


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    kind: type  # float or bool
    scope: Scope
    default: float | bool | None = None  # None: required
    minimum: float | None = None
    maximum: float | None = None

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True, slots=True)
class MethodSpec:
    name: str
    params: tuple[Param, ...]
    requires_base: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None
    # Elements of compute scratch the kernel allocates per block element, per input.
    # Used by the memory estimate: scratch ~ block * (per_input * n + fixed) * 4 bytes.
    scratch_per_input: int = 1
    scratch_fixed: int = 2
    summary: str = ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _weight(scope: Scope) -> Param:
    return Param("weight", float, scope)


SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        MethodSpec(
            "linear",
            (_weight(Scope.INPUT), Param("normalize", bool, Scope.SHARED, True)),
            summary="weighted average of the inputs",
        ),
        MethodSpec(
            "task_arithmetic",
            (
                _weight(Scope.NON_BASE),
                Param("normalize", bool, Scope.SHARED, False),
                Param("lambda", float, Scope.SHARED, 1.0),
            ),
            requires_base=True,
            min_inputs=1,
            scratch_per_input=2,
            summary="base + lambda * sum of weighted task vectors (x_i - base)",
        ),
        MethodSpec(
            "passthrough",
            (Param("scale", float, Scope.INPUT, 1.0),),
            max_inputs=1,
            summary="copy the single input, optionally scaled",
        ),
    ]
}
