"""Gather-x family (stream path, prefill.sorted_x): x's rows copied into align's sorted order for the wgmma
gate+up kernels, whose tokens then come by tensor copies of 128-byte rows."""

from __future__ import annotations

from ..quant import QuantType
from ..spec import MoeSpec
from .base import ALIGNED_PLAN_WRITTEN_AHEAD, MMA_CTYPE, PAIR_ROW, THREADS_PER_WARP, Arg, KernelSpec
from .stream import chunk_order, sorted_x

THREADS = 256
CTAS_PER_SM = 4
"""The grid: CTAS_PER_SM CTAs of THREADS a multiprocessor at most, a warp a slot; each row of x is
hidden_size * 2 bytes read once and written once (the copy is bound by HBM from T ~ 512 on)."""


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    if not sorted_x(spec):
        return []
    dtype = spec.activation_dtype
    return [
        KernelSpec(
            uri=f"gather_x_{spec.shape_tag}_{dtype.value}",
            family="gather_x",
            template="gather_x.cu.j2",
            values={"H": spec.hidden_size, "K_TOP": spec.top_k, "THREADS": THREADS, "MMA_T": MMA_CTYPE[dtype],
                    "CHUNKS": chunk_order(QuantType.Q4_K)},
            args=(Arg("x", f"const {MMA_CTYPE[dtype]}*"), *ALIGNED_PLAN_WRITTEN_AHEAD,
                  Arg("x_sorted", f"{MMA_CTYPE[dtype]}*"), PAIR_ROW, Arg("for_block", "int")),
            launch={"threads": THREADS, "grid": "min(ceil(pairs / warps a CTA), ctas_per_sm x SMs)",
                    "warps": THREADS // THREADS_PER_WARP, "ctas_per_sm": CTAS_PER_SM, "smem_bytes": 0},
        )
    ]
