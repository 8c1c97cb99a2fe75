"""Combine family (prefill): each token's k expert rows summed with the router weights."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import ACT_BYTES, ACT_CTYPE, THREADS_PER_WARP, Arg, KernelSpec

MAX_THREADS = 256
"""A CTA's threads, each one 16-byte span of a token's output row: H = 2048 at 16-bit activations is one
CTA a token, larger H several, so that no thread loops (the kernel's time is its dependent L2 trips)."""


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    dtype = spec.activation_dtype
    vec = 16 // ACT_BYTES[dtype]
    chunks = spec.hidden_size // vec
    # at least K_TOP threads: the first K_TOP stage the token's weights
    threads = max(min(MAX_THREADS, chunks), spec.top_k)
    threads = -(-threads // THREADS_PER_WARP) * THREADS_PER_WARP
    uri = f"combine_{spec.shape_tag}_{dtype.value}"
    return [
        KernelSpec(
            uri=uri,
            family="combine",
            template="combine.cu.j2",
            values={"H": spec.hidden_size, "K_TOP": spec.top_k, "THREADS": threads, "VEC": vec,
                    "ACT_T": ACT_CTYPE[dtype]},
            args=(
                Arg("y", f"const {ACT_CTYPE[dtype]}*"),
                Arg("pair_row", "const int*"),  # read only where y is by row
                Arg("plan", "const int*"),  # read only where y_by_row is not 0
                Arg("y_by_row", "int"),
                Arg("weights", "const float*"),
                Arg("out", f"{ACT_CTYPE[dtype]}*"),
            ),
            launch={"threads": threads, "grid": "(num_tokens, ctas_per_token)",
                    "ctas_per_token": -(-chunks // threads), "smem_bytes": 0},
        )
    ]
