"""Prefill grouped dequant-GEMM family for gate+up with SiLU fused: one kernel per block size."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import GPU_BLOCK_BYTES, MMA_CTYPE, QUANT_STRUCT, Arg, KernelSpec, gemm_smem_bytes, pipeline_smem, quant_tag

THREADS = 128


def smem_bytes(spec: MoeSpec, bs: int, stages: int) -> int:
    ni = spec.prefill.gate_up_tile_n
    q = spec.quant
    return gemm_smem_bytes(bs, stages, ni * (GPU_BLOCK_BYTES[q.gate] + GPU_BLOCK_BYTES[q.up]), 2 * ni)


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    q = spec.quant
    ni = spec.prefill.gate_up_tile_n
    dtype = spec.activation_dtype
    out = []
    for bs in spec.prefill.block_sizes:
        per_arch, single = pipeline_smem(
            spec, "prefill.block_sizes or prefill.gate_up_tile_n", lambda st, bs=bs: smem_bytes(spec, bs, st)
        )
        uri = f"gemm_gate_up_silu_{quant_tag(q.gate, q.up)}_bs{bs}_n{ni}_{spec.shape_tag}_{dtype.value}"
        out.append(
            KernelSpec(
                uri=uri,
                family="gemm_gate_up_silu",
                template="gemm_gate_up_silu.cu.j2",
                values={
                    "H": spec.hidden_size,
                    "I": spec.intermediate_size,
                    "K_TOP": spec.top_k,
                    "BS": bs,
                    "NI": ni,
                    "THREADS": THREADS,
                    "MMA_T": MMA_CTYPE[dtype],
                    "GATE_Q": QUANT_STRUCT[q.gate],
                    "UP_Q": QUANT_STRUCT[q.up],
                    "SINGLE_STAGE_ARCHS": single,
                },
                args=(
                    Arg("x", f"const {MMA_CTYPE[dtype]}*"),
                    Arg("sorted_ids", "const int*"),
                    Arg("block_expert", "const int*"),
                    Arg("plan", "const int*"),
                    Arg("num_pairs", "int"),
                    Arg("w_gate", "const u8*"),
                    Arg("w_gate_d", "const __half*"),
                    Arg("w_up", "const u8*"),
                    Arg("w_up_d", "const __half*"),
                    Arg("a", f"{MMA_CTYPE[dtype]}*"),
                ),
                launch={"threads": THREADS, "grid": "min(tiles for the largest plan, resident CTAs)",
                        "block_size": bs, "tile_n": ni, "n_tiles": spec.intermediate_size // ni,
                        "smem_bytes": per_arch},
            )
        )
    return out
