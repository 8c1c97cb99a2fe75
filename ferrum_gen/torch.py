"""torch integration: the MoE forward as a torch custom op, and a drop-in MoE block.

    from ferrum_gen.torch import MoeBlock
    block = MoeBlock.from_gguf("model-Q4_K_M.gguf", layer=0, max_tokens=4096)
    out = block(hidden_states)          # [..., H] bf16 on the GPU -> [..., H]

`torch.ops.ferrum_gen.moe_forward(x, router_logits, handle)` is registered through
`torch.library.custom_op` with a fake implementation, so `torch.compile` traces through
it without a graph break. A MoeLayer is a Python object that torch cannot pass through
a graph, so layers live in a registry here and the op takes the layer's integer handle
(`register_layer`); a MoeBlock registers its layer and unregisters it when collected.

Needs torch >= 2.4 (torch.library.custom_op). Forward only: there is no backward.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .bundle import KernelBundle
    from .gguf_io import PathOrReader
    from .runtime import MoeLayer
    from .spec import MoeSpec

__all__ = ["MoeBlock", "moe_forward", "register_layer", "unregister_layer"]

_LAYERS: dict[int, "MoeLayer"] = {}
_HANDLES = itertools.count(1)
_LOCK = threading.Lock()


def register_layer(layer: "MoeLayer") -> int:
    """Makes `layer` callable through the custom op; returns its handle."""
    with _LOCK:
        handle = next(_HANDLES)
        _LAYERS[handle] = layer
    return handle


def unregister_layer(handle: int) -> None:
    with _LOCK:
        _LAYERS.pop(handle, None)


def _layer(handle: int) -> "MoeLayer":
    layer = _LAYERS.get(handle)
    if layer is None:
        raise ValueError(f"no MoeLayer is registered under handle {handle}: register it with "
                         "ferrum_gen.torch.register_layer (MoeBlock does this) and keep the block alive")
    return layer


@torch.library.custom_op("ferrum_gen::moe_forward", mutates_args=())
def moe_forward(x: torch.Tensor, router_logits: torch.Tensor, handle: int) -> torch.Tensor:
    """The MoE layer registered under `handle`: x [T, H], router_logits [T, E] -> [T, H] like x."""
    return _layer(handle).forward(x.contiguous(), router_logits.contiguous())


@moe_forward.register_fake
def _moe_forward_fake(x: torch.Tensor, router_logits: torch.Tensor, handle: int) -> torch.Tensor:
    # what the real op returns: a new contiguous tensor of x's shape, dtype and device
    return x.new_empty(x.shape)


def _device(layer: "MoeLayer") -> torch.device:
    return torch.device("cuda", layer.device_id)


class MoeBlock(nn.Module):
    """A model's MoE block: router matmul from the GGUF router weight, then the generated layer.

    forward(hidden_states [..., H]) -> [..., H], in the spec's activation dtype on the
    layer's GPU. The router logits are computed in float32 (x @ router_weight.T, with
    router_weight [E, H] as in `blk.N.ffn_gate_inp.weight`) and handed to the layer,
    which does the softmax, top-k and renormalisation the spec describes.
    """

    def __init__(self, layer: "MoeLayer", router_weight: torch.Tensor | np.ndarray):
        super().__init__()
        spec = layer.spec
        weight = torch.as_tensor(np.asarray(router_weight) if isinstance(router_weight, np.ndarray) else router_weight)
        want = (spec.num_experts, spec.hidden_size)
        if tuple(weight.shape) != want:
            raise ValueError(f"router_weight has shape {tuple(weight.shape)}; spec {spec.name} needs [E, H] = "
                             f"{list(want)} (blk.N.ffn_gate_inp.weight as numpy reads it)")
        if not weight.is_floating_point():
            raise TypeError(f"router_weight has dtype {weight.dtype}: give float weights")
        self.layer = layer
        self.spec: "MoeSpec" = spec
        self.hidden_size = spec.hidden_size  # a plain int: what torch.compile specialises on
        self.register_buffer("router_weight", weight.to(device=_device(layer), dtype=torch.float32).contiguous(),
                             persistent=False)
        self.handle = register_layer(layer)
        weakref.finalize(self, unregister_layer, self.handle)

    @classmethod
    def from_gguf(cls, path_or_reader: "PathOrReader", layer: int, max_tokens: int, *,
                  bundle: "KernelBundle | None" = None, activation_dtype: str = "bf16",
                  settings: Any = None) -> "MoeBlock":
        """Layer `layer` of a GGUF file: its experts and its router weight.

        Pass an open reader (ferrum_gen.gguf_io.open_gguf) when building many blocks, and a
        bundle to share one between the layers of a quant mix (ferrum_gen.load_model groups
        them); without one, a spec is derived from this layer and its bundle loaded.
        """
        from gguf import GGUFReader

        from .bundle import KernelBundle
        from .gguf_io import open_gguf, spec_from_gguf
        from .model import read_router_weight
        from .runtime import MoeLayer

        reader = path_or_reader if isinstance(path_or_reader, GGUFReader) else open_gguf(path_or_reader)
        if bundle is None:
            bundle = KernelBundle.load(spec_from_gguf(reader, layer=layer, activation_dtype=activation_dtype))
        moe = MoeLayer.from_gguf(bundle, reader, layer, max_tokens, settings=settings)
        return cls(moe, read_router_weight(reader, layer, bundle.spec))

    def router_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """float32 [T, E] logits of hidden_states [..., H] flattened to [T, H]."""
        x = hidden_states.reshape(-1, self.hidden_size)
        return F.linear(x.float(), self.router_weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        if shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states has shape {tuple(shape)}; this block needs [..., {self.hidden_size}]")
        x = hidden_states.reshape(-1, self.hidden_size)
        out = torch.ops.ferrum_gen.moe_forward(x, self.router_logits(x), self.handle)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return f"spec={self.spec.name}, handle={self.handle}"
