"""What planning needs to know about each method, without importing torch.

A ``MethodSpec`` lists the parameters a method takes, their scope and defaults, the
inputs it accepts, and how the executor must stream it: statistics passes before the
combine pass, and the block alignment those passes need. Kernels live in their own
modules; a test checks that every spec's parameters match its kernel's keyword
arguments, so the two cannot drift apart.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class Scope(enum.Enum):
    SHARED = "shared"  # one value per output tensor
    INPUT = "input"  # one value per input, the base included (linear weight)
    NON_BASE = "non_base"  # one value per non-base input; never resolved for the base


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    kind: type  # float, int, bool or str (one of ``choices``)
    scope: Scope
    default: float | bool | str | None = None  # None: required
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is None


def _no_passes(work_dtype: str, shared: dict) -> int:
    return 0


@dataclass(frozen=True, slots=True)
class MethodSpec:
    name: str
    params: tuple[Param, ...]
    requires_base: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None
    # Compute scratch per block element, in fp32 words: per input, and fixed.
    scratch_per_input: int = 1
    scratch_fixed: int = 2
    # By working dtype and shared parameters: the (per input, fixed) words when the combine
    # runs compiled loops (``fused``), which make few block-sized temporaries; None: eager.
    # Called with the working dtype, the shared parameters and the number of inputs.
    compiled: Callable[[str, dict, int], tuple[int, int] | None] = lambda work_dtype, shared, n_inputs: None
    # Whether a job without statistics passes runs straight from the read bytes into the
    # output with no block temporaries (``direct.loop``, torch-free). Called with the inputs'
    # stored dtype (one for all, else None), D, the output dtype, the shared and the
    # per-input parameters.
    direct: Callable[[str | None, str, str, dict, tuple], bool] = lambda *job: False
    # Statistics passes over the whole tensor before the combine pass, by working dtype
    # and shared parameters (e.g. an exact magnitude threshold needs 1 pass for 16-bit
    # deltas, 2 for fp32). Passes see fixed blocks of ``stat_block`` elements aligned to
    # the tensor start (whole rows when ``rows``), whatever the chunk size.
    passes: Callable[[str, dict], int] = _no_passes
    stat_block: int = 1 << 16
    # Blocks must hold whole rows (of the last dimension), by shared parameters.
    rows: Callable[[dict], bool] = lambda shared: False
    random: bool = False  # draws from the keyed generator (seed, tensor, element)
    summary: str = ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


@dataclass(frozen=True, slots=True)
class GTAPreset:
    """One member of mergekit's generalized task arithmetic family."""

    sparsifier: str | None  # magnitude | random | magnitude_outliers | della_magprune
    consensus: str | None  # "sum": TIES sign election on the weighted deltas
    normalize: bool
    rescale: bool
    summary: str


GTA: dict[str, GTAPreset] = {
    "task_arithmetic": GTAPreset(None, None, False, False,
                                 "base + lambda * sum of weighted task vectors (x_i - base)"),
    "ties": GTAPreset("magnitude", "sum", True, False,
                      "keep the top-density |delta| per model, elect signs, disjoint mean"),
    "dare_ties": GTAPreset("random", "sum", False, True,
                           "random drop (keep p = density), rescale, elect signs"),
    "dare_linear": GTAPreset("random", None, False, True, "random drop (keep p = density), rescale, sum"),
    "breadcrumbs": GTAPreset("magnitude_outliers", None, False, False,
                             "drop the largest gamma and the smallest |delta|, sum"),
    "breadcrumbs_ties": GTAPreset("magnitude_outliers", "sum", False, False,
                                  "breadcrumbs pruning, then TIES sign election"),
    "della": GTAPreset("della_magprune", "sum", True, True,
                       "rank-based random drop per row (p = density +- epsilon), elect signs"),
    "della_linear": GTAPreset("della_magprune", None, False, True,
                              "rank-based random drop per row, rescale, sum"),
}  # fmt: skip


# Fine-tunes the compiled gta combine adds into fp32 in the order torch's ``sum(dim=0)``
# does, by working dtype (measured on torch 2.13, CPU, 1-2 threads; bfloat16 checked up to
# 8): beyond them gta runs torch's eager sum.
FUSED_COMBINE_MODELS = {"F32": 4, "BF16": 8}


def combines_in_torch_order(work_dtype: str | None, n_models: int) -> bool:
    """Whether the compiled combines add ``n_models`` fine-tunes in working dtype
    ``work_dtype`` (a safetensors code) in torch's order (``FUSED_COMBINE_MODELS``)."""
    return n_models <= FUSED_COMBINE_MODELS.get(work_dtype, 0)


