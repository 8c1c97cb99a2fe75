"""Decode gate+up+SiLU GEMV family: one kernel reading gate and up rows together, per warp-count variant."""

from __future__ import annotations

from ..spec import DEFAULT_GEMV_WARPS, MoeSpec
from .base import (
    ACT_CTYPE, GATE_UP_WEIGHTS, Arg, KernelSpec, chunks_per_row, lanes_per_row, quant_struct, quant_tag,
)


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    q = spec.quant
    lpr = lanes_per_row(max(chunks_per_row(q.gate, spec.hidden_size), chunks_per_row(q.up, spec.hidden_size)))
    dtype = spec.activation_dtype
    out = []
    for warps in (DEFAULT_GEMV_WARPS, *spec.variants.gemv_warps):
        rows_per_cta = warps * (32 // lpr)
        out.append(
            KernelSpec(
                uri=f"gemv_gate_up_silu_{quant_tag(q.gate, q.up)}_w{warps}_{spec.shape_tag}_{dtype.value}",
                family="gemv_gate_up_silu",
                template="gemv_gate_up_silu.cu.j2",
                variant=f"w{warps}",
                default=warps == DEFAULT_GEMV_WARPS,
                values={
                    "H": spec.hidden_size,
                    "I": spec.intermediate_size,
                    "K_TOP": spec.top_k,
                    "LPR": lpr,
                    "WARPS": warps,
                    "ROWS_PER_CTA": rows_per_cta,
                    "ACT_T": ACT_CTYPE[dtype],
                    "GATE_Q": quant_struct(q.gate),
                    "UP_Q": quant_struct(q.up),
                },
                args=(
                    Arg("x", f"const {ACT_CTYPE[dtype]}*"),
                    Arg("ids", "const int*"),
                    *GATE_UP_WEIGHTS,
                    Arg("a", "float*"),
                ),
                launch={"threads": warps * 32, "grid": "(ceil(I / rows_per_cta), num_pairs)",
                        "rows_per_cta": rows_per_cta, "lanes_per_row": lpr, "smem_bytes": 0},
            )
        )
    return out
