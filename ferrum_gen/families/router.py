"""Router family: softmax + top-k + weights, one warp per token."""

from __future__ import annotations

from ..spec import MoeSpec
from . import grouped, stream
from .base import Arg, KernelSpec

TOKENS_PER_CTA = 4
SUM_ARGS = (Arg("x", "const __nv_bfloat16*"), Arg("x_sums", "u32*"), Arg("num_sum_tokens", "int"))
"""The arguments of x's sub-block sums (router.cuh sub_block_sums), where a routing kernel makes them."""


ROUTING_ARGS = (Arg("logits", "const float*"), Arg("ids", "int*"), Arg("weights", "float*"), Arg("num_tokens", "int"))
"""What a routing kernel (the router, route_align) reads and writes: the logits, and each token's picks and weights."""


def routing_values(spec: MoeSpec) -> dict[str, object]:
    """router.cuh's route_token as a routing kernel instantiates it."""
    return {"E": spec.num_experts, "K_TOP": spec.top_k, "NORM_TOPK": "true" if spec.norm_topk_prob else "false"}


def sum_args(sums: bool) -> str:
    """sub_block_sums' arguments in a routing kernel: its own, or none (SUM_H = 0 makes it do nothing)."""
    return ", ".join(arg.name for arg in SUM_ARGS) if sums else "nullptr, nullptr, 0"


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    """The router; where the spec's stream gate+up kernels take Q4_K's min terms apart (stream.x_sums), the
    one whose CTAs past the routing's also sum x's sub-blocks for them (of the first num_sum_tokens tokens: 0
    where the call's gate+up does not read them)."""
    norm = "renorm" if spec.norm_topk_prob else "nonorm"
    sums = stream.x_sums(spec)
    uri = (f"router_topk_softmax_xsums_h{spec.hidden_size}_e{spec.num_experts}_k{spec.top_k}_{norm}_bf16" if sums
           else f"router_topk_softmax_e{spec.num_experts}_k{spec.top_k}_{norm}")
    return [
        KernelSpec(
            uri=uri,
            family="router",
            template="router.cu.j2",
            values={
                **routing_values(spec),
                "WARPS": TOKENS_PER_CTA,
                "SUM_H": spec.hidden_size if sums else 0,
                "SUM_ARGS": sum_args(sums),
                "COUNTED_PAIRS": grouped.INT_DOT_MAX_PAIRS,
                "PAIR_READY_STRIDE": grouped.PAIR_READY_STRIDE,
            },
            args=(
                *ROUTING_ARGS,
                *(SUM_ARGS if sums else ()),
                grouped.PAIR_READY,
            ),
            launch={"threads": TOKENS_PER_CTA * 32,
                    "grid": "ceil(num_tokens / tokens_per_cta) + ceil(num_sum_tokens / tokens_per_cta)",
                    "tokens_per_cta": TOKENS_PER_CTA, "smem_bytes": 0, "x_sums": sums},
        )
    ]
