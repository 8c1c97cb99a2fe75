"""What every kernel family produces, and the C++ spellings of spec values."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..quant import QK_K, QuantType, layout
from ..spec import DEFAULT_GEMV_WARPS, ActivationDtype, Arch, MoeSpec

THREADS_PER_WARP = 32

ACT_CTYPE = {ActivationDtype.F32: "float", ActivationDtype.F16: "__half", ActivationDtype.BF16: "__nv_bfloat16"}
ACT_BYTES = {ActivationDtype.F32: 4, ActivationDtype.F16: 2, ActivationDtype.BF16: 2}
# Tensor-core operand type: f32 activations are rounded to f16 for the prefill GEMMs.
MMA_CTYPE = {ActivationDtype.F32: "__half", ActivationDtype.F16: "__half", ActivationDtype.BF16: "__nv_bfloat16"}

# Largest dynamic shared memory one block may opt into, per architecture.
SMEM_LIMIT = {Arch.SM_80: 163 * 1024, Arch.SM_86: 99 * 1024, Arch.SM_89: 99 * 1024, Arch.SM_90: 227 * 1024}
ARCH_NUMBER = {Arch.SM_80: 800, Arch.SM_86: 860, Arch.SM_89: 890, Arch.SM_90: 900}


@dataclass(frozen=True)
class Arg:
    name: str
    ctype: str
    written_ahead: bool = False
    """A kernel ahead of this one in the stream may still be writing it when this one starts (programmatic
    dependent launch: this kernel reads it only after its grid_wait). Such a pointer is not __restrict__: through
    a const __restrict__ pointer the loads are ld.global.nc, data the kernel may take as fixed for its whole run,
    and ptxas may then issue them before griddepcontrol.wait (it did so for gather_x's plan loads once its code
    changed: docs/perf-notes.md, sixty-first session). Plain loads stay behind the wait."""

    @property
    def declaration(self) -> str:
        """The parameter as the kernel declares it: pointers are __restrict__ (no argument aliases another),
        except those written ahead."""
        restrict = self.ctype.endswith("*") and not self.written_ahead
        return f"{self.ctype} __restrict__ {self.name}" if restrict else f"{self.ctype} {self.name}"


GATE_UP_WEIGHTS = (Arg("w_gate", "const u8*"), Arg("w_gate_d", "const __half*"),
                   Arg("w_up", "const u8*"), Arg("w_up_d", "const __half*"))
"""The gate and up expert stacks as every gate+up kernel takes them (bytes, then Q6_K block scales)."""
DOWN_WEIGHTS = (Arg("w_down", "const u8*"), Arg("w_down_d", "const __half*"))


ALIGNED_PLAN = (Arg("sorted_ids", "const int*"), Arg("block_expert", "const int*"), Arg("block_a_row", "const int*"),
                Arg("plan", "const int*"), Arg("num_pairs", "int"))
"""align's outputs, as every kernel over its blocks takes them: which slots are real, each block's
expert, and the row of a that holds its first slot (a has a row per real slot, no padding rows).
As the down kernels take them: complete before they start (the gate+up kernel ahead of them lets them
launch only after its own wait), so they may read them before their own wait."""
ALIGNED_PLAN_WRITTEN_AHEAD = tuple(replace(a, written_ahead=a.ctype.endswith("*")) for a in ALIGNED_PLAN)
"""align's outputs as gather_x and the gate+up kernels take them: align may still be writing them when
these start (align lets its dependents launch before it writes, and gather_x before its own wait)."""


PAIR_ROW = Arg("pair_row", "int*")
"""Each pair's row of y where the down kernels store y by a's row (stream.py y_by_row): written by the
gather_x kernel, read by the combine."""


def aligned_gate_up_args(dtype: ActivationDtype) -> tuple[Arg, ...]:
    """The arguments of a gate+up kernel over align's blocks (prefill GEMM, stream): x in the
    tensor-core type, the plan, the weights, and a in sorted order (real slots only)."""
    return (Arg("x", f"const {MMA_CTYPE[dtype]}*"), *ALIGNED_PLAN_WRITTEN_AHEAD, *GATE_UP_WEIGHTS,
            Arg("a", f"{MMA_CTYPE[dtype]}*"))


def aligned_down_args(dtype: ActivationDtype) -> tuple[Arg, ...]:
    """The arguments of a down kernel over align's blocks (prefill GEMM, stream): a in sorted
    order (real slots only), the plan, the weights, and y by pair (row t * k + j)."""
    return (Arg("a", f"const {MMA_CTYPE[dtype]}*"), *ALIGNED_PLAN, *DOWN_WEIGHTS, Arg("y", f"{ACT_CTYPE[dtype]}*"))


DEFAULT_VARIANT = "default"


@dataclass(frozen=True)
class KernelSpec:
    """One generated kernel: its uri names the file, the symbol, the cache key and the manifest entry.

    `variant` names the kernel's variant within its family (e.g. w8, n64); the family's
    default kernels, the ones the spec's own keys describe, have `default` set. A family with
    one kernel per block size has one kernel per (variant, block size).
    """

    uri: str
    family: str
    template: str
    values: dict[str, Any]
    args: tuple[Arg, ...]
    launch: dict[str, Any] = field(default_factory=dict)
    variant: str = DEFAULT_VARIANT
    default: bool = True
    archs: tuple[str, ...] | None = None
    """The target archs this kernel can run on; None: all of the spec's."""

    @property
    def signature(self) -> str:
        """The extern "C" parameter list, written once here and rendered into the template."""
        return ", ".join(a.declaration for a in self.args)

    def manifest_entry(self, source_sha256: str, template_sha256: str) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "symbol": self.uri,
            "family": self.family,
            "variant": self.variant,
            "default": self.default,
            "archs": list(self.archs) if self.archs is not None else None,
            "file": f"{self.uri}.cu",
            "template": self.template,
            "template_sha256": template_sha256,
            "source_sha256": source_sha256,
            "launch": self.launch,
            "args": [{"name": a.name, "type": a.ctype} for a in self.args],
        }


