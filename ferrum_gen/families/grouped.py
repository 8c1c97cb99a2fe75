"""The grouped path's two families (expert-grouped tensor-core kernels for decode-sized T).

grouped_gate_up_silu and grouped_down_combine share the tile geometry worked out here: each
CTA serves one distinct expert and a 16-row tile, its warps split a row's 256-weight blocks,
and up to `tokens` tokens go through the mma's N side per pass (more take more passes).
"""

from __future__ import annotations

from ..quant import QK_K, QuantType
from ..spec import ActivationDtype, MoeSpec
from .base import ACT_CTYPE, DOWN_WEIGHTS, GATE_UP_WEIGHTS, MMA_CTYPE, Arg, KernelSpec, quant_tag

ROWS_PER_CTA = 16
MAX_WARPS = 8
DEFAULT_TOKENS = 8
TOKEN_VARIANTS = (16,)
"""Tokens per pass beside the default: the tuner picks per token count."""
ROUTED_TOKENS = 8
"""The gate+up variant that is also the router (r8) serves at most this many tokens: every CTA
routes all of them, which pays only while they are few."""
ONE_TOKEN_PREFIX = "o1"
"""The one-token variants (o1, and o1m32/o1m64 for down) are t8 and its row-tile forms for one
token only: slot s takes pair s, with no expert or pair search (grouped.cuh, slot_expert). Their
own kernels, so that every other token count runs code compiled without the shortcut."""
FEW_PAIRS = (64, 128)
"""The few-pairs variants (p64, p128, and their m32/m64 down forms) are t8 and its row-tile forms
for calls of at most that many pairs, launched with one slot per pair: a CTA finds its expert and
pairs with warp votes on ids, with no shared memory or barrier before its first pass
(grouped.cuh, slot_expert). Two sizes: the larger serves more tokens, the smaller reads fewer ids."""


def few_pairs_tokens(spec: MoeSpec, pairs: int) -> int:
    """The most tokens a few-pairs variant of `pairs` pairs serves."""
    return pairs // spec.top_k


DOWN_ROW_TILES = (2, 4)
"""Down variants whose CTA takes this many 16-row tiles (one group of warps each, sharing the
token search and the copy of a): t8m32 and t8m64. Down's CTAs are small (a row of I has few
blocks), so their fixed costs weigh; gate+up's are not (its CTAs already hold 256 threads at
80 registers)."""

INT_DOT_VARIANT = f"{ONE_TOKEN_PREFIX}i"
"""The kernels by integer dot products (o1i, both families): x (or a) quantised to int16 a 32-value
sub-block, two products a dp2a, each scale group's scale (Q4_K's min, Q6_K's zero point) applied to
its integer sum (grouped.cuh, row_dot_int). A CTA a pair (slot mode PAIR, a slot per pair): their
cost is per pair, where the mma's does not grow up to 8 tokens an expert, so they serve calls of up
to INT_DOT_MAX_PAIRS pairs and the tuner weighs them against the grouping variants. Not the bits of
the mma variants: their error is measured against the reference instead (the weights are exact, x
is rounded to 2^-16 of a sub-block's largest value); each pair's bits do not depend on the call's
other tokens."""

INT_DOT_MAX_PAIRS = FEW_PAIRS[-1]
"""The most pairs o1i serves (16 tokens of top-8): beyond, its cost per pair loses to the
grouping variants even under uniform routing (docs/perf-notes.md, fifteenth session)."""

PAIR_READY_STRIDE = 32
"""ints between two pairs' counts in pair_ready: a 128-byte line each, since every waiting o1i down CTA polls its
pair's (counts sharing a line made gate+up's stores and down slower on an H200: docs/perf-notes.md, fifty-sixth
session)."""

INT_DOT_MIN_CTAS = 3
"""o1i gate+up's __launch_bounds__ asks for 3 CTAs an SM (at most 85 registers), the occupancy the
mma variants get from ptxas unasked (80); left to itself ptxas takes 93, two CTAs an SM."""


