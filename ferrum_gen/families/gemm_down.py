"""Prefill grouped dequant-GEMM family for the down projection: one kernel per (tile width, block size)."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import (
    ACT_CTYPE, MMA_CTYPE, KernelSpec, aligned_down_args, gemm_kernel, gemm_smem_bytes, gemm_tiles, gpu_block_bytes,
    quant_struct,
)


def smem_bytes(spec: MoeSpec, bs: int, nd: int, stages: int) -> int:
    return gemm_smem_bytes(bs, stages, nd * gpu_block_bytes(spec.quant.down), nd)


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    qd = spec.quant.down
    dtype = spec.activation_dtype
    tiles = gemm_tiles(spec, "down_tile_n", spec.prefill.down_tile_n, spec.variants.down_tile_n,
                       lambda bs, nd, stages: smem_bytes(spec, bs, nd, stages))
    return [
        gemm_kernel(
            t, "gemm_down", f"gemm_down_{qd.value}_bs{t.block_size}_n{t.n}_{spec.shape_tag}_{dtype.value}",
            {"H": spec.hidden_size, "I": spec.intermediate_size, "ND": t.n, "MMA_T": MMA_CTYPE[dtype],
             "OUT_T": ACT_CTYPE[dtype], "DOWN_Q": quant_struct(qd)},
            aligned_down_args(dtype),
            spec.hidden_size,
        )
        for t in tiles
    ]
