"""The stream path's two families (weight-streaming tensor-core kernels for mid and large T).

stream_gate_up_silu and stream_down share the geometry worked out here: a CTA of WARPS warps
(SMALL_WARPS in the four-CTA variants) takes 16 weight rows a warp (the whole k range each) of
one aligned block's expert and all of the block's tokens (up to the block size, the mma's N
side), and streams its tiles' quantized blocks and activations through a cp.async ring as deep
as the arch's shared memory allows (templates/stream.cuh.j2). One kernel per block size of the
spec from 16 to 64 (variant b<size>, and b<size>x2 and b<size>x4 at two and four CTAs an SM
where that fits), and on sm_90 the wgmma forms w64, w96, w128 and w160 (blocks of 64 to 160, a warp
per 16 rows: twice the warps for gate+up, each warp 8 rows of gate over the same 8 of up, and twice the
rows for the down of w64 and w96, wg_down_rows, three quarters of them for w160's gate+up, WG_WIDE_ROWS; plus
copying warps, a warp for down and a warpgroup for gate+up): the runtime has align use the variant's size.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from ..quant import QK_K, QuantType
from ..spec import ActivationDtype, Arch, MoeSpec
from .base import (
    ACT_CTYPE, ARCH_NUMBER, MMA_CTYPE, SMEM_LIMIT, THREADS_PER_WARP, Arg, KernelSpec, aligned_down_args,
    aligned_gate_up_args, gpu_block_bytes, quant_tag,
)
from .grouped import GROUPED_STRUCT, MMA_BYTES
from .grouped import supported as grouped_supported

WARPS = 8
ROWS = 16 * WARPS
"""The CTA of the wgmma variants and of the mma.sync ones at one or two CTAs an SM; the mma.sync
variants at CTAS_PER_SM[-1] take SMALL_WARPS (rows_for)."""
SMALL_WARPS = 4
BLOCK_SIZES = range(16, 65)
"""Block sizes a stream kernel is made for, among the spec's prefill.block_sizes (multiples of 16):
more than 64 would need more accumulators. b16 pays where experts have few tokens each (T = 13-32
on an H200: docs/perf-notes.md)."""
MAX_STAGES = 4
LD = QK_K + 16
"""A token's 256 activations in shared memory, padded (templates/stream.cuh.j2)."""
DEFAULT_PREFERENCE = ((32, 2), (64, 1), (32, 1))
"""The family's default variant (the manifest's), in this order where it runs on every target arch: the
default rule's stream variant where the one RULE_BY_PAIRS_PER_EXPERT names does not run on the card. b32x2 won
every tuned bucket from 32 to 1024 tokens on an H200 (qwen3moe, olmoe) before the wgmma variants existed."""
RULE_BY_PAIRS_PER_EXPERT = ((8, "b16x4"), (24, "b32x2"), (56, "w64"), (88, "w96"), (112, "w128"), (math.inf, "w160"))
"""The default rule's stream variant by the pairs an expert gets on average, T * top_k / num_experts: the
first whose bound that mean does not pass. Where the mean nears a block's height, about half the experts need a
second block, which streams their weights again, so the best block grows with the mean. Against every H200
table of qwen3moe, qwen3moe_235b, olmoe and mixtral (the buckets the stream path serves, 5-4096 tokens), this
rule's variant was within 3 % of the tuner's pick on the bucket's summed timings wherever the pick was timed (not
in the buckets pinned to the mixed b32x2+w64, whose skewed gain the rule gives up); the rule's one variant before,
b32x2, was up to 2.2x slower than the pick (docs/perf-notes.md, sixty-third session). Benched against that rule
(H200, four specs, T = 64-4096, both routings) it was 16-68 % faster on qwen3moe and 0-57 % on the others, except at
qwen3moe_235b T = 128 skewed (m = 8): +18 %. There b16x4 loses to b32x2 under skewed routing from m = 7 (+9 %), where
on qwen3moe, olmoe and mixtral it still wins or ties; a bound of 6 or 7 would cost those specs up to 14.5 %, and 8
has the least mean and worst loss over the four specs' sweep (docs/perf-notes.md, sixty-fourth session). w160 (where
the spec has it) from a mean of 112: its tuned buckets start at qwen3moe's T = 1793 and qwen3moe_235b's 1409, and in
an A/B on an H200 it made both layers 11-15 % faster at T = 2048-2560 under uniform routing, 2-5 % under skewed, up
to 5 % at 4096, and 2-3 % slower at T = 3072 uniform (docs/perf-notes.md, sixty-seventh session)."""
STATIC_SMEM = 4096
"""Room left beside the ring for the kernels' static shared memory (the per-stage Q6_K block
scales, 1 KB at four stages), where a CTA has a whole half of the SM or more."""
BLOCK_D_BYTES = 2
"""stream.cuh's block_d: each row's Q6_K block scale a stage, f16 as stored."""
WG_SCALE_TABLE_BYTES = 512
"""stream.cuh's scale_tabs: a multiplying warp's table of its 16 rows' Q4_K scales and mins in the
wgmma form (WgFrag::SCALE_SLOTS entries of 8 bytes)."""
WGMMA_ARCHS = (Arch.SM_90,)
"""Where the wgmma variants (w<size>) run: warpgroup mma, which the bundle builds as sm_90a there."""
WGMMA_BLOCK_SIZES = (64, 96, 128, 160)
"""Block sizes of the wgmma variants, whatever the spec's prefill.block_sizes (align takes the
variant's size as an override), each a wgmma's N: 128 for T >= ~1024 (each dequantised weight serves
twice the tokens of b64), and 64, which dequantises once an expert of 33-64 tokens that b32x2 does
twice: on an H200 it won qwen3moe's T = 641-1024 (-9 to -18 % uniform) and olmoe's 257-512 once the
wgmma kernels had their copying warps (it had lost to b64 before them), and qwen3moe's 513-640 once each
block's wgmma was only as wide as its real pairs. 96 holds an expert of 65-96 tokens in one block (w64
reads it twice) with w64's tall down, where w128's down is half as tall: on an H200 it took the T = 897-1408
of qwen3moe (-6 to -16 % uniform), 1025-1408 of qwen3moe_235b (-9 to -16 %) and 513-768 of olmoe (up to
-19 %) (docs/perf-notes.md). 160 holds in one block an expert of up to 160 tokens, in two one of up to 320,
where uniform routing puts the mean pairs an expert at qwen3moe's T = 2048 and 4096 (128 and 256): w128 gives
about half the experts there a partly filled last block, which costs ~60 % of a full one (sixty-sixth session).
Its gate+up takes WG_WIDE_ROWS rows a tile."""
WG_WIDE_ROWS = 96
"""Rows of each matrix a wgmma gate+up tile takes where the block is above 128 (w160): three multiplying
warpgroups, whose 80 accumulators a thread fit the 160 registers they are given (with four, at 112 a thread,
ptxas serialised every wgmma of an N = 144 kernel and spilled), and two stages of 96 rows and 160 tokens fit
beside the scale tables because the wgmma stages' tokens take 512 bytes a row (stage_bytes: with LD's pad two stages
would take 229,376 bytes, more than the 222,208 left beside the static shared memory).
Needs I to be a multiple of 96."""
PRODUCER_WARPS = {1: 1, 2: 4}
"""Copying warps of the wgmma kernels, by matrices: they issue every copy of the ring, and the
multiplying warps wait only for their stage's copies and hand the stage back on their own
(mbarriers), with no CTA barrier a step. Down (one matrix): one warp, which made the layer 3-7 %
faster at T = 512-4096 on an H200 (docs/perf-notes.md). Gate+up (two): a whole warpgroup, so that
it can give its registers to the 16 multiplying warps (setmaxnreg): with one more warp and no
reallocation ptxas gave every thread 96 registers and the kernel spilled 880 bytes."""
PRODUCER_REGS = 32
"""Registers a thread of a copying warpgroup keeps (setmaxnreg): its addresses and slots; at 24 (the
least) ptxas spilled 16 more bytes of the gate+up kernels."""
REGISTER_FILE = 65536
"""32-bit registers an SM (sm_80 and later), shared by its resident CTAs' threads."""
REGISTER_GRANULE = 8
"""Registers a thread are allocated, and setmaxnreg takes them, in multiples of this."""
WARPGROUP_WARPS = 4
WG_DOWN_TALL_ROWS = 256
"""Rows a tile of a wgmma down kernel takes where two stages of them fit and its block size is at most
WG_DOWN_TALL_MAX_BLOCK (ROWS elsewhere): 16 multiplying warps read each step's tokens, so a block's
tokens are copied H / 256 times instead of H / 128. The down kernels' steps are bound by the bytes
their SMs take in, tokens most (docs/perf-notes.md)."""
WG_DOWN_TALL_MAX_BLOCK = 96
"""The largest block size of a tall down tile: a CTA of 17 warps gets 96 registers a thread (ptxas counts
whole warpgroups), which hold a warp's BS / 2 accumulators a thread at 64 tokens, at 96 with 16-20 bytes
spilled, and not at 128 (w128's down takes 141)."""


