"""Align family: counting sort of the pairs by expert, padded to the chosen block size."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import Arg, KernelSpec

THREADS = 1024


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
                # repr() round-trips the float64 exactly, so the device compares like numpy does
                "PADDING_BUDGET": repr(float(budget)),
            },
            args=(
                Arg("ids", "const int*"),
                Arg("num_pairs", "int"),
                Arg("block_size_override", "int"),
                Arg("sorted_ids", "int*"),
                Arg("block_expert", "int*"),
                Arg("plan", "int*"),
                Arg("pairs_by_token", "int*"),
            ),
            launch={"threads": THREADS, "grid": "1", "smem_bytes": 0,
                    "block_sizes": list(sizes), "padding_budget": budget},
        )
    ]
