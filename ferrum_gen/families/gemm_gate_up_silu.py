"""Prefill grouped dequant-GEMM family for gate+up with SiLU fused: one kernel per (tile width, block size)."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import (
    MMA_CTYPE, KernelSpec, aligned_gate_up_args, gemm_kernel, gemm_smem_bytes, gemm_tiles, gpu_block_bytes,
    quant_struct, quant_tag,
)


def smem_bytes(spec: MoeSpec, bs: int, ni: int, stages: int) -> int:
    q = spec.quant
    return gemm_smem_bytes(bs, stages, ni * (gpu_block_bytes(q.gate) + gpu_block_bytes(q.up)), 2 * ni)


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    q = spec.quant
    dtype = spec.activation_dtype
    tiles = gemm_tiles(spec, "gate_up_tile_n", spec.prefill.gate_up_tile_n, spec.variants.gate_up_tile_n,
                       lambda bs, ni, stages: smem_bytes(spec, bs, ni, stages))
    return [
        gemm_kernel(
            t, "gemm_gate_up_silu",
            f"gemm_gate_up_silu_{quant_tag(q.gate, q.up)}_bs{t.block_size}_n{t.n}_{spec.shape_tag}_{dtype.value}",
            {"H": spec.hidden_size, "I": spec.intermediate_size, "K_TOP": spec.top_k, "NI": t.n,
             "MMA_T": MMA_CTYPE[dtype], "GATE_Q": quant_struct(q.gate), "UP_Q": quant_struct(q.up)},
            aligned_gate_up_args(dtype),
            spec.intermediate_size,
        )
        for t in tiles
    ]