def quant_tag(*types: QuantType) -> str:
    """q4_k for one type, q4_k_q6_k when two projections read together differ."""
    distinct = list(dict.fromkeys(types))
    return "_".join(t.value for t in distinct)


def pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def lanes_per_row(chunks_per_row: int) -> int:
    """Lanes sharing one row in a GEMV: enough for one chunk each, a power of two, at most a warp."""
    return min(THREADS_PER_WARP, pow2_at_least(chunks_per_row))


def chunks_per_row(qt: QuantType, in_dim: int) -> int:
    return in_dim // QK_K * layout(qt).gemv_chunks_per_block


def quant_struct(qt: QuantType) -> str:
    return layout(qt).cuda_struct


def gpu_block_bytes(qt: QuantType) -> int:
    return layout(qt).gpu_block_bytes


GEMM_ROW_ELEMS = 256 + 8
"""One k-step of a prefill GEMM's shared-memory row (16-bit elements), padded as in gemm_common."""


def gemm_smem_bytes(block_size: int, stages: int, quant_bytes_per_kstep: int, dequant_rows: int) -> int:
    """Dynamic shared memory of a prefill GEMM: activation and quantized-weight stages, one dequantized tile."""
    activations = stages * block_size * GEMM_ROW_ELEMS * 2
    return activations + stages * quant_bytes_per_kstep + dequant_rows * GEMM_ROW_ELEMS * 2