def registers_at_launch(threads: int) -> int:
    """Registers a thread of a CTA of `threads` threads alone on an SM (ptxas's count under
    __launch_bounds__(threads, 1)): the CTA's pool, which setmaxnreg only redistributes."""
    return REGISTER_FILE // threads // REGISTER_GRANULE * REGISTER_GRANULE


def consumer_registers(threads: int, producer_warps: int) -> int:
    """Registers a thread of the multiplying warps asks for (setmaxnreg) where the copying warps are
    whole warpgroups that keep PRODUCER_REGS, else 0 (no reallocation): the CTA is given a count a
    thread for all its threads at launch (one CTA an SM), and the copiers hand back what they do not
    keep."""
    if not producer_warps or producer_warps % WARPGROUP_WARPS:
        return 0
    at_launch = registers_at_launch(threads)
    copiers = producer_warps * THREADS_PER_WARP
    spare = at_launch * threads - copiers * PRODUCER_REGS
    return spare // (threads - copiers) // REGISTER_GRANULE * REGISTER_GRANULE


CTAS_PER_SM = (1, 2, 4)
"""Occupancy variants: one CTA an SM (the deepest ring); where two stages still fit in half an
SM's shared memory and the kernel in 128 registers a thread, two (twice the warps to hide
latency; variant b<size>x2); and four CTAs of SMALL_WARPS warps (64 rows; variant b<size>x4):
the same warps an SM as x2, with four independent rings and barriers of 4 warps."""
REFILL_MAX_CTAS = 2
"""The mma.sync variants at up to this many CTAs an SM refill a stage's weights as soon as the warps
hold them in registers (stream.cuh's EARLY_REFILL): a ring of 2 stages then has 2 steps of weights in
flight instead of 1. On an H200 that made the b32x2 and b64 buckets 2.5-8 % faster at T = 128-1024 on
every shipped spec, but b16x4 1-4 % slower at T = 5-16, where most of its CTAs run one tile; the
four-CTA variants keep the ring as it was (docs/perf-notes.md)."""
SMEM_RESERVED_PER_CTA = 1024
"""Shared memory the hardware keeps per resident CTA (sm_80 and later)."""


