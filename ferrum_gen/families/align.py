"""Align family: counting sort of the pairs by expert, padded to the chosen block size."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import Arg, KernelSpec

THREADS = 1024
PAIRS_PER_CTA = 4 * THREADS
"""Pairs each CTA places: a call of more pairs is sorted by ceil(pairs / PAIRS_PER_CTA) CTAs after
align_count has counted each one's chunk (one CTA alone spent ~40 us on T = 4096's 32768 pairs on
an H200, most of it issuing the scattered stores from one SM)."""


def cta_count(num_pairs: int) -> int:
    """align's grid for a call of num_pairs pairs (align_count runs first when it is above 1)."""
    return max(1, -(-num_pairs // PAIRS_PER_CTA))


PLAN_ARGS = (Arg("block_size_override", "int"), Arg("block_pair", "int"), Arg("sorted_ids", "int*"),
             Arg("block_expert", "int*"), Arg("block_ready", "int*"), Arg("block_a_row", "int*"), Arg("plan", "int*"))
"""The block size override (0: the padding rule, or block_pair's where that is not 0: pair_arg) and align's outputs,
as the kernels that make the plan (align, route_align) take them."""


def pair_arg(small: int, large: int, cost: float) -> int:
    """align's block_pair for a mixed stream variant (families/stream.py MIXED_PAIRS): align picks `large` where the
    call's blocks of it, each counted `cost` blocks of `small` (rounded to eighths), are no more than its blocks of
    `small` (align.cuh.j2; reference.pick_block_size mirrors it)."""
    eighths = round(cost * 8)
    if not (0 < small < large < 256 and 0 < eighths < 2 ** 14):
        raise ValueError(f"block pair ({small}, {large}) at cost {cost}: need 0 < small < large < 256 and 0 < cost < 2048")
    return small | large << 8 | eighths << 16


def unpack_pair_arg(block_pair: int) -> tuple[int, int, int]:
    """(small, large, cost in eighths) of a pair_arg."""
    return block_pair & 0xFF, (block_pair >> 8) & 0xFF, block_pair >> 16


def plan_tag(spec: MoeSpec) -> str:
    """The plan's rule in a kernel's uri: the candidate block sizes and the padding budget."""
    return f"bs{'_'.join(map(str, spec.prefill.block_sizes))}_pad{round(spec.prefill.padding_budget * 100)}"


def plan_values(spec: MoeSpec) -> dict[str, object]:
    """The plan's rule as align.cuh's align_chunk takes it: E, the candidate block sizes, and the padding budget as a
    C++ double (repr() round-trips the float64 exactly, so the device compares like numpy does)."""
    return {"E": spec.num_experts, "BLOCK_SIZES": list(spec.prefill.block_sizes),
            "PADDING_BUDGET": repr(float(spec.prefill.padding_budget))}


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    return [
        KernelSpec(
            uri=f"align_block_size_e{spec.num_experts}_{plan_tag(spec)}",
            family="align",
            template="align.cu.j2",
            values={**plan_values(spec), "THREADS": THREADS, "PAIRS_PER_CTA": PAIRS_PER_CTA},
            args=(
                Arg("ids", "const int*"),
                Arg("num_pairs", "int"),
                Arg("counts", "const int*"),
                *PLAN_ARGS,
            ),
            launch={"threads": THREADS, "grid": "ceil(num_pairs / pairs_per_cta), at least 1",
                    "pairs_per_cta": PAIRS_PER_CTA, "smem_bytes": 0,
                    "block_sizes": list(spec.prefill.block_sizes), "padding_budget": spec.prefill.padding_budget},
        )
    ]
