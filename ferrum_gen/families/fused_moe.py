"""Fused family: the whole layer for one or two tokens in one launch (routing, gate+up+SiLU, down,
combine).

One kernel a token count and way of filling its rings (VARIANTS), for sm_90 (mbarriers count its
copies): a persistent grid, every CTA routes the tokens, copies its share of the layer's weights into
two rings in shared memory (gate+up units and down units, all in flight at once where they fit),
multiplies them by integer dot products as the o1i kernels do, and the CTAs meet once between gate+up
and down (templates/fused_moe.cu.j2). A kernel serves exactly its token count. A spec whose one-token
rings cannot fit sm_90's shared memory has no fused path; one whose two-token rings cannot, no
two-token kernels.
"""

from __future__ import annotations

import math

from ..quant import QK_K, layout
from ..spec import Arch, MoeSpec
from .base import ACT_CTYPE, DOWN_WEIGHTS, GATE_UP_WEIGHTS, MMA_CTYPE, SMEM_LIMIT, Arg, KernelSpec, quant_tag
from .grouped import GROUPED_STRUCT, ROWS_PER_CTA, XINT16_BYTES, warps_for
from .grouped import supported as grouped_supported

FAMILY = "fused_moe"
VARIANTS = {"f1": (1, False, False), "f1d": (1, False, True), "f1b": (1, True, True), "f2b": (2, True, True)}
"""variant -> (the tokens it serves, whether its gate+up and down rings are filled by bulk copies (the
copy engine) rather than by 16-byte cp.async copies: the two draw on different limits of an SM's copies
in flight). Two tokens by cp.async (f2) lost to bulk copies by 5-10 % on every spec and was dropped."""
ARCH = Arch.SM_90
REFERENCE_SMS = 132
"""The rings are sized to hold a CTA's whole share of the layer on a card of this many SMs (an H100 SXM
or H200) where that fits; on a card with fewer SMs a CTA's share is larger and the rings wrap."""
SMEM_MARGIN = 1024
"""Bytes left under the arch's limit for the kernel's static shared memory (the routing's ids and weights)."""

DOWN_WARP_FACTOR = 2
"""The CTA has this many times gate+up's warps (warps_for(H)): all of them multiply down, the chain
after the CTAs meet, where at two warps a scheduler the dot products' latency showed (docs/perf-notes.md)."""
D_BYTES = ROWS_PER_CTA * 2
GU_MIN_DEPTH = 3
"""Gate+up chunks a warp keeps in flight at least before down's ring may take a CTA's whole share of
down: with one, each of a warp's chunks waits a whole memory latency after the one before it (two
tokens on qwen3moe lost 12 % to the three-kernel chain so, docs/perf-notes.md)."""


def _mat_bytes(qt) -> int:
    """One ring chunk's share of a matrix: 16 rows of one block, and their block scales if kept apart."""
    lay = layout(qt)
    return ROWS_PER_CTA * lay.gpu_block_bytes + (D_BYTES if lay.separate_scale else 0)


