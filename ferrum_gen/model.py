"""Every MoE layer of a GGUF model, from one open reader, with one bundle per quant mix.

    model = load_model("Qwen3-30B-A3B-Q4_K_M.gguf", max_tokens=4096)
    out = model[0].forward(x, router_logits)          # model[N] is layer N's MoeLayer
    w = model.router_weight(0)                        # blk.0.ffn_gate_inp.weight, float32 [E, H]

Real Q4_K_M files mix quant types per layer (down is Q6_K in about half the layers and
Q4_K in the rest). A spec describes one mix, so :func:`plan_model` groups the layers by
their (gate, up, down) types and derives one spec per group, each named after its shape
and mix (``qwen3moe_h2048_i768_e128_k8_q4_k_q4_k_q6_k``); :func:`load_model` then loads
one kernel bundle per spec and uploads every layer with its group's bundle. The file is
parsed once: every layer is read through the same memory-mapped reader.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from tqdm.auto import tqdm

from .gguf_io import (GgufError, MixedQuantWarning, PathOrReader, _file_name, _reader, quant_types_by_layer,
                      spec_from_gguf)
from .spec import ActivationDtype, Arch, MoeSpec, QuantType, spec_from_dict

if TYPE_CHECKING:  # the runtime needs CuPy; planning and router weights do not
    from .bundle import KernelBundle
    from .runtime import MoeLayer

__all__ = ["ModelPlan", "MoeModel", "plan_model", "load_model", "read_router_weight", "router_tensor_name"]

log = logging.getLogger(__name__)

QuantMix = tuple[QuantType, QuantType, QuantType]

_ROUTER_TYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
}
"""Router weight types read as they are; BF16 (stored as raw bits) is widened below."""


def router_tensor_name(layer: int) -> str:
    return f"blk.{layer}.ffn_gate_inp.weight"


def read_router_weight(path_or_reader: PathOrReader, layer: int, spec: MoeSpec) -> np.ndarray:
    """blk.{layer}.ffn_gate_inp.weight as float32 [E, H] (router logits = x @ w.T).

    GGUF stores it with ggml ne = {H, E}, i.e. numpy shape (E, H); converters write it as
    F32 (sometimes F16 or BF16), which is read exactly.
    """
    reader = _reader(path_or_reader)
    fname = _file_name(reader)
    name = router_tensor_name(layer)
    tensor = next((t for t in reader.tensors if t.name == name), None)
    if tensor is None:
        raise GgufError(
            f"GGUF file {fname!r} has no router tensor {name}: layer {layer} is not a MoE layer of this "
            "file, or the file is not a qwen3moe/olmoe/mixtral model; check the layer number"
        )
    ne = [int(x) for x in tensor.shape]
    want = [spec.hidden_size, spec.num_experts]
    if ne != want:
        raise GgufError(
            f"GGUF file {fname!r}: tensor {name} has ggml ne={ne} but spec {spec.name!r} needs {want} "
            "(hidden_size, num_experts): the spec does not describe this model; derive one with "
            "`ferrum-gen spec-from-gguf`"
        )
    ttype = GGMLQuantizationType(tensor.tensor_type)
    data = np.asarray(tensor.data)
    if ttype in _ROUTER_TYPES:
        weight = data.astype(np.float32)
    elif ttype == GGMLQuantizationType.BF16:
        # bf16 values are the top half of the float32 of the same value
        weight = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        raise GgufError(
            f"GGUF file {fname!r}: tensor {name} is {ttype.name}; router weights are read as F32, F16 or "
            "BF16 (what llama.cpp's converter writes): re-convert the model without quantizing the router"
        )
    return np.ascontiguousarray(weight.reshape(spec.num_experts, spec.hidden_size))


@dataclass(frozen=True)
class ModelPlan:
    """Which spec each MoE layer of a file uses: one spec per quant mix."""

    file: str
    specs: tuple[MoeSpec, ...]
    """one per quant mix, in the order of each mix's first layer"""
    layer_spec: dict[int, str]
    """layer -> name of its spec"""

    def spec_of(self, layer: int) -> MoeSpec:
        name = self.layer_spec.get(layer)
        if name is None:
            raise KeyError(f"layer {layer} is not a MoE layer of {self.file} (its MoE layers: {self.layers})")
        return next(s for s in self.specs if s.name == name)

    def layers_of(self, spec: MoeSpec | str) -> list[int]:
        name = spec if isinstance(spec, str) else spec.name
        return [layer for layer, s in self.layer_spec.items() if s == name]

    @property
    def layers(self) -> list[int]:
        return sorted(self.layer_spec)

    def describe(self) -> str:
        return "\n".join(f"{s.name}: layers {_ranges(self.layers_of(s))}" for s in self.specs)


def _ranges(xs: Sequence[int]) -> str:
    out: list[str] = []
    for x in sorted(xs):
        if out and out[-1][1] == x - 1:
            out[-1] = (out[-1][0], x)
        else:
            out.append((x, x))  # type: ignore[arg-type]
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)  # type: ignore[misc]