def supported(spec: MoeSpec) -> bool:
    """As the grouped kernels (one quant type for gate and up, 16-bit activations), with ROWS-row
    tiles of both projections' outputs."""
    return (grouped_supported(spec) and spec.intermediate_size % ROWS == 0 and spec.hidden_size % ROWS == 0
            and any(bs in BLOCK_SIZES for bs in spec.prefill.block_sizes))


def rows_for(ctas: int) -> int:
    """Weight rows a CTA of an mma.sync variant takes (16 a warp)."""
    return 16 * (SMALL_WARPS if ctas == CTAS_PER_SM[-1] else WARPS)


def wg_down_rows(spec: MoeSpec, block_size: int) -> int:
    """Rows a tile of the wgmma down kernel of this block size: WG_DOWN_TALL_ROWS where the block is
    small enough for the registers, the rows divide H and a ring of two stages of them fits every
    wgmma arch the spec targets; ROWS otherwise."""
    tall, qd = WG_DOWN_TALL_ROWS, spec.quant.down
    if block_size > WG_DOWN_TALL_MAX_BLOCK or spec.hidden_size % tall:
        return ROWS
    fitting = stages_by_arch(spec, stage_bytes(qd, 1, block_size, tall, True), 1, static_smem(qd, 1, tall, 1, True))
    return tall if all(a.value in fitting for a in WGMMA_ARCHS if a in spec.target_archs) else ROWS


