"""Helpers for tests and benchmarks: small MoE GGUF files written with gguf.GGUFWriter.

No pytest import here: benchmarks and scripts use these too.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence, Union

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from .quant import GGML_TYPE_ID, random_matrix_bytes
from .spec import QuantType

__all__ = ["write_moe_gguf", "ggml_type", "QUANTIZERS"]

QUANTIZERS = ("random", "libgguf")

TypeLike = Union[QuantType, GGMLQuantizationType]


def ggml_type(q: TypeLike) -> GGMLQuantizationType:
    """The ggml type of a QuantType (or a GGMLQuantizationType, unchanged)."""
    if isinstance(q, QuantType):
        return GGMLQuantizationType(GGML_TYPE_ID[q])
    return GGMLQuantizationType(q)


def _metadata(arch: str, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
              n_layers: int) -> dict[str, int]:
    """The integer keys a llama.cpp converter writes for `arch`, the way it writes them.

    qwen3moe: expert_feed_forward_length (and a dense feed_forward_length that must not be
    mistaken for it); llama (Mixtral) and olmoe: only feed_forward_length, which llama.cpp
    uses for their expert tensors; anything else: both.
    """
    keys = {
        f"{arch}.block_count": n_layers,
        f"{arch}.embedding_length": hidden_size,
        f"{arch}.expert_count": num_experts,
        f"{arch}.expert_used_count": top_k,
    }
    if arch == "qwen3moe":
        keys[f"{arch}.feed_forward_length"] = 3 * intermediate_size  # the dense FFN size, not the experts'
        keys[f"{arch}.expert_feed_forward_length"] = intermediate_size
    elif arch in ("llama", "olmoe"):
        keys[f"{arch}.feed_forward_length"] = intermediate_size
    else:
        keys[f"{arch}.feed_forward_length"] = intermediate_size
        keys[f"{arch}.expert_feed_forward_length"] = intermediate_size
    return keys


def _expert_weights(t: GGMLQuantizationType, num_experts: int, rows: int, in_dim: int,
                    rng: np.random.Generator, quantizer: str) -> np.ndarray:
    """The array written for one stacked-experts tensor of type `t`: raw bytes (E, rows, row_bytes)
    for quantized types, (E, rows, in_dim) floats for F16/F32."""
    k_quant = {GGMLQuantizationType(v): qt for qt, v in GGML_TYPE_ID.items()}.get(t)
    if k_quant is not None and quantizer == "random":
        return random_matrix_bytes(k_quant, num_experts * rows, in_dim, rng).reshape(num_experts, rows, -1)
    w = (rng.standard_normal((num_experts, rows, in_dim), dtype=np.float32) * 0.02).astype(np.float32)
    if t == GGMLQuantizationType.F32:
        return w
    if t == GGMLQuantizationType.F16:
        return w.astype(np.float16)
    import libgguf  # a dev dependency: only needed for realistic blocks or non-k-quant test types

    return np.ascontiguousarray(libgguf.quantize_rows(w, int(t)), dtype=np.uint8)


def write_moe_gguf(
    path: str | os.PathLike[str],
    *,
    arch: str,
    hidden_size: int,
    intermediate_size: int,
    num_experts: int,
    top_k: int,
    quant_by_layer: Sequence[tuple[TypeLike, TypeLike, TypeLike]],
    rng: np.random.Generator,
    quantizer: str = "random",
    model_name: str | None = None,
    omit_keys: Iterable[str] = (),
    with_router: bool = True,
    router_dtype: str = "f32",
) -> dict[int, dict[str, np.ndarray]]:
    """Writes a small MoE GGUF file and returns the arrays written, per layer and projection.

    For each layer N (one entry of `quant_by_layer`, a (gate, up, down) triple):
    blk.N.ffn_{gate,up,down}_exps.weight with ggml ne = {H, I, E} (gate/up) and {I, H, E}
    (down), i.e. numpy byte shape (E, rows, row_bytes), plus (with_router) the router
    blk.N.ffn_gate_inp.weight, ggml ne = {H, E} (numpy (E, H)) in `router_dtype` ('f32', as
    converters write it, or 'f16'), with weights of std 2/sqrt(H) so that unit-variance hidden
    states give logits of std about 2. The expert readers ignore it; ferrum_gen.torch.MoeBlock
    uses it. Returned per layer under 'router' (the array written). Metadata: general.architecture,
    general.name (model_name), and the {arch}.* keys spec_from_gguf reads, minus `omit_keys`
    (full key names, e.g. 'qwen3moe.expert_used_count').

    quantizer 'random': random valid k-quant blocks (ferrum_gen.quant.random_matrix_bytes);
    'libgguf': random normal weights (std 0.02) quantized with libgguf.quantize_rows.
    Entries of `quant_by_layer` may also be other GGMLQuantizationType values (F16, F32,
    Q8_0, ...) to write files ferrum-gen must reject; those are always made with numpy/libgguf.
    """
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer is {quantizer!r}: use one of {', '.join(QUANTIZERS)}")
    if router_dtype not in ("f32", "f16"):
        raise ValueError(f"router_dtype is {router_dtype!r}: use 'f32' or 'f16'")
    if not quant_by_layer:
        raise ValueError("quant_by_layer is empty: give one (gate, up, down) triple per layer")
    omit = set(omit_keys)

    writer = gguf.GGUFWriter(os.fspath(path), arch)
    if model_name is not None:
        writer.add_name(model_name)
    for key, value in _metadata(arch, hidden_size, intermediate_size, num_experts, top_k,
                                len(quant_by_layer)).items():
        if key not in omit:
            writer.add_uint32(key, value)

    written: dict[int, dict[str, np.ndarray]] = {}
    for layer, triple in enumerate(quant_by_layer):
        if len(triple) != 3:
            raise ValueError(f"quant_by_layer[{layer}] is {triple!r}: give a (gate, up, down) triple")
        written[layer] = {}
        if with_router:
            router = rng.standard_normal((num_experts, hidden_size), dtype=np.float32) * np.float32(
                2.0 / np.sqrt(hidden_size))
            router = router.astype(np.float16) if router_dtype == "f16" else router
            writer.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", router)
            written[layer]["router"] = router
        for proj, q in zip(("gate", "up", "down"), triple):
            t = ggml_type(q)
            rows, in_dim = (hidden_size, intermediate_size) if proj == "down" else (intermediate_size, hidden_size)
            arr = _expert_weights(t, num_experts, rows, in_dim, rng, quantizer)
            name = f"blk.{layer}.ffn_{proj}_exps.weight"
            if arr.dtype == np.uint8:
                # byte shape (E, rows, row_bytes): the writer turns it into ne = {in_dim, rows, E}
                writer.add_tensor(name, arr, raw_dtype=t)
            else:
                writer.add_tensor(name, arr)
            written[layer][proj] = arr

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
