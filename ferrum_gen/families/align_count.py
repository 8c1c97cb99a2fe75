"""Align-count family: per-chunk expert histograms, so that align can sort large calls with many CTAs."""

from __future__ import annotations

from ..spec import MoeSpec
from .align import PAIRS_PER_CTA, THREADS
from .base import Arg, KernelSpec


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    return [
        KernelSpec(
            uri=f"align_count_e{spec.num_experts}_c{PAIRS_PER_CTA}",
            family="align_count",
            template="align_count.cu.j2",
            values={"E": spec.num_experts, "THREADS": THREADS, "PAIRS_PER_CTA": PAIRS_PER_CTA},
            args=(
                Arg("ids", "const int*"),
                Arg("num_pairs", "int"),
                Arg("counts", "int*"),
            ),
            launch={"threads": THREADS, "grid": "ceil(num_pairs / pairs_per_cta), only when above 1",
                    "pairs_per_cta": PAIRS_PER_CTA, "smem_bytes": 0},
        )
    ]
