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


PLAN_ARGS = (Arg("block_size_override", "int"), Arg("sorted_ids", "int*"), Arg("block_expert", "int*"),
             Arg("block_ready", "int*"), Arg("block_a_row", "int*"), Arg("plan", "int*"))
"""The block size override (0: the padding rule) and align's outputs, as the kernels that make the plan (align,
route_align) take them."""


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