def tile_rows(spec: MoeSpec, block_size: int, ctas: int, matrices: int, wgmma: bool = False) -> int:
    """Weight rows of each matrix a CTA takes: rows_for(ctas), except the wgmma down's (wg_down_rows) and the
    wgmma gate+up's above 128 tokens a block (WG_WIDE_ROWS)."""
    if wgmma and matrices == 1:
        return wg_down_rows(spec, block_size)
    return WG_WIDE_ROWS if wgmma and block_size > 128 else rows_for(ctas)


def stage_bytes(qt: QuantType, matrices: int, block_size: int, rows: int = ROWS, wgmma: bool = False) -> int:
    """One k-step of a tile: each matrix's `rows` quantized blocks, and the block's activations (a row of
    LD, or of QK_K in the wgmma form, whose swizzled token tiles have no pad: stream.cuh's StreamGeometry)."""
    return matrices * rows * gpu_block_bytes(qt) + block_size * (QK_K if wgmma else LD) * MMA_BYTES


def static_smem(qt: QuantType, matrices: int, rows: int, ctas: int, wgmma: bool = False) -> int:
    """Static shared memory to keep beside the ring: STATIC_SMEM up to two CTAs an SM (as before
    the four-CTA variants), plus the wgmma form's Q4_K scale tables (WG_SCALE_TABLE_BYTES a
    multiplying warp); at more, the kernel's own, one block scale a row and stage for Q6_K
    (stream.cuh's block_d) at MAX_STAGES."""
    if ctas <= 2:
        tables = WG_SCALE_TABLE_BYTES * matrices * rows // 16 if wgmma and qt is QuantType.Q4_K else 0
        return STATIC_SMEM + tables
    return MAX_STAGES * BLOCK_D_BYTES * (matrices * rows if qt is QuantType.Q6_K else 1)