def pipeline_smem(spec: MoeSpec, field_hint: str, smem_for_stages, required: bool = True
                  ) -> tuple[dict[str, int], list[int]]:
    """Dynamic shared memory per target arch, and the archs that need the one-stage pipeline.

    A `required` kernel (a default one) must fit every target arch; a variant is kept for the
    archs it fits (the returned dict names them) and must fit at least one.
    """
    per_arch: dict[str, int] = {}
    single: list[int] = []
    for arch in spec.target_archs:
        limit = SMEM_LIMIT[arch]
        if smem_for_stages(2) <= limit:
            per_arch[arch.value] = smem_for_stages(2)
        elif smem_for_stages(1) <= limit:
            per_arch[arch.value] = smem_for_stages(1)
            single.append(ARCH_NUMBER[arch])
        elif required:
            raise ValueError(
                f"spec {spec.name}: a prefill tile needs {smem_for_stages(1)} bytes of shared memory, more than "
                f"{arch.value} allows ({limit}); lower {field_hint} or drop {arch.value} from target_archs"
            )
    if not per_arch:
        raise ValueError(
            f"spec {spec.name}: a prefill tile needs {smem_for_stages(1)} bytes of shared memory, more than any "
            f"target arch allows; lower {field_hint}"
        )
    return per_arch, sorted(single)


@dataclass(frozen=True)
class GemmTile:
    """One prefill GEMM kernel's tile: its width, block size, and shared memory per target arch."""

    n: int
    block_size: int
    default: bool
    smem_per_arch: dict[str, int]
    single_stage_archs: list[int]

    @property
    def archs(self) -> tuple[str, ...] | None:
        """None for a default kernel (it must fit every target arch), else the archs this variant fits."""
        return None if self.default else tuple(self.smem_per_arch)


def gemm_tiles(spec: MoeSpec, key: str, default_n: int, variant_ns: tuple[int, ...], smem_for) -> list[GemmTile]:
    """Every (tile width, block size) of a prefill GEMM family: the width prefill.<key> and each
    width in variants.<key>, times the spec's block sizes. smem_for(block_size, n, stages) -> bytes."""
    out = []
    for n in (default_n, *variant_ns):
        default = n == default_n
        hint = f"prefill.block_sizes or prefill.{key}" if default else f"remove {n} from variants.{key}"
        for bs in spec.prefill.block_sizes:
            per_arch, single = pipeline_smem(spec, hint, lambda st, bs=bs, n=n: smem_for(bs, n, st), required=default)
            out.append(GemmTile(n, bs, default, per_arch, single))
    return out


GEMM_THREADS = 128


def gemm_kernel(tile: GemmTile, family: str, uri: str, values: dict[str, Any], args: tuple[Arg, ...],
                out_dim: int) -> KernelSpec:
    """A prefill GEMM kernel of `family` for one tile; `values` are the family's own template values."""
    return KernelSpec(
        uri=uri,
        family=family,
        template=f"{family}.cu.j2",
        variant=f"n{tile.n}",
        default=tile.default,
        archs=tile.archs,
        values={**values, "BS": tile.block_size, "THREADS": GEMM_THREADS,
                "SINGLE_STAGE_ARCHS": tile.single_stage_archs},
        args=args,
        launch={"threads": GEMM_THREADS, "grid": "min(tiles for the largest plan, resident CTAs)",
                "block_size": tile.block_size, "tile_n": tile.n, "n_tiles": out_dim // tile.n,
                "smem_bytes": tile.smem_per_arch},
    )


def gemv_kernels(spec: MoeSpec, family: str, uri_of, lanes_per_row: int, values: dict[str, Any],
                 args: tuple[Arg, ...], grid: str) -> list[KernelSpec]:
    """A decode GEMV family's kernels, one per warp count (the default and variants.gemv_warps).

    uri_of(warps) names each kernel; `values` are the family's own template values."""
    out = []
    for warps in (DEFAULT_GEMV_WARPS, *spec.variants.gemv_warps):
        rows_per_cta = warps * (THREADS_PER_WARP // lanes_per_row)
        out.append(KernelSpec(
            uri=uri_of(warps),
            family=family,
            template=f"{family}.cu.j2",
            variant=f"w{warps}",
            default=warps == DEFAULT_GEMV_WARPS,
            values={**values, "LPR": lanes_per_row, "WARPS": warps, "ROWS_PER_CTA": rows_per_cta},
            args=args,
            launch={"threads": warps * THREADS_PER_WARP, "grid": grid, "rows_per_cta": rows_per_cta,
                    "lanes_per_row": lanes_per_row, "smem_bytes": 0},
        ))
    return out