def _gta_passes(preset: GTAPreset) -> Callable[[str, dict], int]:
    def passes(work_dtype: str, shared: dict) -> int:
        n = 0
        if preset.sparsifier in ("magnitude", "magnitude_outliers"):
            n += 2 if work_dtype in ("F32", "F64") else 1  # radix select: 16 bits per pass
        if (
            preset.sparsifier is not None
            and shared.get("rescale")
            and shared.get("rescale_mode") != "density"
        ):
            n += 1  # L1 norms of the deltas before and after pruning
        return n

    return passes


def _gta_compiled(preset: GTAPreset) -> Callable[[str, dict, int], tuple[int, int] | None]:
    """gta's compiled loops run for bfloat16 and float32 unless a paper-faithful option or
    more fine-tunes than the compiled combine adds in torch's order (``FUSED_COMBINE_MODELS``)
    ask for the eager ops: a work-dtype copy of each input and its pruned delta, and the
    output (``gta.gta``); random pruning (dare, della) measures as one word per input (its
    pruned deltas are written in D, where bfloat16 is half a word), and task_arithmetic,
    which prunes nothing, combines the inputs themselves (no deltas)."""

    def compiled(work_dtype: str, shared: dict, n_inputs: int) -> tuple[int, int] | None:
        eager = (
            shared.get("rescale_mode") == "density"
            or shared.get("sign_election") == "unweighted"
            or not combines_in_torch_order(work_dtype, n_inputs - 1)
        )
        if eager or work_dtype not in ("BF16", "F32"):
            return None
        if preset.sparsifier is None or (
            preset.sparsifier in ("random", "della_magprune") and work_dtype == "BF16"
        ):
            return (1, 1)
        return (2, 1)

    return compiled


def direct_dtypes(stored: str | None, work: str, out: str) -> bool:
    """Whether compiled loops can merge inputs stored as ``stored`` straight into an output
    of ``out`` with the math in ``work``: all stored as the output is, bfloat16 or float32,
    D that dtype or float32 over bfloat16 (each element widened exactly on load)."""
    return stored == out in ("BF16", "F32") and (work == stored or (stored, work) == ("BF16", "F32"))


def _gta_direct(preset: GTAPreset) -> Callable[[str | None, str, str, dict, tuple], bool]:
    """``direct.loop`` runs where there are fine-tunes, none is pruned and the compiled
    combine adds them as torch does (TIES's weighted election included)."""

    def direct(stored: str | None, work: str, out: str, shared: dict, input_params: tuple) -> bool:
        densities = [p.get("density", 1.0) for p in input_params if "weight" in p]
        pruned = preset.sparsifier is not None and any(d < 1 for d in densities)
        unweighted = shared.get("sign_election") == "unweighted"
        few = 0 < len(densities) and combines_in_torch_order(work, len(densities))
        return direct_dtypes(stored, work, out) and not pruned and not unweighted and few

    return direct


def _gta_spec(name: str, preset: GTAPreset) -> MethodSpec:
    params = [
        Param("weight", float, Scope.NON_BASE),
        Param("normalize", bool, Scope.SHARED, preset.normalize),
        Param("lambda", float, Scope.SHARED, 1.0),
        Param("int8_mask", bool, Scope.SHARED, False),  # mergekit: mask dtype only, no effect
    ]
    if preset.sparsifier is not None:
        params += [
            Param("density", float, Scope.NON_BASE, 1.0, minimum=0.0, maximum=1.0),
            Param("rescale", bool, Scope.SHARED, preset.rescale),
            # streammerge's own: "density" divides kept deltas by their keep probability (the
            # DARE and DELLA papers) instead of mergekit's L1-norm-preserving factor
            Param("rescale_mode", str, Scope.SHARED, "l1", choices=("l1", "density")),
        ]
    if preset.consensus == "sum":
        # streammerge's own: "unweighted" elects signs from the pruned task vectors before
        # weighting, as the TIES paper does; mergekit elects from the weighted ones
        params.append(
            Param("sign_election", str, Scope.SHARED, "weighted", choices=("weighted", "unweighted"))
        )
    if preset.sparsifier == "magnitude_outliers":
        params.append(Param("gamma", float, Scope.NON_BASE, 0.01, minimum=0.0, maximum=1.0))
    if preset.sparsifier == "della_magprune":
        params.append(Param("epsilon", float, Scope.NON_BASE, 0.15, minimum=0.0, maximum=1.0))
    return MethodSpec(
        name, tuple(params), requires_base=True, scratch_per_input=3, scratch_fixed=4, compiled=_gta_compiled(preset),
        # 256K-element statistics blocks: large enough that two threads' numpy calls do not
        # queue on the GIL (64K: no gain from a second core); della's are whole rows
        stat_block=1 << 16 if preset.sparsifier == "della_magprune" else 1 << 18,
        passes=_gta_passes(preset), rows=lambda shared, p=preset: p.sparsifier == "della_magprune",
        direct=_gta_direct(preset),
        random=preset.sparsifier in ("random", "della_magprune"), summary=preset.summary,
    )  # fmt: skip