def stages_by_arch(spec: MoeSpec, stage: int, ctas: int, static: int = STATIC_SMEM) -> dict[str, int]:
    """Ring depth per target arch where at least two stages fit beside `ctas` - 1 other CTAs."""
    out = {}
    for arch in spec.target_archs:
        budget = (SMEM_LIMIT[arch] + SMEM_RESERVED_PER_CTA) // ctas - SMEM_RESERVED_PER_CTA - static
        stages = min(MAX_STAGES, budget // stage)
        if stages >= 2:
            out[arch.value] = stages
    return out


def _stages(spec: MoeSpec, block_size: int, ctas: int, wgmma: bool = False) -> tuple[dict[str, int], dict[str, int]]:
    """(gate+up, down) ring depth per arch, for the archs where both kernels fit: a variant is
    the block size align uses, so both families have it or neither does. A wgmma ring is no deeper
    than two tiles' k-steps: a claimed tile's slot is rewritten two tiles on (stream.cuh)."""
    q = spec.quant
    rows, down_rows = (tile_rows(spec, block_size, ctas, matrices, wgmma) for matrices in (2, 1))
    gate_up = stages_by_arch(spec, stage_bytes(q.gate, 2, block_size, rows, wgmma), ctas,
                             static_smem(q.gate, 2, rows, ctas, wgmma))
    down = stages_by_arch(spec, stage_bytes(q.down, 1, block_size, down_rows, wgmma), ctas,
                          static_smem(q.down, 1, down_rows, ctas, wgmma))
    both = gate_up.keys() & down.keys()
    gate_up_cap = 2 * spec.hidden_size // QK_K if wgmma else MAX_STAGES
    down_cap = 2 * spec.intermediate_size // QK_K if wgmma else MAX_STAGES
    return ({a: min(s, gate_up_cap) for a, s in gate_up.items() if a in both},
            {a: min(s, down_cap) for a, s in down.items() if a in both})


def _variants(spec: MoeSpec) -> list[tuple[int, int]]:
    """(block size, CTAs an SM) of every mma.sync stream variant that fits some target arch."""
    return [(bs, ctas) for bs in spec.prefill.block_sizes if bs in BLOCK_SIZES for ctas in CTAS_PER_SM
            if _stages(spec, bs, ctas)[0]]


@functools.lru_cache(maxsize=16)
def _wgmma_variants(spec: MoeSpec) -> tuple[int, ...]:
    """Block sizes of the wgmma variants: one CTA an SM, on the target archs that have wgmma. Cached: the default
    rule (rule_variant) asks on every forward that no table bucket serves, and working the rings out takes ~60 us."""
    return tuple(bs for bs in WGMMA_BLOCK_SIZES if set(_stages(spec, bs, 1, True)[0]) & {a.value for a in WGMMA_ARCHS}
                 and spec.intermediate_size % tile_rows(spec, bs, 1, 2, True) == 0)


MIXED_PAIRS = (("b32x2", "w64", 1.125), ("w128", "w160", 1.125))
"""Mixed variants (small, large, cost): both kernels of each family launched, and align picking the block size a
call (families/align.py pair_arg): large where its blocks, each counted `cost` blocks of small, are no more than
small's. Each block streams its expert's weights once, so under skewed routing (experts of many pairs) the large
size reads them fewer times, and under uniform routing (experts of fewer pairs than a small block) the small
kernel, the faster one a block, runs. On an H200 at qwen3moe T = 257-352, b32x2 was 7-11 % faster than w64 under
uniform routing and w64 14-18 % faster under skewed; a w64 block cost ~1.1 b32x2 blocks (docs/perf-notes.md).
w128+w160: where both sizes give each expert the same number of blocks (qwen3moe T = 3072 under uniform routing,
two each), w160's 96-row gate+up tiles make it ~3 % slower than w128, and where w160 saves blocks it is up to
17 % faster; both members read x_sorted (runtime.py: gather_x then writes it whichever size align picks)."""
MIXED_SEPARATOR = "+"


def mixed_variants(spec: MoeSpec) -> dict[str, tuple[str, str, float]]:
    """name ("small+large") -> MIXED_PAIRS entry, for the pairs whose two variants the spec has (each a variant of
    both stream families, with two kernels: _mixed_kernels)."""
    have = {k.variant for k in gate_up_kernels(spec)}
    return {mixed_name(small, large): (small, large, cost) for small, large, cost in MIXED_PAIRS
            if small in have and large in have}


def mixed_name(small: str, large: str) -> str:
    """A mixed variant's name, as the tables and the runtime take it."""
    return f"{small}{MIXED_SEPARATOR}{large}"


def variant_parts(variant: str) -> tuple[str, ...]:
    """The variants whose kernels a stream variant launches: itself, or a mixed variant's two."""
    return tuple(variant.split(MIXED_SEPARATOR))


def variant_block_sizes(spec: MoeSpec) -> dict[str, int]:
    """The block size (align's override) of each stream variant, and of each mixed variant the larger
    of its two (the most align may pad to); both families have the same variants, which the tables and
    the runtime take in lockstep."""
    sizes = {k.variant: k.launch["block_size"] for k in gate_up_kernels(spec) if "mixed" not in k.launch}
    return {**sizes, **{name: sizes[large] for name, (_, large, _) in mixed_variants(spec).items()}}


def default_variant(spec: MoeSpec) -> tuple[int, int]:
    """The variant the default rule uses: the first of DEFAULT_PREFERENCE that runs on every
    target arch the stream path runs on, else the first variant."""
    every = {a for v in _variants(spec) for a in _stages(spec, *v)[0]}
    fits_all = [v for v in _variants(spec) if set(_stages(spec, *v)[0]) == every]
    return next((v for v in DEFAULT_PREFERENCE if v in fits_all), (fits_all or _variants(spec))[0])


def rule_variant(spec: MoeSpec, tokens: int) -> str:
    """The default rule's stream variant for `tokens` (RULE_BY_PAIRS_PER_EXPERT): w128 past its bound where the
    spec has no w160 (WG_WIDE_ROWS does not divide its I)."""
    pairs_per_expert = tokens * spec.top_k / spec.num_experts
    variant = next(variant for bound, variant in RULE_BY_PAIRS_PER_EXPERT if pairs_per_expert <= bound)
    return "w128" if variant == "w160" and 160 not in _wgmma_variants(spec) else variant


WG_STEP_GROUPS = {
    QuantType.Q4_K: (lambda s: 8 * (s >> 2) + (s & 3), 4),
    QuantType.Q6_K: (lambda s: 16 * (s >> 3) + 4 * (s & 1) + 2 * ((s >> 2) & 1) + ((s >> 1) & 1), 8),
}
"""For each down quant type, the wgmma down kernel's k groups (8 columns each) of k-step s (0-15) of a
256-column block: group(s) and group(s) + the second value (stream.cuh's WgFrag::group and LBO_GROUPS,
which the gate+up kernels' static_assert checks this against)."""
CHUNKS_PER_BLOCK = QK_K // 8
TMA_ALIGN = 128
"""Alignment of the other stream kernels' ring in shared memory. Their bulk weight copies need only 16
bytes; 128 is what their static shared memory, registers and tuning tables were measured with."""
SWIZZLE_ALIGN = 1024
"""The ring alignment of the wgmma kernels whose tokens are in the 128-byte swizzle (the downs, and the Q4_K
gate+ups): atoms of 1024 bytes, which wgmma's swizzled descriptors read from their 1024-byte boundaries
(stream.cuh's SW)."""


def chunk_order(qt: QuantType) -> tuple[int, ...]:
    """Where the wgmma gate+up kernels store a's columns for their down kernel (of quant type qt): 16-byte
    chunk c (8 columns) of each 256-column block goes to chunk chunk_order(qt)[c], so that k-step s's two
    k groups are chunks 2 s and 2 s + 1 and the down's token copies are whole 128-byte rows."""
    group, lbo = WG_STEP_GROUPS[qt]
    order = [0] * CHUNKS_PER_BLOCK
    for s in range(CHUNKS_PER_BLOCK // 2):
        for half in range(2):
            order[group(s) + half * lbo] = 2 * s + half
    return tuple(order)


def sorted_x(spec: MoeSpec) -> bool:
    """Whether the spec's wgmma gate+up kernels read their tokens from x_sorted (prefill.sorted_x: a copy
    of x in align's order, with each 256-column block's chunks in the Q4_K k-step order, made by the
    gather_x kernel), by tensor copies of 128-byte rows, as down reads a."""
    return spec.prefill.sorted_x and supported(spec) and bool(_wgmma_variants(spec))


def mins_apart(spec: MoeSpec, block_size: int, ctas: int) -> bool:
    """Whether the mma.sync gate+up variant of this block size and CTA count takes Q4_K's min terms apart: each
    weight's A register is q * scale alone, one fused multiply-add from its code (a subtraction less for every
    two weights), and each sub-block's min times the token's sum over the sub-block is added by one mma a block
    and token group, from the router's sums (router.cuh's sub_block_sums, through X_SUMS). bf16 only: the
    multiply-add's constant, -MAGIC * scale, can overflow f16. Not MINS_APART_EXCLUDED."""
    return (supported(spec) and spec.activation_dtype is ActivationDtype.BF16 and spec.quant.gate is QuantType.Q4_K
            and (block_size, ctas) not in MINS_APART_EXCLUDED)


MINS_APART_EXCLUDED = ((32, 2),)
"""(block size, CTAs an SM) of the mma.sync variants that keep Q4_K's mins in each weight: b32x2, whose 128
registers a thread held the mins apart only with 52-64 bytes spilled, and whose gate+up then lost 3-8 % at
T = 256-384 on an H200 (docs/perf-notes.md). Within a form (mma.sync with the mins apart, mma.sync with them in
each weight, wgmma) every block size gives the same bits."""


def x_sums(spec: MoeSpec) -> bool:
    """Whether some gate+up variant of the spec takes the mins apart (mins_apart), so that the router sums x's
    sub-blocks (for the calls that run one) and the layer holds those sums."""
    return supported(spec) and any(mins_apart(spec, bs, ctas) for bs, ctas in _variants(spec))


X_SUMS = Arg("x_sums", "const u32*")
"""Each token's x summed over each 32-element sub-block, as the router stores them (x_sums); read by the
mma.sync gate+up kernels of a spec with x_sums, ignored by its wgmma ones."""


def y_by_row(spec: MoeSpec, variant: str) -> bool:
    """Whether the variant's down stores y by a's row instead of by pair: where its gate+up reads x_sorted,
    which shares y's buffer (runtime.py), so that each block's rows of it are overwritten only after the
    block's gate+up tiles have read them. The gather_x kernel writes each pair's row for the combine."""
    return sorted_x(spec) and variant.startswith("w")


def a_columns(spec: MoeSpec, variant: str) -> list[int] | None:
    """For a stream variant whose gate+up stores a in its down's k-step order (the wgmma ones), the
    stored column of each of a's columns (intermediate_size of them); None where a is stored as is."""
    if not variant.startswith("w"):
        return None
    return _stored_columns(chunk_order(spec.quant.down), spec.intermediate_size)


def x_columns(spec: MoeSpec) -> list[int] | None:
    """With prefill.sorted_x, the column of x_sorted that holds each of x's columns (hidden_size of them:
    the Q4_K k-step order, which the wgmma gate+up kernels' tensor copies read); else None."""
    return _stored_columns(chunk_order(QuantType.Q4_K), spec.hidden_size) if sorted_x(spec) else None


def _stored_columns(order: tuple[int, ...], columns: int) -> list[int]:
    """Where each of `columns` columns is stored when each 256-column block's chunk c goes to order[c]."""
    return [c - c % QK_K + 8 * order[(c % QK_K) // 8] + c % 8 for c in range(columns)]


def _kernels(spec: MoeSpec, family: str, quant_name: str, qt: QuantType, out_dim: int, matrices: int,
             args: tuple[Arg, ...], values: dict) -> list[KernelSpec]:
    if not supported(spec):
        return []
    dtype = spec.activation_dtype
    default = default_variant(spec)
    out = []
    wgmma = [(bs, 1, True) for bs in _wgmma_variants(spec)]
    sorted_tokens = matrices == 2 and sorted_x(spec)
    for bs, ctas, wg in [(bs, ctas, False) for bs, ctas in _variants(spec)] + wgmma:
        stages = _stages(spec, bs, ctas, wg)[0 if matrices == 2 else 1]
        if wg:
            stages = {a: n for a, n in stages.items() if a in {w.value for w in WGMMA_ARCHS}}
        rows = tile_rows(spec, bs, ctas, matrices, wg)
        stage = stage_bytes(qt, matrices, bs, rows, wg)
        by_arch = [(ARCH_NUMBER[a], stages[a.value], stages[a.value] * stage)
                   for a in spec.target_archs if a.value in stages]
        # the wgmma form gives each warp 16 rows in all (gate+up: 8 of each matrix): twice the warps for gate+up
        producer = PRODUCER_WARPS[matrices] if wg else 0
        threads = (rows // 16 * (matrices if wg else 1) + producer) * THREADS_PER_WARP
        variant = f"w{bs}" if wg else f"b{bs}" + (f"x{ctas}" if ctas > 1 else "")
        apart = matrices == 2 and not wg and mins_apart(spec, bs, ctas)
        out.append(KernelSpec(
            uri=f"{family}_{quant_name}_{variant}_{spec.shape_tag}_{dtype.value}",
            family=family,
            template=f"{family}.cu.j2",
            variant=variant,
            default=not wg and (bs, ctas) == default,
            archs=None if len(stages) == len(spec.target_archs) else tuple(stages),
            values={**values, "BS": bs, "ROWS": rows, "THREADS": threads, "CTAS_PER_SM": ctas,
                    "WGMMA": "true" if wg else "false", "PRODUCER_WARPS": producer,
                    "PRODUCER_REGS": PRODUCER_REGS, "CONSUMER_REGS": consumer_registers(threads, producer),
                    "REFILL": "true" if not wg and ctas <= REFILL_MAX_CTAS else "false",
                    "MMA_T": MMA_CTYPE[dtype], "GROUPED_Q": GROUPED_STRUCT[qt],
                    "DOWN_GROUPED_Q": GROUPED_STRUCT[spec.quant.down], "A_IN_STEP_ORDER": "true" if wg else "false",
                    "A_CHUNKS": chunk_order(spec.quant.down) if wg else tuple(range(CHUNKS_PER_BLOCK)),
                    "SMEM_ALIGN": SWIZZLE_ALIGN if wg and (matrices == 1 or qt is QuantType.Q4_K) else TMA_ALIGN,
                    "SORTED_X": "true" if wg and sorted_tokens else "false",
                    "MINS_APART": "true" if apart else "false",
                    "Y_BY_ROW": "true" if y_by_row(spec, variant) else "false", "STAGES_BY_ARCH": by_arch,
                    "MIXED": "false", "PLAN_READY": "false"},
            args=args,
            launch={"threads": threads,
                    "grid": "min(tiles for the largest plan, resident CTAs)", "block_size": bs, "tile_n": rows,
                    "n_tiles": out_dim // rows, "ctas_per_sm": ctas,
                    "producer_warps": producer, "token_map_rows": bs if producer and (matrices == 1 or sorted_tokens) else 0,
                    "x_sums": apart,
                    "y_by_row": matrices == 1 and y_by_row(spec, variant),
                    "stages": stages,
                    "smem_bytes": {a: s * stage for a, s in stages.items()}},
        ))
    return out + _mixed_kernels(spec, out, family, quant_name, matrices)


def _mixed_kernels(spec: MoeSpec, kernels: list[KernelSpec], family: str, quant_name: str,
                   matrices: int) -> list[KernelSpec]:
    """The kernels of each mixed variant (MIXED_PAIRS) whose two variants the spec has: a copy of each, small first
    (the runtime launches them in this order), built with MIXED (templates/stream.cuh.j2: a kernel of the size align
    did not choose returns at once), its gate+up taking plan_ready. The other variants' kernels are built without it,
    so their code is what it was before mixed variants existed."""
    by_variant = {k.variant: k for k in kernels}
    out = []
    for small, large, _ in MIXED_PAIRS:
        if small not in by_variant or large not in by_variant:
            continue
        name = mixed_name(small, large)
        for member, other in ((small, large), (large, small)):
            k = by_variant[member]
            out.append(dataclasses.replace(
                k, uri=k.uri.replace(f"_{member}_", f"_{member}_mix_{other}_", 1), variant=name, default=False,
                values={**k.values, "MIXED": "true", "PLAN_READY": "plan_ready != 0" if matrices == 2 else "false"},
                args=(*k.args, PLAN_READY) if matrices == 2 else k.args,
                launch={**k.launch, "mixed": name, "member": member}))
    return out


ACT_MAP = Arg("act_map", "const void*")
"""The tensor map of the kernel's tokens in sorted order, a real slot a row (down: a; gate+up with
prefill.sorted_x: x_sorted), boxes of a block's rows by 64 columns in the 128-byte swizzle: a step's tokens
are four of them (runtime.py, launch.swizzled_rows_tensor_map). Read by the wgmma variants on sm_90,
ignored elsewhere."""
BLOCK_READY = Arg("block_ready", "int*")
"""Rows of a stored, by aligned block (zeroed by align): gate+up adds each tile's rows, down waits for
a block's I rows before it reads them (templates/stream.cuh.j2)."""
PLAN_READY = Arg("plan_ready", "int")
"""1 where align's plan is complete before the gate+up kernel starts (the second gate+up kernel of a mixed variant:
runtime.py), so that a kernel of the block size align did not choose returns without waiting (templates/stream.cuh.j2)."""
TILE_CLAIMS = Arg("tile_claims", "int*")
"""The kernel's count of tiles claimed at run time (the wgmma variants; one int a kernel, zero between
calls: the call's last claim zeroes it; templates/stream.cuh.j2). Ignored by the mma.sync variants."""


def gate_up_kernels(spec: MoeSpec) -> list[KernelSpec]:
    q, dtype = spec.quant, spec.activation_dtype
    return _kernels(spec, "stream_gate_up_silu", quant_tag(q.gate, q.up), q.gate, spec.intermediate_size, 2,
                    (*aligned_gate_up_args(dtype), *((ACT_MAP,) if sorted_x(spec) else ()),
                     *((X_SUMS,) if x_sums(spec) else ()), BLOCK_READY, TILE_CLAIMS),
                    {"H": spec.hidden_size, "I": spec.intermediate_size, "K_TOP": spec.top_k,
                     "ACT_MAP": "act_map" if sorted_x(spec) else "/*act_map*/ nullptr",
                     "X_SUMS": "x_sums" if x_sums(spec) else "/*x_sums*/ nullptr"})


def down_kernels(spec: MoeSpec) -> list[KernelSpec]:
    qd, dtype = spec.quant.down, spec.activation_dtype
    return _kernels(spec, "stream_down", qd.value, qd, spec.hidden_size, 1,
                    (*aligned_down_args(dtype), ACT_MAP, BLOCK_READY, TILE_CLAIMS),
                    {"H": spec.hidden_size, "I": spec.intermediate_size, "OUT_T": ACT_CTYPE[dtype]})
