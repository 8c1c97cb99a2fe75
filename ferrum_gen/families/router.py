"""Router family: softmax + top-k + weights, one warp per token."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import Arg, KernelSpec

TOKENS_PER_CTA = 4


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    norm = "renorm" if spec.norm_topk_prob else "nonorm"
    uri = f"router_topk_softmax_e{spec.num_experts}_k{spec.top_k}_{norm}"
    return [
        KernelSpec(
            uri=uri,
            family="router",
            template="router.cu.j2",
            values={
                "E": spec.num_experts,
                "K_TOP": spec.top_k,
                "NORM_TOPK": "true" if spec.norm_topk_prob else "false",
                "WARPS": TOKENS_PER_CTA,
            },
            args=(
                Arg("logits", "const float*"),
                Arg("ids", "int*"),
                Arg("weights", "float*"),
                Arg("num_tokens", "int"),
            ),
            launch={"threads": TOKENS_PER_CTA * 32, "grid": "ceil(num_tokens / tokens_per_cta)",
                    "tokens_per_cta": TOKENS_PER_CTA, "smem_bytes": 0},
        )
    ]
