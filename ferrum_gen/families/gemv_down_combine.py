"""Decode down GEMV family, with the router-weighted combine fused in, per warp-count variant."""

from __future__ import annotations

import math

from ..spec import MoeSpec
from .base import ACT_CTYPE, DOWN_WEIGHTS, Arg, KernelSpec, chunks_per_row, gemv_kernels, lanes_per_row, quant_struct

MAX_CHUNKS_IN_FLIGHT = 16
"""Chunks a lane may hold in registers at once: experts are loaded together up to this many chunks."""


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    qd = spec.quant.down
    cpr = chunks_per_row(qd, spec.intermediate_size)
    lpr = lanes_per_row(cpr)
    dtype = spec.activation_dtype
    return gemv_kernels(
        spec, "gemv_down_combine",
        lambda warps: f"gemv_down_combine_{qd.value}_w{warps}_{spec.shape_tag}_{dtype.value}",
        lpr,
        {"H": spec.hidden_size, "I": spec.intermediate_size, "K_TOP": spec.top_k,
         "EXPERTS_IN_FLIGHT": max(1, min(spec.top_k, MAX_CHUNKS_IN_FLIGHT // math.ceil(cpr / lpr))),
         "ACT_T": ACT_CTYPE[dtype], "DOWN_Q": quant_struct(qd)},
        (Arg("a", "const float*"), Arg("ids", "const int*"), Arg("weights", "const float*"), *DOWN_WEIGHTS,
         Arg("out", f"{ACT_CTYPE[dtype]}*")),
        "(ceil(H / rows_per_cta), num_tokens)",
    )
