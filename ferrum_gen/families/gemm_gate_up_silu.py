"""Prefill grouped dequant-GEMM family for gate+up with SiLU fused: one kernel per (tile width, block size)."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import MMA_CTYPE, Arg, KernelSpec, gemm_smem_bytes, gpu_block_bytes, pipeline_smem, quant_struct, quant_tag

THREADS = 128


def smem_bytes(spec: MoeSpec, bs: int, ni: int, stages: int) -> int:
    q = spec.quant
    return gemm_smem_bytes(bs, stages, ni * (gpu_block_bytes(q.gate) + gpu_block_bytes(q.up)), 2 * ni)


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    q = spec.quant
    dtype = spec.activation_dtype
    default_n = spec.prefill.gate_up_tile_n
    out = []
    for ni in (default_n, *spec.variants.gate_up_tile_n):
        default = ni == default_n
        hint = "prefill.block_sizes or prefill.gate_up_tile_n" if default else f"remove {ni} from variants.gate_up_tile_n"
        for bs in spec.prefill.block_sizes:
            per_arch, single = pipeline_smem(
                spec, hint, lambda st, bs=bs, ni=ni: smem_bytes(spec, bs, ni, st), required=default
            )
            out.append(
                KernelSpec(
                    uri=f"gemm_gate_up_silu_{quant_tag(q.gate, q.up)}_bs{bs}_n{ni}_{spec.shape_tag}_{dtype.value}",
                    family="gemm_gate_up_silu",
                    template="gemm_gate_up_silu.cu.j2",
                    variant=f"n{ni}",
                    default=default,
                    archs=None if default else tuple(per_arch),
                    values={
                        "H": spec.hidden_size,
                        "I": spec.intermediate_size,
                        "K_TOP": spec.top_k,
                        "BS": bs,
                        "NI": ni,
                        "THREADS": THREADS,
                        "MMA_T": MMA_CTYPE[dtype],
                        "GATE_Q": quant_struct(q.gate),
                        "UP_Q": quant_struct(q.up),
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
