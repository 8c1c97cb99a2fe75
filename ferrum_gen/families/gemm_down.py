"""Prefill grouped dequant-GEMM family for the down projection: one kernel per (tile width, block size)."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import ACT_CTYPE, MMA_CTYPE, Arg, KernelSpec, gemm_smem_bytes, gpu_block_bytes, pipeline_smem, quant_struct

THREADS = 128


def smem_bytes(spec: MoeSpec, bs: int, nd: int, stages: int) -> int:
    return gemm_smem_bytes(bs, stages, nd * gpu_block_bytes(spec.quant.down), nd)


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    qd = spec.quant.down
    dtype = spec.activation_dtype
    default_n = spec.prefill.down_tile_n
    out = []
    for nd in (default_n, *spec.variants.down_tile_n):
        default = nd == default_n
        hint = "prefill.block_sizes or prefill.down_tile_n" if default else f"remove {nd} from variants.down_tile_n"
        for bs in spec.prefill.block_sizes:
            per_arch, single = pipeline_smem(
                spec, hint, lambda st, bs=bs, nd=nd: smem_bytes(spec, bs, nd, st), required=default
            )
            out.append(
                KernelSpec(
                    uri=f"gemm_down_{qd.value}_bs{bs}_n{nd}_{spec.shape_tag}_{dtype.value}",
                    family="gemm_down",
                    template="gemm_down.cu.j2",
                    variant=f"n{nd}",
                    default=default,
                    archs=None if default else tuple(per_arch),
                    values={
                        "H": spec.hidden_size,
                        "I": spec.intermediate_size,
                        "BS": bs,
                        "ND": nd,
                        "THREADS": THREADS,
                        "MMA_T": MMA_CTYPE[dtype],
                        "OUT_T": ACT_CTYPE[dtype],
                        "DOWN_Q": quant_struct(qd),
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