def scales_after(spec: MoeSpec, gate_up: bool) -> bool:
    """Whether the family's mma variants apply the weights' scales after the mma (grouped.cuh, mma_block: each Q4_K
    code times its 6-bit sub-block scale, exact in f16, and each block's float32 sums times d and dmin) rather than
    in each weight. Rounding a sub-block's scale to f16 errs alike over its 32 weights, which an unlucky token lines
    up: on olmoe the t8 variants' layer output came 1.8e-3 (500 draws) to 2.07e-3 (a failed GPU test) from the
    float64 layer, against the design's 2e-3, most of it from gate+up's weights (docs/perf-notes.md, fifty-fifth
    session). f16 Q4_K gate+up where a warp takes one block of a row, so that a block's sums are the accumulators
    themselves: with two blocks a warp (mixtral, whose error stays under 8e-4) gate+up lost 2-5 % at T = 4, and the
    downs, held to their registers, lost 1.5 % on olmoe at T = 3-4 for little (exact down weights alone moved the
    largest error from 1.82e-3 to 1.77e-3). In bf16 a code times a 6-bit scale is not exact (8 significant bits)."""
    return (gate_up and spec.activation_dtype is ActivationDtype.F16 and spec.quant.gate is QuantType.Q4_K
            and spec.hidden_size // QK_K == warps_for(spec.hidden_size))


GROUPED_STRUCT = {QuantType.Q4_K: "GroupedQ4K", QuantType.Q6_K: "GroupedQ6K"}
MMA_BYTES = 2


def warps_for(in_dim: int) -> int:
    """Warps per CTA: the most, up to MAX_WARPS, that split a row's blocks evenly."""
    blocks = in_dim // QK_K
    return max(w for w in range(1, MAX_WARPS + 1) if blocks % w == 0)


def smem_bytes(warps: int, tokens: int, matrices: int, row_tiles: int = 1) -> int:
    """Activations of one pass in lane order, plus the warps' partial sums (per row tile)."""
    return tokens * (warps * QK_K + 16) * MMA_BYTES + row_tiles * warps * matrices * ROWS_PER_CTA * tokens * 4


XINT16_BYTES = QK_K * 2 + 8 * 4 + 8 * 4 + 16 * 4
"""fg::XInt16::BYTES: a 256-value block of x or a as int16, with its 8 sub-block scales, 8 float sums
and 16 int sums."""


def int_dot_smem_bytes(warps: int, matrices: int) -> int:
    """o1i: each warp's int16 copy of its block of x or a (fg::XInt16), and its partial sums of 16 rows
    a matrix."""
    return warps * (XINT16_BYTES + matrices * ROWS_PER_CTA * 4)


def supported(spec: MoeSpec) -> bool:
    """The grouped kernels need gate and up of one quant type (one activation order), 16-row
    tiles, and 16-bit activations (x is copied into shared memory as it is, as the mma's B)."""
    q = spec.quant
    return (q.gate == q.up and spec.intermediate_size % ROWS_PER_CTA == 0
            and spec.hidden_size % ROWS_PER_CTA == 0 and spec.activation_dtype is not ActivationDtype.F32)


def _kernels(spec: MoeSpec, family: str, quant_name: str, qt: QuantType, in_dim: int, out_dim: int,
             matrices: int, args: tuple[Arg, ...], gate_up: bool) -> list[KernelSpec]:
    """The family's kernel per variant: one per tokens-per-pass count (t8 the default); for gate+up
    also the one that is the router (r8: t8's tiles, at most ROUTED_TOKENS tokens); for down also
    t8 with DOWN_ROW_TILES row tiles per CTA (where they divide the output rows); and the forms of
    t8 and of those row-tile forms without a CTA-wide search: one token (o1, o1m32, o1m64) and
    few pairs (p64, p128, ... with the same suffixes); and o1i, a CTA a pair by integer dot
    products."""
    if not supported(spec):
        return []
    dtype = spec.activation_dtype
    warps = warps_for(in_dim)
    # (name, tokens per pass, routes, 16-row tiles per CTA, slot mode, most pairs of a FEW variant)
    variants = [(f"t{t}", t, False, 1, "SEARCH", 0) for t in (DEFAULT_TOKENS, *TOKEN_VARIANTS)]
    if gate_up:
        variants.append((f"r{DEFAULT_TOKENS}", DEFAULT_TOKENS, True, 1, "SEARCH", 0))
    row_tiles_forms = [(1, "")] + ([] if gate_up else [(rt, f"m{ROWS_PER_CTA * rt}") for rt in DOWN_ROW_TILES
                                                       if out_dim % (ROWS_PER_CTA * rt) == 0])
    variants += [(f"t{DEFAULT_TOKENS}{tag}", DEFAULT_TOKENS, False, rt, "SEARCH", 0) for rt, tag in row_tiles_forms
                 if rt > 1]
    variants += [(f"{ONE_TOKEN_PREFIX}{tag}", DEFAULT_TOKENS, False, rt, "PAIR", 0) for rt, tag in row_tiles_forms]
    variants.append((INT_DOT_VARIANT, DEFAULT_TOKENS, False, 1, "PAIR", 0))
    variants += [(f"p{few}{tag}", DEFAULT_TOKENS, False, rt, "FEW", few) for few in FEW_PAIRS
                 for rt, tag in row_tiles_forms if few_pairs_tokens(spec, few) >= 1]
    out = []
    after = scales_after(spec, gate_up)
    for variant, tokens, routing, row_tiles, slots, few in variants:
        int_dot = variant == INT_DOT_VARIANT
        smem = int_dot_smem_bytes(warps, matrices) if int_dot else smem_bytes(warps, tokens, matrices, row_tiles)
        launch = {"threads": warps * row_tiles * 32, "grid": "(rows / rows_per_cta, min(num_pairs, E))",
                  "rows_per_cta": ROWS_PER_CTA * row_tiles, "tokens_per_pass": tokens,
                  "smem_bytes": {arch.value: smem for arch in spec.target_archs}}
        if routing:
            launch.update(routes=True, max_tokens=ROUTED_TOKENS)
        if int_dot:
            launch.update(integer_dot=True, max_tokens=few_pairs_tokens(spec, INT_DOT_MAX_PAIRS), slot_per_pair=True,
                          grid="(rows / rows_per_cta, num_pairs)")
        elif slots == "PAIR":
            launch.update(max_tokens=1)
        elif slots == "FEW":
            launch.update(max_tokens=few_pairs_tokens(spec, few), slot_per_pair=True,
                          grid="(rows / rows_per_cta, num_pairs)")
        out.append(KernelSpec(
            uri=f"{family}_{quant_name}_{variant}_{spec.shape_tag}_{dtype.value}",
            family=family,
            template=f"{family}.cu.j2",
            variant=variant,
            default=variant == f"t{DEFAULT_TOKENS}",
            values={
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
                "SLOT_MODE": slots,
                "FEW_PAIRS": few,
                "INT_DOT": "true" if int_dot else "false",
                "SCALES_AFTER": "true" if after else "false",
                "LAUNCH_BOUNDS": f"THREADS, {INT_DOT_MIN_CTAS}" if int_dot and gate_up else "THREADS",
                "PAIR_READY_STRIDE": PAIR_READY_STRIDE,
                **({"ROUTES": "true" if routing else "false",
                    "NORM_TOPK": "true" if spec.norm_topk_prob else "false",
                    "ROUTED_TOKENS": ROUTED_TOKENS if routing else 1} if gate_up else {"ROW_TILES": row_tiles}),
            },
            args=args,
            launch=launch,
        ))
    return out


PAIR_READY = Arg("pair_ready", "int*")
"""Per pair (of the first INT_DOT_MAX_PAIRS, PAIR_READY_STRIDE ints apart): how many o1i gate+up CTAs have stored
their rows of its a. The router zeroes a call's counts before gate+up adds to them; o1i down waits for its pair's
count instead of for the whole gate+up grid (pairs_counted)."""
PAIRS_COUNTED = Arg("pairs_counted", "int")
"""1 where the call's grouped kernels are both o1i and launched as programmatic dependents (runtime.py): o1i
gate+up counts its stores of a on pair_ready and o1i down waits for its pair's count; 0 otherwise, and down
waits for the gate+up grid."""


def gate_up_kernels(spec: MoeSpec) -> list[KernelSpec]:
    q, dtype = spec.quant, spec.activation_dtype
    # one signature for every variant, so the runtime launches them alike: the routing variant
    # reads logits and writes ids and weights, the others read ids
    return _kernels(spec, "grouped_gate_up_silu", quant_tag(q.gate, q.up), q.gate, spec.hidden_size,
                    spec.intermediate_size, 2, (
        Arg("x", f"const {ACT_CTYPE[dtype]}*"),
        Arg("logits", "const float*"),
        Arg("num_tokens", "int"),
        Arg("ids", "int*"),
        Arg("weights", "float*"),
        *GATE_UP_WEIGHTS,
        Arg("a", f"{MMA_CTYPE[dtype]}*"),
        PAIR_READY,
        PAIRS_COUNTED,
    ), gate_up=True)


def down_kernels(spec: MoeSpec) -> list[KernelSpec]:
    qd, dtype = spec.quant.down, spec.activation_dtype
    return _kernels(spec, "grouped_down_combine", qd.value, qd, spec.intermediate_size, spec.hidden_size, 1, (
        Arg("a", f"const {MMA_CTYPE[dtype]}*"),
        Arg("ids", "const int*"),
        Arg("weights", "const float*"),
        Arg("num_pairs", "int"),
        *DOWN_WEIGHTS,
        Arg("y", "float*"),
        Arg("counters", "int*"),
        Arg("out", f"{ACT_CTYPE[dtype]}*"),
        PAIR_READY,
        PAIRS_COUNTED,
    ), gate_up=False)
