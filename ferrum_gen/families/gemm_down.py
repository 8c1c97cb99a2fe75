"""Prefill grouped dequant-GEMM family for the down projection: one kernel per block size."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import ACT_CTYPE, GPU_BLOCK_BYTES, MMA_CTYPE, QUANT_STRUCT, Arg, KernelSpec, gemm_smem_bytes, pipeline_smem

THREADS = 128


def smem_bytes(spec: MoeSpec, bs: int, stages: int) -> int:
    nd = spec.prefill.down_tile_n
    return gemm_smem_bytes(bs, stages, nd * GPU_BLOCK_BYTES[spec.quant.down], nd)


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    qd = spec.quant.down
    nd = spec.prefill.down_tile_n
    dtype = spec.activation_dtype
    out = []
    for bs in spec.prefill.block_sizes:
        per_arch, single = pipeline_smem(
            spec, "prefill.block_sizes or prefill.down_tile_n", lambda st, bs=bs: smem_bytes(spec, bs, st)
        )
        uri = f"gemm_down_{qd.value}_bs{bs}_n{nd}_{spec.shape_tag}_{dtype.value}"
        out.append(
            KernelSpec(
                uri=uri,
                family="gemm_down",
                template="gemm_down.cu.j2",
                values={
                    "H": spec.hidden_size,
                    "I": spec.intermediate_size,
                    "BS": bs,
                    "ND": nd,
                    "THREADS": THREADS,
                    "MMA_T": MMA_CTYPE[dtype],
                    "OUT_T": ACT_CTYPE[dtype],
                    "DOWN_Q": QUANT_STRUCT[qd],
                    "SINGLE_STAGE_ARCHS": single,
                },
                args=(
                    Arg("a", f"const {MMA_CTYPE[dtype]}*"),
                    Arg("block_expert", "const int*"),
                    Arg("plan", "const int*"),
                    Arg("w_down", "const u8*"),
                    Arg("w_down_d", "const __half*"),
                    Arg("y", f"{ACT_CTYPE[dtype]}*"),
                ),
                launch={"threads": THREADS, "grid": "min(tiles for the largest plan, resident CTAs)",
                        "block_size": bs, "tile_n": nd, "n_tiles": spec.hidden_size // nd,
                        "smem_bytes": per_arch},
            )
        )
    return out


