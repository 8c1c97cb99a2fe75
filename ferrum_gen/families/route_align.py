"""Route-align family: the router and align in one launch of one CTA, for the aligned paths' small calls."""

from __future__ import annotations

from ..spec import MoeSpec
from . import align, router, stream
from .base import KernelSpec

THREADS = align.THREADS
"""align's CTA size: a warp a token routes up to 32 tokens at once."""
MAX_TOKENS = 16
"""The most tokens the runtime routes and aligns in one launch; above, the router's grid then align (which
routes many tokens faster: one SM's warps routing 32-64 tokens made the stream path 1-6 % slower on an
H200, and 24 tokens as fast as the two launches; docs/perf-notes.md)."""


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    """The kernel; where the router sums x's sub-blocks for the stream gate+up kernels (stream.x_sums), its CTAs
    past the first do so too (of the first num_sum_tokens tokens, a warp a token and the router's tokens a CTA)."""
    norm = "renorm" if spec.norm_topk_prob else "nonorm"
    sums = stream.x_sums(spec)
    uri = (f"route_align_e{spec.num_experts}_k{spec.top_k}_{norm}_{align.plan_tag(spec)}_t{MAX_TOKENS}"
           + (f"_xsums_h{spec.hidden_size}_bf16" if sums else ""))
    return [
        KernelSpec(
            uri=uri,
            family="route_align",
            template="route_align.cu.j2",
            values={
                **router.routing_values(spec),
                **align.plan_values(spec),
                "THREADS": THREADS,
                "MAX_TOKENS": MAX_TOKENS,
                "SUM_WARPS": router.TOKENS_PER_CTA,
                "SUM_H": spec.hidden_size if sums else 0,
                "SUM_ARGS": router.sum_args(sums),
            },
            args=(*router.ROUTING_ARGS, *(router.SUM_ARGS if sums else ()), *align.PLAN_ARGS),
            launch={"threads": THREADS, "grid": "1 + ceil(num_sum_tokens / tokens_per_cta)",
                    "tokens_per_cta": router.TOKENS_PER_CTA, "max_tokens": MAX_TOKENS, "smem_bytes": 0, "x_sums": sums},
        )
    ]
