"""The grouped path's two families (expert-grouped tensor-core kernels for decode-sized T).

grouped_gate_up_silu and grouped_down_combine share the tile geometry worked out here: each
CTA serves one distinct expert and a 16-row tile, its warps split a row's 256-weight blocks,
and up to `tokens` tokens go through the mma's N side per pass (more take more passes).
"""

from __future__ import annotations

from ..quant import QK_K, QuantType
from ..spec import MoeSpec
from .base import ACT_CTYPE, DOWN_WEIGHTS, GATE_UP_WEIGHTS, MMA_CTYPE, Arg, KernelSpec, quant_tag

ROWS_PER_CTA = 16
MAX_WARPS = 8
DEFAULT_TOKENS = 8
TOKEN_VARIANTS = (16,)
"""Tokens per pass beside the default: the tuner picks per token count."""

GROUPED_STRUCT = {QuantType.Q4_K: "GroupedQ4K", QuantType.Q6_K: "GroupedQ6K"}
MMA_BYTES = 2

def warps_for(in_dim: int) -> int:
    """Warps per CTA: the most, up to MAX_WARPS, that split a row's blocks evenly."""
    blocks = in_dim // QK_K
    return max(w for w in range(1, MAX_WARPS + 1) if blocks % w == 0)

def smem_bytes(warps: int, tokens: int, matrices: int) -> int:
    """Activations of one pass in lane order, plus the warps' partial sums."""
    return tokens * (warps * QK_K + 16) * MMA_BYTES + warps * matrices * ROWS_PER_CTA * tokens * 4

def supported(spec: MoeSpec) -> bool:
    """The grouped kernels need gate and up of one quant type (one activation order) and 16-row tiles."""
    q = spec.quant
    return (q.gate == q.up and spec.intermediate_size % ROWS_PER_CTA == 0
            and spec.hidden_size % ROWS_PER_CTA == 0)

def _variants() -> list[tuple[str, int, bool]]:
    return [(f"t{DEFAULT_TOKENS}", DEFAULT_TOKENS, True)] + [(f"t{t}", t, False) for t in TOKEN_VARIANTS]

def _common_values(spec: MoeSpec, warps: int, tokens: int, qt: QuantType, smem: int) -> dict:
    dtype = spec.activation_dtype
    return {
        "H": spec.hidden_size,
        "I": spec.intermediate_size,
        "E": spec.num_experts,
        "K_TOP": spec.top_k,
        "WARPS": warps,
        "TOKENS": tokens,
        "ACT_T": ACT_CTYPE[dtype],
        "MMA_T": MMA_CTYPE[dtype],
        "GROUPED_Q": GROUPED_STRUCT[qt],
        "SMEM_BYTES": smem,
    }

def _launch(spec: MoeSpec, warps: int, tokens: int, smem: int) -> dict:
    return {"threads": warps * 32, "grid": "(rows / rows_per_cta, min(num_pairs, E))",
            "rows_per_cta": ROWS_PER_CTA, "tokens_per_pass": tokens,
            "smem_bytes": {arch.value: smem for arch in spec.target_archs}}

def gate_up_kernels(spec: MoeSpec) -> list[KernelSpec]:
    if not supported(spec):
        return []
    q, dtype = spec.quant, spec.activation_dtype
    warps = warps_for(spec.hidden_size)
    out = []
    for variant, tokens, default in _variants():
        smem = smem_bytes(warps, tokens, 2)
        out.append(KernelSpec(
            uri=f"grouped_gate_up_silu_{quant_tag(q.gate, q.up)}_{variant}_{spec.shape_tag}_{dtype.value}",
            family="grouped_gate_up_silu",
            template="grouped_gate_up_silu.cu.j2",
            variant=variant,
            default=default,
            values=_common_values(spec, warps, tokens, q.gate, smem),
            args=(
                Arg("x", f"const {ACT_CTYPE[dtype]}*"),
                Arg("ids", "const int*"),
                Arg("num_pairs", "int"),
                *GATE_UP_WEIGHTS,
                Arg("a", f"{MMA_CTYPE[dtype]}*"),
            ),
            launch=_launch(spec, warps, tokens, smem),
        ))
    return out

def down_kernels(spec: MoeSpec) -> list[KernelSpec]:
    if not supported(spec):
        return []
    qd, dtype = spec.quant.down, spec.activation_dtype
    warps = warps_for(spec.intermediate_size)
    out = []
    for variant, tokens, default in _variants():
        smem = smem_bytes(warps, tokens, 1)
        out.append(KernelSpec(
            uri=f"grouped_down_combine_{qd.value}_{variant}_{spec.shape_tag}_{dtype.value}",
            family="grouped_down_combine",
            template="grouped_down_combine.cu.j2",
            variant=variant,
            default=default,
            values=_common_values(spec, warps, tokens, qd, smem),
            args=(
                Arg("a", f"const {MMA_CTYPE[dtype]}*"),
                Arg("ids", "const int*"),
                Arg("weights", "const float*"),
                Arg("num_pairs", "int"),
                *DOWN_WEIGHTS,
                Arg("y", "float*"),
                Arg("counters", "int*"),
                Arg("out", f"{ACT_CTYPE[dtype]}*"),
            ),
            launch=_launch(spec, warps, tokens, smem),
        ))
    return out
