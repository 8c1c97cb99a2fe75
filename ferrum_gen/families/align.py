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


def padding_budget_literal(spec: MoeSpec) -> str:
    """The padding budget as a C++ double: repr() round-trips the float64 exactly, so the device compares like
    numpy does."""
    return repr(float(spec.prefill.padding_budget))


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    sizes = spec.prefill.block_sizes
    budget = spec.prefill.padding_budget
    uri = f"align_block_size_e{spec.num_experts}_bs{'_'.join(map(str, sizes))}_pad{round(budget * 100)}"
    return [
        KernelSpec(
            uri=uri,
            family="align",
            template="align.cu.j2",
            values={
                "E": spec.num_experts,
                "THREADS": THREADS,
                "BLOCK_SIZES": list(sizes),
                "PADDING_BUDGET": padding_budget_literal(spec),
                "PAIRS_PER_CTA": PAIRS_PER_CTA,
            },
            args=(
                Arg("ids", "const int*"),
                Arg("num_pairs", "int"),
                Arg("counts", "const int*"),
                Arg("block_size_override", "int"),
                Arg("sorted_ids", "int*"),
                Arg("block_expert", "int*"),
                Arg("block_ready", "int*"),
                Arg("block_a_row", "int*"),
                Arg("plan", "int*"),
            ),
            launch={"threads": THREADS, "grid": "ceil(num_pairs / pairs_per_cta), at least 1",
                    "pairs_per_cta": PAIRS_PER_CTA, "smem_bytes": 0,
                    "block_sizes": list(sizes), "padding_budget": budget},
        )
    ]