def geometry(spec: MoeSpec, tokens: int = 1) -> dict[str, int] | None:
    """Units, warps, ring slots and shared memory of the spec's fused kernel for `tokens` tokens; None
    where its rings cannot fit sm_90's shared memory.

    Down's chunks are multiplied only after the CTAs meet, so a down ring that wraps leaves copies
    for after the meeting point: where a CTA's whole share of down fits beside GU_MIN_DEPTH gate+up
    slots a warp, down's ring holds it and gate+up's takes the rest (gate+up's chunks are consumed
    while the copies stream). Elsewhere the two rings share the room in proportion to their needs.
    a's int16 blocks take gate+up's ring once the CTAs have met. (Copying down's chunks that its
    ring cannot hold into the rest of gate+up's ring before the CTAs meet lost 0.3-3 %: those
    copies slow the last CTAs' gate+up, which the meeting waits for; docs/perf-notes.md.)"""
    H, I = spec.hidden_size, spec.intermediate_size
    pairs = tokens * spec.top_k
    warps = warps_for(H)
    dn_warps = DOWN_WARP_FACTOR * warps
    kb, kbi = H // QK_K, I // QK_K
    gu_units, dn_units, dn_chunks = pairs * I // ROWS_PER_CTA, H // ROWS_PER_CTA, pairs * kbi
    gu_bytes, dn_bytes = 2 * _mat_bytes(spec.quant.gate), _mat_bytes(spec.quant.down)
    a_bytes = dn_chunks * XINT16_BYTES
    fixed = tokens * kb * XINT16_BYTES + 2 * warps * 2 * ROWS_PER_CTA * 4 + 2 * dn_chunks * ROWS_PER_CTA * 4
    limit = SMEM_LIMIT[ARCH] - SMEM_MARGIN
    gu_need = math.ceil(gu_units / REFERENCE_SMS) * kb
    dn_need = math.ceil(dn_units / REFERENCE_SMS) * dn_chunks
    barrier = 8  # each slot's mbarrier
    # Every chunk a slot holds is copied and multiplied by one warp, so a slot's phases are waited for
    # in order (a wait by parity cannot tell phase n from n + 2): gate+up chunk c goes to warp
    # c % warps, down chunk c to warp c % dn_chunks % dn_warps. (kb is a multiple of warps, so both
    # needs are multiples of their steps.)
    gu_step = warps
    dn_step = dn_warps if dn_chunks % dn_warps == 0 else dn_chunks

    def size(gu: int, dn: int) -> int:
        return max(gu * gu_bytes, a_bytes) + dn * dn_bytes + (gu + dn) * barrier + fixed

    def fits(gu: int, dn: int) -> bool:
        return size(gu, dn) <= limit

    if fits(GU_MIN_DEPTH * gu_step, dn_need):
        dn_slots, gu_slots = dn_need, GU_MIN_DEPTH * gu_step
        while gu_slots < gu_need and fits(gu_slots + gu_step, dn_slots):
            gu_slots += gu_step
    else:
        scale = min(1.0, (limit - fixed) / (gu_need * (gu_bytes + barrier) + dn_need * (dn_bytes + barrier)))
        gu_slots = max(gu_step, int(gu_need * scale) // gu_step * gu_step)
        dn_slots = max(dn_step, int(dn_need * scale) // dn_step * dn_step)
        while not fits(gu_slots, dn_slots):
            if dn_slots > dn_step:
                dn_slots -= dn_step
            elif gu_slots > gu_step:
                gu_slots -= gu_step
            else:
                return None
        grew = True
        while grew:  # what the rounding left unused, gate+up's ring first
            grew = False
            if gu_slots < gu_need and fits(gu_slots + gu_step, dn_slots):
                gu_slots, grew = gu_slots + gu_step, True
            if dn_slots < dn_need and fits(gu_slots, dn_slots + dn_step):
                dn_slots, grew = dn_slots + dn_step, True
    return {"warps": warps, "dn_warps": dn_warps, "gu_units": gu_units, "dn_units": dn_units, "dn_chunks": dn_chunks,
            "gu_slots": gu_slots, "dn_slots": dn_slots, "smem": size(gu_slots, dn_slots)}


def supported(spec: MoeSpec) -> bool:
    """Where the grouped kernels exist (16-bit activations, gate and up of one quant type), the spec
    targets sm_90 and the one-token rings fit its shared memory."""
    return grouped_supported(spec) and ARCH in spec.target_archs and geometry(spec) is not None


def max_tokens(spec: MoeSpec) -> int:
    """The most tokens a fused kernel of the spec serves (0: no fused path)."""
    if not supported(spec):
        return 0
    return max(t for t, _, _ in VARIANTS.values() if geometry(spec, t) is not None)


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    """The fused kernels (one a token count and way of filling the rings), where supported."""
    if not supported(spec):
        return []
    q, dtype = spec.quant, spec.activation_dtype
    geos = {t: geometry(spec, t) for t in {t for t, _, _ in VARIANTS.values()}}
    return [KernelSpec(
        uri=f"{FAMILY}_{quant_tag(q.gate, q.up, q.down)}_{variant}_{spec.shape_tag}_{dtype.value}",
        family=FAMILY,
        template=f"{FAMILY}.cu.j2",
        variant=variant,
        default=variant == "f1",
        archs=(ARCH.value,),
        values={
            "H": spec.hidden_size,
            "I": spec.intermediate_size,
            "E": spec.num_experts,
            "K_TOP": spec.top_k,
            "TOKENS": tokens,
            "NORM_TOPK": "true" if spec.norm_topk_prob else "false",
            "WARPS": geo["warps"],
            "DN_WARPS": geo["dn_warps"],
            "GU_BULK": "true" if gu_bulk else "false",
            "DN_BULK": "true" if dn_bulk else "false",
            "GU_SLOTS": geo["gu_slots"],
            "DN_SLOTS": geo["dn_slots"],
            "ACT_T": ACT_CTYPE[dtype],
            "MMA_T": MMA_CTYPE[dtype],
            "GATE_UP_Q": GROUPED_STRUCT[q.gate],
            "DOWN_Q": GROUPED_STRUCT[q.down],
            "SMEM_BYTES": geo["smem"],
        },
        args=(
            Arg("x", f"const {ACT_CTYPE[dtype]}*"),
            Arg("logits", "const float*"),
            Arg("ids", "int*"),
            Arg("weights", "float*"),
            *GATE_UP_WEIGHTS,
            *DOWN_WEIGHTS,
            Arg("a", f"{MMA_CTYPE[dtype]}*"),
            Arg("sync", "int*"),
            Arg("out", f"{ACT_CTYPE[dtype]}*"),
        ),
        launch={"threads": geo["dn_warps"] * 32, "grid": "resident CTAs (one an SM), all at once",
                "tokens": tokens, "bulk_copies": [gu_bulk, dn_bulk], "routes": True, "integer_dot": True,
                "gate_up_units": geo["gu_units"], "down_units": geo["dn_units"], "smem_bytes": {ARCH.value: geo["smem"]}},
    ) for variant, (tokens, gu_bulk, dn_bulk) in VARIANTS.items() if (geo := geos[tokens]) is not None]
