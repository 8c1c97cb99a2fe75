"""Decode down GEMV family, with the router-weighted combine fused in, per warp-count variant."""

from __future__ import annotations

import math

from ..spec import DEFAULT_GEMV_WARPS, MoeSpec
from .base import ACT_CTYPE, DOWN_WEIGHTS, Arg, KernelSpec, chunks_per_row, lanes_per_row, quant_struct

MAX_CHUNKS_IN_FLIGHT = 16
"""Chunks a lane may hold in registers at once: experts are loaded together up to this many chunks."""


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    qd = spec.quant.down
    cpr = chunks_per_row(qd, spec.intermediate_size)
    lpr = lanes_per_row(cpr)
    iters = math.ceil(cpr / lpr)
    dtype = spec.activation_dtype
    out = []
    for warps in (DEFAULT_GEMV_WARPS, *spec.variants.gemv_warps):
        rows_per_cta = warps * (32 // lpr)
        out.append(
            KernelSpec(
                uri=f"gemv_down_combine_{qd.value}_w{warps}_{spec.shape_tag}_{dtype.value}",
                family="gemv_down_combine",
                template="gemv_down_combine.cu.j2",
                variant=f"w{warps}",
                default=warps == DEFAULT_GEMV_WARPS,
                values={
                    "H": spec.hidden_size,
                    "I": spec.intermediate_size,
                    "K_TOP": spec.top_k,
                    "LPR": lpr,
                    "WARPS": warps,
                    "ROWS_PER_CTA": rows_per_cta,
                    "EXPERTS_IN_FLIGHT": max(1, min(spec.top_k, MAX_CHUNKS_IN_FLIGHT // iters)),
                    "ACT_T": ACT_CTYPE[dtype],
                    "DOWN_Q": quant_struct(qd),
                },
                args=(
                    Arg("a", "const float*"),
                    Arg("ids", "const int*"),
                    Arg("weights", "const float*"),
                    *DOWN_WEIGHTS,
                    Arg("out", f"{ACT_CTYPE[dtype]}*"),
                ),
                launch={"threads": warps * 32, "grid": "(ceil(H / rows_per_cta), num_tokens)",
                        "rows_per_cta": rows_per_cta, "lanes_per_row": lpr, "smem_bytes": 0},
            )
        )
    return out
