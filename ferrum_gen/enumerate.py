"""A spec expands into the list of kernels its MoE layer needs."""

from __future__ import annotations

from .families import (
    align,
    align_count,
    combine,
    fused_moe,
    gather_x,
    gemm_down,
    gemm_gate_up_silu,
    gemv_down_combine,
    gemv_gate_up_silu,
    grouped_down_combine,
    grouped_gate_up_silu,
    route_align,
    router,
    stream_down,
    stream_gate_up_silu,
)
from .families.base import KernelSpec
from .spec import MoeSpec

FAMILIES = (router, align_count, align, route_align, gemv_gate_up_silu, gemv_down_combine, grouped_gate_up_silu,
            grouped_down_combine, fused_moe, gemm_gate_up_silu, gemm_down, gather_x, stream_gate_up_silu, stream_down,
            combine)


def enumerate_kernels(spec: MoeSpec) -> list[KernelSpec]:
    kernels = [k for family in FAMILIES for k in family.kernels(spec)]
    uris = [k.uri for k in kernels]
    duplicated = sorted({u for u in uris if uris.count(u) > 1})
    if duplicated:  # a uri is the file, the symbol and the cache key: it must be unique
        raise AssertionError(f"kernel uris collide: {duplicated}")
    return kernels
