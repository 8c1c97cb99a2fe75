"""ferrum-gen: shape-specialised CUDA for the MoE layer of GGUF-quantized LLMs.

    import ferrum_gen
    model = ferrum_gen.load_model("model-Q4_K_M.gguf", max_tokens=4096)   # needs a GPU and CuPy
    out = model[0].forward(x, router_logits)

`ferrum_gen.torch` (needs torch) holds the torch custom op and the drop-in `MoeBlock`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "plan_model"]


def __getattr__(name: str) -> Any:
    # imported on first use: `import ferrum_gen` stays cheap and needs neither CuPy nor torch
    if name in ("load_model", "plan_model"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'ferrum_gen' has no attribute {name!r}")
