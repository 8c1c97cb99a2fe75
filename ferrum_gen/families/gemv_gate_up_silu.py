"""Decode gate+up+SiLU GEMV family: one kernel reading gate and up rows together, per warp-count variant."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import (
    ACT_CTYPE, GATE_UP_WEIGHTS, Arg, KernelSpec, chunks_per_row, gemv_kernels, lanes_per_row, quant_struct, quant_tag,
)


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    q = spec.quant
    dtype = spec.activation_dtype
    return gemv_kernels(
        spec, "gemv_gate_up_silu",
        lambda warps: f"gemv_gate_up_silu_{quant_tag(q.gate, q.up)}_w{warps}_{spec.shape_tag}_{dtype.value}",
        lanes_per_row(max(chunks_per_row(q.gate, spec.hidden_size), chunks_per_row(q.up, spec.hidden_size))),
        {"H": spec.hidden_size, "I": spec.intermediate_size, "K_TOP": spec.top_k, "ACT_T": ACT_CTYPE[dtype],
         "GATE_Q": quant_struct(q.gate), "UP_Q": quant_struct(q.up)},
        (Arg("x", f"const {ACT_CTYPE[dtype]}*"), Arg("ids", "const int*"), *GATE_UP_WEIGHTS, Arg("a", "float*")),
        "(ceil(I / rows_per_cta), num_pairs)",
    )
