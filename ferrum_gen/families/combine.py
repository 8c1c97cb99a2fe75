"""Combine family (prefill): each token's k expert rows summed with the router weights."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import ACT_BYTES, ACT_CTYPE, Arg, KernelSpec

THREADS = 128


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    dtype = spec.activation_dtype
    vec = 16 // ACT_BYTES[dtype]
    uri = f"combine_{spec.shape_tag}_{dtype.value}"
    return [
        KernelSpec(
            uri=uri,
            family="combine",
            template="combine.cu.j2",
            values={"H": spec.hidden_size, "K_TOP": spec.top_k, "THREADS": THREADS, "VEC": vec,
                    "ACT_T": ACT_CTYPE[dtype]},
            args=(
                Arg("y", f"const {ACT_CTYPE[dtype]}*"),
                Arg("pairs_by_token", "const int*"),
                Arg("weights", "const float*"),
                Arg("out", f"{ACT_CTYPE[dtype]}*"),
            ),
            launch={"threads": THREADS, "grid": "num_tokens", "smem_bytes": 0},
        )
    ]