def _with_arch(spec: MoeSpec, arch: str | None) -> MoeSpec:
    """The spec, targeting `arch` too when it names a GPU the spec does not list yet."""
    if arch is None or arch in {a.value for a in spec.target_archs}:
        return spec
    data = spec.model_dump(mode="json")
    data["target_archs"] = [a.value for a in spec.target_archs] + [Arch(arch).value]
    return spec_from_dict(data, source=f"{spec.name} for {arch}")


def plan_model(
    path_or_reader: PathOrReader,
    *,
    activation_dtype: ActivationDtype | str = ActivationDtype.BF16,
    layers: Sequence[int] | None = None,
    arch: str | None = None,
) -> ModelPlan:
    """Groups the file's MoE layers (or `layers`) by quant mix and derives one spec per mix.

    Layers without expert tensors (e.g. leading dense layers) are left out. `arch` (e.g.
    'sm_80') is added to the specs' target_archs when they do not list it.
    """
    reader = _reader(path_or_reader)
    by_layer = quant_types_by_layer(reader)
    if layers is not None:
        unknown = sorted(set(layers) - set(by_layer))
        if unknown:
            raise GgufError(
                f"GGUF file {_file_name(reader)!r} has no MoE expert tensors for layer(s) {unknown}: "
                f"its MoE layers are {_ranges(list(by_layer)) or 'none'}"
            )
        by_layer = {layer: by_layer[layer] for layer in sorted(set(layers))}
    if not by_layer:
        # spec_from_gguf explains what the file holds instead
        spec_from_gguf(reader, activation_dtype=activation_dtype)
    groups: dict[QuantMix, list[int]] = {}
    for layer, mix in by_layer.items():
        groups.setdefault(mix, []).append(layer)
    specs: list[MoeSpec] = []
    layer_spec: dict[int, str] = {}
    for mix, members in groups.items():
        with warnings.catch_warnings():
            # the warning says to make one spec per mix, which is what happens here
            warnings.simplefilter("ignore", MixedQuantWarning)
            spec = _with_arch(spec_from_gguf(reader, layer=members[0], activation_dtype=activation_dtype), arch)
        specs.append(spec)
        layer_spec.update({layer: spec.name for layer in members})
    return ModelPlan(file=_file_name(reader), specs=tuple(specs), layer_spec=dict(sorted(layer_spec.items())))


class MoeModel:
    """The MoE layers of one GGUF file on the GPU: ``model[N]`` is layer N's MoeLayer."""

    def __init__(self, plan: ModelPlan, reader: GGUFReader, bundles: dict[str, "KernelBundle"],
                 layers: dict[int, "MoeLayer"]):
        self.plan = plan
        self.reader = reader
        self.bundles = bundles
        self.layers = layers

    def __getitem__(self, layer: int) -> "MoeLayer":
        try:
            return self.layers[layer]
        except KeyError:
            raise KeyError(f"layer {layer} was not loaded from {self.plan.file}; loaded: "
                           f"{_ranges(list(self.layers))}") from None

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def items(self):
        return self.layers.items()

    def router_weight(self, layer: int) -> np.ndarray:
        """Layer N's router weight, float32 [E, H], read from the same open file."""
        return read_router_weight(self.reader, layer, self.plan.spec_of(layer))

    def __repr__(self) -> str:
        return f"MoeModel({self.plan.file!r}, {len(self)} layers, bundles: {', '.join(self.bundles)})"


def load_model(
    path: str | os.PathLike[str] | GGUFReader,
    max_tokens: int,
    *,
    activation_dtype: ActivationDtype | str = ActivationDtype.BF16,
    layers: Sequence[int] | None = None,
    bundle_root: str | os.PathLike[str] | None = None,
    progress: bool = True,
    settings: Any = None,
) -> MoeModel:
    """Loads every MoE layer of a GGUF file (or `layers`) onto the current CUDA device.

    One bundle per quant mix: compiled through the kernel cache, or, with `bundle_root`,
    loaded from `<bundle_root>/<spec name>/` as written by `ferrum-gen build`. `max_tokens`
    is the largest token count a forward call will see (it sizes each layer's scratch).
    A tqdm bar shows the layers as they are uploaded (`progress=False` hides it).
    """
    from .bundle import KernelBundle, device_arch
    from .runtime import MoeLayer

    reader = _reader(path)
    arch = device_arch()
    plan = plan_model(reader, activation_dtype=activation_dtype, layers=layers, arch=arch)
    log.info("%s: %d MoE layers in %d quant mix(es)\n%s", plan.file, len(plan.layers), len(plan.specs),
             plan.describe())
    bundles: dict[str, KernelBundle] = {}
    loaded: dict[int, MoeLayer] = {}
    with tqdm(total=len(plan.layers), desc=f"ferrum-gen {Path(plan.file).name}", unit="layer",
              disable=not progress) as bar:
        for layer in plan.layers:
            spec = plan.spec_of(layer)
            if spec.name not in bundles:
                bar.set_postfix_str(f"loading bundle {spec.name}")
                bundle_dir = Path(bundle_root) / spec.name if bundle_root is not None else None
                bundles[spec.name] = KernelBundle.load(spec, bundle_dir=bundle_dir, arch=arch)
                bar.set_postfix_str("")
            loaded[layer] = MoeLayer.from_gguf(bundles[spec.name], reader, layer, max_tokens, settings=settings)
            bar.update(1)
    return MoeModel(plan, reader, bundles, loaded)