def _slerp_passes(work_dtype: str, shared: dict) -> int:
    return 2  # norms, then the dot product of the normalised tensors


def _nuslerp_stats(shared: dict) -> bool:
    """Flattened or row-wise (column vectors) nuslerp needs norm and cosine passes."""
    return shared.get("nuslerp_flatten", True) or shared.get("nuslerp_row_wise", False)


def _nuslerp_compiled(work_dtype: str, shared: dict, n_inputs: int) -> tuple[int, int] | None:
    """nuslerp's compiled loops run for bfloat16 and float32: a work-dtype copy of each
    input (none when it is already in D) and the output; per row also the two task
    vectors and the normalised products."""
    if work_dtype not in ("BF16", "F32"):
        return None
    return (1, 1) if _nuslerp_stats(shared) else (1, 4)


def _select_passes(work_dtype: str) -> int:
    """Radix select over the bit patterns: 16 bits per pass."""
    return 2 if work_dtype in ("F32", "F64") else 1


def _sce_passes(work_dtype: str, shared: dict) -> int:
    select = 0 < shared.get("select_topk", 1.0) < 1
    return (_select_passes(work_dtype) if select else 0) + 1  # + the mean squares


def _sce_compiled(work_dtype: str, shared: dict, n_inputs: int) -> tuple[int, int] | None:
    """sce's compiled combine runs for bfloat16 and float32 up to ``FUSED_COMBINE_MODELS``
    fine-tunes: the task vectors and their masked copy (a word per input, counting the base
    as the bound), the variances and the output (measured: peak RSS 4-5% under the
    estimate at 1.5 and 2.9 GB per model)."""
    return (1, 2) if combines_in_torch_order(work_dtype, n_inputs - 1) else None


def _on_bf16_f32(per_input: int, fixed: int) -> Callable[[str, dict, int], tuple[int, int] | None]:
    """``compiled`` for a method whose loops run for bfloat16 and float32 whatever its
    parameters: ``per_input`` words per input (a work-dtype copy of each, when it converts)
    and ``fixed`` more (the output, and the method's own scratch)."""
    return lambda work_dtype, shared, n_inputs: (per_input, fixed) if work_dtype in ("BF16", "F32") else None


SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        MethodSpec(
            "linear",
            (Param("weight", float, Scope.INPUT), Param("normalize", bool, Scope.SHARED, True)),
            summary="weighted average of the inputs",
            compiled=_on_bf16_f32(1, 1),  # the output
            direct=lambda stored, work, out, shared, input_params: direct_dtypes(stored, work, out),
        ),
        *(_gta_spec(name, preset) for name, preset in GTA.items()),
        MethodSpec(
            "slerp",
            (Param("t", float, Scope.SHARED, minimum=0.0, maximum=1.0),),
            requires_base=True,
            min_inputs=2,
            max_inputs=2,
            passes=_slerp_passes,
            stat_block=1 << 20,
            # eager (float64, or off the CPU): its fp32 copies and products
            scratch_per_input=3,
            scratch_fixed=2,
            # compiled loops: a float32 copy of each input in the norms' pass (and a D copy
            # in the combine when it converts), the products or the output
            compiled=_on_bf16_f32(1, 1),
            summary="spherical interpolation from the base (t = 0) to the other model (t = 1)",
        ),  # fmt: skip
        MethodSpec(
            "nuslerp",
            (
                Param("weight", float, Scope.NON_BASE),
                Param("nuslerp_flatten", bool, Scope.SHARED, True),
                Param("nuslerp_row_wise", bool, Scope.SHARED, False),
            ),
            min_inputs=2,
            max_inputs=3,
            scratch_per_input=3,
            scratch_fixed=3,  # measured (eager rows mode, 1.5-6 GB per model)
            compiled=_nuslerp_compiled,
            passes=lambda work_dtype, shared: 2 if _nuslerp_stats(shared) else 0,
            rows=lambda shared: not _nuslerp_stats(shared),
            summary="slerp between two models (or their task vectors), t from their weights",
        ),  # fmt: skip
        MethodSpec(
            "multislerp",
            (
                Param("weight", float, Scope.NON_BASE),
                Param("normalize_weights", bool, Scope.SHARED, True),
                Param("eps", float, Scope.SHARED, 1e-8, minimum=0.0),
            ),
            scratch_per_input=4,
            scratch_fixed=4,
            compiled=_on_bf16_f32(1, 1),  # the output
            passes=lambda work_dtype, shared: 2,  # the norms, then the norm of the mean direction
            stat_block=1 << 17,
            summary="spherical barycentre of several models (or task vectors from a base), by weight",
        ),  # fmt: skip
        MethodSpec(
            "karcher",
            (
                Param("max_iter", int, Scope.SHARED, 10, minimum=0),
                Param("tol", float, Scope.SHARED, 1e-5, minimum=0.0),
            ),
            min_inputs=2,
            # the combine's fp32 copy of an input, its product and the running sum, the
            # direction in D and its widened product (measured: 1.5-6 GB per model)
            scratch_per_input=1,
            scratch_fixed=2,
            passes=lambda work_dtype, shared: 1,  # the Gram matrix of the inputs
            summary="Riemannian (Karcher) mean of the inputs' directions, times their mean norm",
        ),  # fmt: skip
        MethodSpec(
            "sce",
            (
                Param("select_topk", float, Scope.SHARED, 1.0, minimum=0.0, maximum=1.0),
                Param("int8_mask", bool, Scope.SHARED, False),  # mergekit: mask dtype only, no effect
            ),
            requires_base=True,
            scratch_per_input=4,
            scratch_fixed=6,
            compiled=_sce_compiled,
            passes=_sce_passes,
            stat_block=1 << 18,  # 64K: per-call overhead of a dozen small ops was a third of the pass
            summary="keep high-variance positions, elect signs, weight models by their delta energy",
        ),  # fmt: skip
        MethodSpec(
            "arcee_fusion",
            (),
            requires_base=True,
            min_inputs=2,
            max_inputs=2,
            scratch_per_input=4,
            scratch_fixed=8,
            compiled=_on_bf16_f32(1, 2),  # the output, a statistics block's row softmaxes
            passes=lambda work_dtype, shared: _select_passes(work_dtype),
            # whole rows of about 256K elements: the softmax's dozen torch calls per block
            # would cost more than the compiled loops at 64K
            stat_block=1 << 18,
            rows=lambda shared: True,
            summary="take the other model's changes where their KL-weighted importance is an outlier",
        ),  # fmt: skip
        MethodSpec(
            "model_stock",
            (Param("filter_wise", bool, Scope.SHARED, False),),
            requires_base=True,
            min_inputs=3,
            scratch_per_input=2,
            scratch_fixed=4,
            # compiled: a work-dtype copy of each input (when it converts) and the output
            compiled=lambda work_dtype, shared, n_inputs: (
                None if shared.get("filter_wise") or work_dtype not in ("BF16", "F32") else (1, 1)
            ),
            passes=lambda work_dtype, shared: 0 if shared.get("filter_wise") else 1,
            stat_block=1 << 17,
            rows=lambda shared: bool(shared.get("filter_wise")),
            summary="base + t * (mean fine-tune - base), t from the angle between the deltas",
        ),  # fmt: skip
        MethodSpec(
            "ram",
            (Param("epsilon", float, Scope.SHARED, 1e-5, minimum=0.0),),
            requires_base=True,
            scratch_per_input=4,
            scratch_fixed=6,
            compiled=_on_bf16_f32(1, 1),  # the output
            summary="changes made by one model kept whole, shared changes averaged",
        ),  # fmt: skip
        MethodSpec(
            "ramplus_tl",
            (
                Param("r", float, Scope.SHARED, 0.1),
                Param("alpha", float, Scope.SHARED, 0.2, minimum=0.0),
                Param("epsilon", float, Scope.SHARED, 1e-5, minimum=0.0),
            ),
            requires_base=True,
            scratch_per_input=5,
            scratch_fixed=6,
            compiled=_on_bf16_f32(1, 2),  # the float32 result and its cast to the output dtype
            passes=lambda work_dtype, shared: 1,
            summary="ram with each model's unique changes boosted by its overlap ratio",
        ),  # fmt: skip
        MethodSpec(
            "nearswap",
            (Param("t", float, Scope.SHARED, minimum=0.0),),
            requires_base=True,
            min_inputs=2,
            max_inputs=2,
            scratch_per_input=2,
            scratch_fixed=4,
            compiled=_on_bf16_f32(1, 1),  # the output
            summary="take the other model where it is within t of the base, blend elsewhere",
        ),  # fmt: skip
        MethodSpec(
            "passthrough",
            (Param("scale", float, Scope.INPUT, 1.0),),
            max_inputs=1,
            summary="copy the single input, optionally scaled",
        ),
    ]
}
