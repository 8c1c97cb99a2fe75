"""What every kernel family produces, and the C++ spellings of spec values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..spec import ActivationDtype, Arch, MoeSpec, QuantType

THREADS_PER_WARP = 32

QUANT_STRUCT = {QuantType.Q4_K: "fg::Q4K", QuantType.Q6_K: "fg::Q6K"}
CHUNKS_PER_BLOCK = {QuantType.Q4_K: 8, QuantType.Q6_K: 4}
GPU_BLOCK_BYTES = {QuantType.Q4_K: 144, QuantType.Q6_K: 208}

ACT_CTYPE = {ActivationDtype.F32: "float", ActivationDtype.F16: "__half", ActivationDtype.BF16: "__nv_bfloat16"}
ACT_BYTES = {ActivationDtype.F32: 4, ActivationDtype.F16: 2, ActivationDtype.BF16: 2}
# Tensor-core operand type: f32 activations are rounded to f16 for the prefill GEMMs.
MMA_CTYPE = {ActivationDtype.F32: "__half", ActivationDtype.F16: "__half", ActivationDtype.BF16: "__nv_bfloat16"}
MMA_DTYPE = {ActivationDtype.F32: "f16", ActivationDtype.F16: "f16", ActivationDtype.BF16: "bf16"}

# Largest dynamic shared memory one block may opt into, per architecture.
SMEM_LIMIT = {Arch.SM_80: 163 * 1024, Arch.SM_86: 99 * 1024, Arch.SM_89: 99 * 1024, Arch.SM_90: 227 * 1024}
ARCH_NUMBER = {Arch.SM_80: 800, Arch.SM_86: 860, Arch.SM_89: 890, Arch.SM_90: 900}


@dataclass(frozen=True)
class Arg:
    name: str
    ctype: str


@dataclass(frozen=True)
class KernelSpec:
    """One generated kernel: its uri names the file, the symbol, the cache key and the manifest entry."""

    uri: str
    family: str
    template: str
    values: dict[str, Any]
    args: tuple[Arg, ...]
    launch: dict[str, Any] = field(default_factory=dict)

    def manifest_entry(self, source_sha256: str, template_sha256: str) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "symbol": self.uri,
            "family": self.family,
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
    return in_dim // 256 * CHUNKS_PER_BLOCK[qt]


GEMM_ROW_ELEMS = 256 + 8
"""One k-step of a prefill GEMM's shared-memory row (16-bit elements), padded as in gemm_common."""


def gemm_smem_bytes(block_size: int, stages: int, quant_bytes_per_kstep: int, dequant_rows: int) -> int:
    """Dynamic shared memory of a prefill GEMM: activation and quantized-weight stages, one dequantized tile."""
    activations = stages * block_size * GEMM_ROW_ELEMS * 2
    return activations + stages * quant_bytes_per_kstep + dequant_rows * GEMM_ROW_ELEMS * 2


def pipeline_smem(spec: MoeSpec, field_hint: str, smem_for_stages) -> tuple[dict[str, int], list[int]]:
    """Dynamic shared memory per target arch, and the archs that need the one-stage pipeline."""
    per_arch: dict[str, int] = {}
    single: list[int] = []
    for arch in spec.target_archs:
        limit = SMEM_LIMIT[arch]
        if smem_for_stages(2) <= limit:
            per_arch[arch.value] = smem_for_stages(2)
        elif smem_for_stages(1) <= limit:
            per_arch[arch.value] = smem_for_stages(1)
            single.append(ARCH_NUMBER[arch])
        else:
            raise ValueError(
                f"spec {spec.name}: a prefill tile needs {smem_for_stages(1)} bytes of shared memory, more than "
                f"{arch.value} allows ({limit}); lower {field_hint} or drop {arch.value} from target_archs"
            )
    return per_arch, sorted(single)
