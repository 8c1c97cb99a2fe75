"""Reading MoE expert weights and specs out of GGUF files.

Everything goes through ``gguf.GGUFReader``, which memory-maps the file: the expert
stacks returned here are views into that map (no copy of the file is made, and a
layer's bytes are only paged in when they are touched, e.g. by the upload to the GPU).

Every problem with a file (missing, not GGUF, truncated, wrong tensor type or shape,
unsupported architecture, missing metadata) is a :class:`GgufError` whose message
names the file, the tensor or key, and what to do about it.

Tensor layout (llama.cpp): per layer N, ``blk.N.ffn_gate_exps.weight`` and
``blk.N.ffn_up_exps.weight`` have ggml ne = {H, I, E}, ``blk.N.ffn_down_exps.weight``
has ne = {I, H, E}. The reader gives quantized data as uint8 of numpy shape
(E, rows, row_bytes): expert e's matrix is ``data[e]``, the input dimension contiguous.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from .quant import GGML_TYPE_ID, row_bytes
from .spec import ActivationDtype, MoeSpec, QuantType, SpecError, spec_from_dict

__all__ = [
    "GgufError",
    "MixedQuantWarning",
    "ExpertStack",
    "LayerExperts",
    "PROJECTIONS",
    "SUPPORTED_ARCHS",
    "open_gguf",
    "read_layer_experts",
    "spec_from_gguf",
    "quant_types_by_layer",
    "describe_quant_layers",
    "expert_tensor_name",
    "default_spec_name",
    "check_spec_name",
]

PROJECTIONS = ("gate", "up", "down")

SUPPORTED_ARCHS = ("qwen3moe", "olmoe", "llama")
"""general.architecture values spec_from_gguf understands (Mixtral converts to 'llama')."""

_NORM_TOPK_PROB = {"qwen3moe": True, "olmoe": False, "llama": True}
"""No GGUF key says whether the top-k weights are renormalised: it is a property of the architecture."""

_FFN_FALLBACK_ARCHS = ("llama", "olmoe")
"""Architectures whose converter writes no expert_feed_forward_length: llama.cpp sizes their
expert tensors with {arch}.feed_forward_length."""

_QUANT_BY_GGML = {GGMLQuantizationType(v): qt for qt, v in GGML_TYPE_ID.items()}

_EXPERT_RE = re.compile(r"blk\.(0|[1-9][0-9]*)\.ffn_(gate|up|down)_exps\.weight")
"""llama.cpp writes layer numbers in plain ASCII decimal; `\\d` would also take other scripts' digits."""

_EXPERT_LIKE_RE = re.compile(r"blk\.([^.]*)\.ffn_(gate|up|down)_exps\.weight")

_INT_TYPES = {
    GGUFValueType.UINT8,
    GGUFValueType.INT8,
    GGUFValueType.UINT16,
    GGUFValueType.INT16,
    GGUFValueType.UINT32,
    GGUFValueType.INT32,
    GGUFValueType.UINT64,
    GGUFValueType.INT64,
}

PathOrReader = Union[str, "os.PathLike[str]", GGUFReader]


class GgufError(ValueError):
    """A GGUF file that cannot be used; the message says which file, tensor and what to do."""


class MixedQuantWarning(UserWarning):
    """spec_from_gguf on a file whose layers do not all use the same quant types."""


# --- data classes ---------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ExpertStack:
    """One projection's weights for all experts of a layer, as the GGUF file stores them."""

    quant: QuantType
    data: np.ndarray
    """uint8 (E, rows, row_bytes); a view into the memory-mapped file when read from one."""
    in_dim: int
    """the contiguous (input) dimension, in weights"""
    rows: int
    """output rows per expert"""
    tensor: str = ""
    """the GGUF tensor name, for messages ('' when not read from a file)"""

    def __post_init__(self) -> None:
        d = self.data
        if not isinstance(d, np.ndarray) or d.dtype != np.uint8 or d.ndim != 3:
            raise ValueError(
                f"ExpertStack {self.tensor or ''} data must be a uint8 array of shape (E, rows, row_bytes), "
                f"got {getattr(d, 'dtype', type(d))} {getattr(d, 'shape', '')}"
            )
        want = row_bytes(self.quant, self.in_dim)
        if d.shape[1] != self.rows or d.shape[2] != want:
            raise ValueError(
                f"ExpertStack {self.tensor or ''} data has shape {d.shape}, but {self.rows} rows of "
                f"{self.in_dim} {self.quant.value} weights need (E, {self.rows}, {want})"
            )

    @property
    def num_experts(self) -> int:
        return int(self.data.shape[0])

    @property
    def row_bytes(self) -> int:
        return int(self.data.shape[2])


@dataclass(frozen=True, eq=False)
class LayerExperts:
    """The three expert projections of one MoE layer."""

    gate: ExpertStack  # rows = I, in_dim = H
    up: ExpertStack
    down: ExpertStack  # rows = H, in_dim = I

    def __iter__(self):
        return iter((self.gate, self.up, self.down))

    @property
    def quant_types(self) -> tuple[QuantType, QuantType, QuantType]:
        return (self.gate.quant, self.up.quant, self.down.quant)


# --- opening files --------------------------------------------------------


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """A memory-mapped GGUFReader, or a GgufError saying why the file cannot be read."""
    p = Path(path)
    if not p.exists():
        raise GgufError(f"GGUF file {str(p)!r} does not exist: check the path")
    if p.is_dir():
        raise GgufError(f"GGUF file {str(p)!r} is a directory: give the path of a .gguf file")
    if not p.is_file():
        # Opening a FIFO would wait for a writer forever; a device or socket is no model file either.
        raise GgufError(
            f"GGUF file {str(p)!r} is not a regular file (a FIFO, device or socket): give the path of a .gguf file"
        )
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as err:
        raise GgufError(f"GGUF file {str(p)!r} cannot be read: {err}") from None
    if size == 0:
        raise GgufError(f"GGUF file {str(p)!r} is empty (0 bytes): re-download or re-convert it")
    if head[:4] != b"GGUF":
        raise GgufError(
            f"{str(p)!r} is not a GGUF file: it does not start with the magic b'GGUF' "
            f"(it starts with {head[:4]!r}); give a .gguf model file (llama.cpp's convert_hf_to_gguf.py "
            "and llama-quantize write them)"
        )
    try:
        reader = GGUFReader(p, "r")
    except OSError as err:
        raise GgufError(f"GGUF file {str(p)!r} cannot be read: {err}") from None
    except Exception as err:  # the reader raises ValueError/IndexError/KeyError/... on bad bytes
        raise GgufError(
            f"GGUF file {str(p)!r} ({size} bytes) cannot be parsed: {type(err).__name__}: {err}. "
            "The file is probably truncated (an interrupted download or conversion) or corrupt: "
            "re-download or re-convert it"
        ) from None
    if reader.byte_order != "I":
        raise GgufError(
            f"GGUF file {str(p)!r} is in the opposite byte order of this machine (a big-endian GGUF): "
            "ferrum-gen reads little-endian files only; convert the model without --bigendian"
        )
    return reader


def _reader(path_or_reader: PathOrReader) -> GGUFReader:
    if isinstance(path_or_reader, GGUFReader):
        return path_or_reader
    return open_gguf(path_or_reader)


def _file_name(reader: GGUFReader) -> str:
    return str(getattr(reader.data, "filename", None) or "<GGUF file>")


# --- metadata helpers -----------------------------------------------------


def _get_str(reader: GGUFReader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    if field.types != [GGUFValueType.STRING]:
        raise GgufError(
            f"GGUF file {_file_name(reader)!r}: metadata key {key!r} should be a string, "
            f"it is {'/'.join(t.name for t in field.types)}: the file is corrupt or was written by a broken converter"
        )
    try:
        return str(field.contents())
    except UnicodeDecodeError as err:
        raise GgufError(
            f"GGUF file {_file_name(reader)!r}: metadata key {key!r} is not valid UTF-8 ({err.reason} at byte "
            f"{err.start}): the file is corrupt or was written by a broken converter; re-convert it"
        ) from None


def _get_int(reader: GGUFReader, key: str, layer: int | None = None) -> int | None:
    """An integer key; a per-layer array (as some converters write feed_forward_length) gives `layer`'s entry."""
    field = reader.get_field(key)
    if field is None:
        return None
    types = field.types
    value = field.contents()
    if len(types) == 1 and types[0] in _INT_TYPES:
        return int(value)
    if len(types) == 2 and types[0] == GGUFValueType.ARRAY and types[1] in _INT_TYPES and value:
        idx = 0 if layer is None else layer
        if 0 <= idx < len(value):
            return int(value[idx])
    raise GgufError(
        f"GGUF file {_file_name(reader)!r}: metadata key {key!r} should be an integer, it is "
        f"{'/'.join(t.name for t in types)} ({value!r}): the file is corrupt or was written by a broken converter"
    )


def _fmt_layers(layers: list[int] | set[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    xs = sorted(set(layers))
    if not xs:
        return "none"
    out: list[str] = []
    start = prev = xs[0]
    for x in xs[1:] + [None]:  # type: ignore[list-item]
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


def _layers_phrase(layers: list[int] | set[int]) -> str:
    """'layer 3' or 'layers 0-2, 5'."""
    return ("layer " if len(set(layers)) == 1 else "layers ") + _fmt_layers(layers)


def _type_name(t: GGMLQuantizationType) -> str:
    return t.name


def expert_tensor_name(layer: int, proj: str) -> str:
    return f"blk.{layer}.ffn_{proj}_exps.weight"


def _tensors_by_name(reader: GGUFReader) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def _expert_tensor_types(reader: GGUFReader) -> dict[int, dict[str, GGMLQuantizationType]]:
    """layer -> {proj: ggml type} for every expert tensor in the file (complete layers or not)."""
    out: dict[int, dict[str, GGMLQuantizationType]] = {}
    for t in reader.tensors:
        m = _EXPERT_RE.fullmatch(t.name)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = GGMLQuantizationType(t.tensor_type)
        elif _EXPERT_LIKE_RE.fullmatch(t.name):
            raise GgufError(
                f"GGUF file {_file_name(reader)!r}: tensor {t.name[:120]!r} names its layer "
                f"{_EXPERT_LIKE_RE.fullmatch(t.name).group(1)[:40]!r}, not a plain decimal number without leading "
                "zeros as llama.cpp writes it (blk.N.ffn_*_exps.weight): the file was written by a broken converter; "
                "re-convert it"
            )
    return dict(sorted(out.items()))


def _complete_layers(types: dict[int, dict[str, GGMLQuantizationType]]) -> list[int]:
    return [layer for layer, d in types.items() if all(p in d for p in PROJECTIONS)]


def _no_experts_hint(reader: GGUFReader) -> str:
    names = [t.name for t in reader.tensors]
    hints = []
    if any(re.match(r"^blk\.\d+\.ffn_gate_up_exps\.weight$", n) for n in names):
        hints.append(
            "it stores gate and up fused (blk.N.ffn_gate_up_exps.weight), which ferrum-gen does not read"
        )
    if any(re.match(r"^blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight$", n) for n in names):
        hints.append(
            "it stores one tensor per expert (blk.N.ffn_gate.E.weight, an old Mixtral conversion): "
            "re-convert the model with a current llama.cpp, which writes merged blk.N.ffn_*_exps.weight tensors"
        )
    split_count = _get_int(reader, "split.count")
    if split_count is not None and split_count > 1:
        split_no = _get_int(reader, "split.no")
        hints.append(
            f"it is shard {0 if split_no is None else split_no + 1} of {split_count} of a split GGUF "
            "and the tensor may be in another shard: merge the shards with `llama-gguf-split --merge`"
        )
    return ("; " + "; ".join(hints)) if hints else ""


def _file_layers_text(reader: GGUFReader, types: dict[int, dict[str, GGMLQuantizationType]]) -> str:
    complete = _complete_layers(types)
    arch = _get_str(reader, "general.architecture")
    blocks = _get_int(reader, f"{arch}.block_count") if arch else None
    btxt = f" (block_count {blocks})" if blocks is not None else ""
    if not complete:
        return (
            f"the file has no complete set of MoE expert tensors in any layer{btxt}: "
            "it is incomplete or not a MoE model"
        )
    return f"the file has expert tensors for {_layers_phrase(complete)}{btxt}; read one of those layers"


def describe_quant_layers(by_layer: dict[int, tuple[QuantType, QuantType, QuantType]]) -> str:
    """'q4_k/q4_k/q6_k (gate/up/down) in layers 0-2, 5; q4_k/q4_k/q4_k in layer 3'."""
    groups: dict[tuple[QuantType, ...], list[int]] = {}
    for layer, triple in sorted(by_layer.items()):
        groups.setdefault(tuple(triple), []).append(layer)
    parts = []
    for i, (triple, layers) in enumerate(groups.items()):
        label = "/".join(q.value for q in triple) + (" (gate/up/down)" if i == 0 else "")
        parts.append(f"{label} in {_layers_phrase(layers)}")
    return "; ".join(parts)


def _as_quant(reader: GGUFReader, name: str, t: GGMLQuantizationType) -> QuantType:
    qt = _QUANT_BY_GGML.get(t)
    if qt is None:
        raise GgufError(
            f"GGUF file {_file_name(reader)!r}: tensor {name} is {_type_name(t)}, not a k-quant that "
            f"ferrum-gen generates kernels for (Q4_K, Q6_K): re-quantize the model with a Q4_K/Q6_K "
            "recipe (e.g. `llama-quantize model-f16.gguf out.gguf Q4_K_M`)"
            + (
                "; llama.cpp falls back to Q5_0/Q8_0 when a row's input size is not a multiple of 256, "
                "which ferrum-gen does not support"
                if t in (GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_1)
                else ""
            )
        )
    return qt


def quant_types_by_layer(path_or_reader: PathOrReader) -> dict[int, tuple[QuantType, QuantType, QuantType]]:
    """The (gate, up, down) quant types of every layer that has MoE expert tensors.

    Layers without expert tensors (e.g. leading dense layers) are left out. A layer with
    only some of the three, or an expert tensor that is not Q4_K/Q6_K, is a GgufError.
    """
    reader = _reader(path_or_reader)
    types = _expert_tensor_types(reader)
    out: dict[int, tuple[QuantType, QuantType, QuantType]] = {}
    for layer, d in types.items():
        missing = [p for p in PROJECTIONS if p not in d]
        if missing:
            raise GgufError(
                f"GGUF file {_file_name(reader)!r}: layer {layer} has "
                + ", ".join(expert_tensor_name(layer, p) for p in PROJECTIONS if p in d)
                + " but not "
                + ", ".join(expert_tensor_name(layer, p) for p in missing)
                + ": the file is incomplete or corrupt; re-convert it"
                + _no_experts_hint(reader)
            )
        out[layer] = tuple(_as_quant(reader, expert_tensor_name(layer, p), d[p]) for p in PROJECTIONS)  # type: ignore[assignment]
    return out


def _mix_note(reader: GGUFReader) -> str:
    """A sentence on the file's per-layer quant mixes, or '' when all layers agree (or types are unusable)."""
    try:
        by_layer = quant_types_by_layer(reader)
    except GgufError:
        return ""
    if len(set(by_layer.values())) <= 1:
        return ""
    return (
        f"; note that this file mixes quant types across layers ({describe_quant_layers(by_layer)}, as "
        "llama.cpp's Q4_K_M recipe does): a spec describes one mix, so generate one bundle per mix "
        "and read each layer with the spec of its mix"
    )


# --- reading expert weights -----------------------------------------------


def _expected_dims(spec: MoeSpec, proj: str) -> tuple[int, int, str, str]:
    """(rows, in_dim, rows field name, in_dim field name) of a projection under `spec`."""
    if proj == "down":
        return spec.hidden_size, spec.intermediate_size, "hidden_size", "intermediate_size"
    return spec.intermediate_size, spec.hidden_size, "intermediate_size", "hidden_size"


def _read_stack(reader: GGUFReader, tensors: dict[str, Any], layer: int, proj: str, spec: MoeSpec) -> ExpertStack:
    fname = _file_name(reader)
    name = expert_tensor_name(layer, proj)
    t = tensors.get(name)
    if t is None:
        types = _expert_tensor_types(reader)
        raise GgufError(
            f"GGUF file {fname!r} has no tensor {name}: {_file_layers_text(reader, types)}"
            + _no_experts_hint(reader)
        )
    ggml_type = GGMLQuantizationType(t.tensor_type)
    file_qt = _as_quant(reader, name, ggml_type)
    spec_qt: QuantType = getattr(spec.quant, proj)
    if file_qt is not spec_qt:
        raise GgufError(
            f"GGUF file {fname!r}: tensor {name} is {_type_name(ggml_type)} ({file_qt.value}) but spec "
            f"{spec.name!r} says quant.{proj} is {spec_qt.value}: regenerate the kernels with a spec whose "
            f"quant.{proj} is {file_qt.value} (e.g. from `ferrum-gen spec-from-gguf` on this file and layer {layer})"
            + _mix_note(reader)
        )

    rows, in_dim, rows_field, in_field = _expected_dims(spec, proj)
    ne = [int(x) for x in t.shape]
    if len(ne) != 3:
        raise GgufError(
            f"GGUF file {fname!r}: tensor {name} has {len(ne)} dimensions (ggml ne={ne}), expected 3 "
            f"(in_dim, rows, experts): this is not a stacked-experts tensor; re-convert the model"
        )
    for got, want, field, what in (
        (ne[2], spec.num_experts, "num_experts", "experts (ggml ne[2])"),
        (ne[1], rows, rows_field, "output rows per expert (ggml ne[1])"),
        (ne[0], in_dim, in_field, "weights per row (the input size, ggml ne[0])"),
    ):
        if got != want:
            raise GgufError(
                f"GGUF file {fname!r}: tensor {name} has {got} {what} but spec {spec.name!r} has "
                f"{field}={want} (tensor ne={ne}): the spec does not describe this model; "
                "generate a spec from the file (`ferrum-gen spec-from-gguf`)"
            )

    rb = row_bytes(file_qt, in_dim)
    data = t.data
    want_shape = (spec.num_experts, rows, rb)
    if data.dtype != np.uint8 or tuple(data.shape) != want_shape:
        raise GgufError(
            f"GGUF file {fname!r}: tensor {name} data is {data.dtype} {tuple(data.shape)}, expected uint8 "
            f"{want_shape} ({spec.num_experts} experts x {rows} rows x {rb} bytes of {file_qt.value}): "
            "the file is corrupt; re-convert it"
        )
    per_expert = rows * rb
    if int(t.n_bytes) != spec.num_experts * per_expert or int(data.nbytes) != spec.num_experts * per_expert:
        raise GgufError(
            f"GGUF file {fname!r}: tensor {name} holds {int(t.n_bytes)} bytes, expected "
            f"{spec.num_experts} experts x {per_expert} bytes ({rows} rows of {rb} bytes of {file_qt.value}): "
            "the file is corrupt; re-convert it"
        )
    end = int(t.data_offset) + int(t.n_bytes)
    if end > int(reader.data.size):
        raise GgufError(
            f"GGUF file {fname!r} is truncated: tensor {name} ends at byte {end} but the file has "
            f"{int(reader.data.size)} bytes: re-download or re-convert it"
        )
    return ExpertStack(quant=file_qt, data=data, in_dim=in_dim, rows=rows, tensor=name)


def read_layer_experts(path_or_reader: PathOrReader, layer: int, spec: MoeSpec) -> LayerExperts:
    """Reads blk.{layer}.ffn_{gate,up,down}_exps.weight as memory-mapped views, checked against `spec`.

    Pass an open ``GGUFReader`` (see :func:`open_gguf`) when reading many layers: a path
    is parsed again on every call.
    """
    reader = _reader(path_or_reader)
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or layer < 0:
        raise GgufError(f"layer must be a non-negative integer, got {layer!r}")
    layer = int(layer)
    tensors = _tensors_by_name(reader)
    stacks = {proj: _read_stack(reader, tensors, layer, proj, spec) for proj in PROJECTIONS}
    return LayerExperts(**stacks)


# --- spec from a file -----------------------------------------------------


def _sanitize_name(raw: str) -> str:
    s = re.sub(r"[^a-z0-9_]+", "_", raw.lower()).strip("_")
    s = re.sub(r"_+", "_", s)
    if not s or not s[0].isalpha():
        s = "m_" + s if s else "model"
    return s[:64].rstrip("_") or "model"


def default_spec_name(arch: str, spec_shape: str, quant: tuple[QuantType, QuantType, QuantType],
                      activation_dtype: ActivationDtype) -> str:
    """The name spec_from_gguf gives a spec: architecture, shape and quant mix, so that the
    bundles of two models, or of two quant mixes of one model, never share a directory.

    e.g. qwen3moe_h2048_i768_e128_k8_q4_k_q4_k_q6_k (bf16 activations; other dtypes add _f16/_f32).
    """
    dtype = "" if activation_dtype is ActivationDtype.BF16 else f"_{activation_dtype.value}"
    tail = f"_{spec_shape}_{'_'.join(q.value for q in quant)}{dtype}"
    # the architecture gives way first: the shape and quant part is what keeps names apart
    return _sanitize_name(arch)[: 64 - len(tail)].rstrip("_") + tail


def check_spec_name(name: object, what: str = "name") -> str:
    """`name` when it is a valid spec name, else a SpecError that blames `what` (an argument or a CLI flag)."""
    if not isinstance(name, str):
        raise SpecError(f"{what} is {name!r}: give a string such as 'my_model'")
    try:
        return MoeSpec._name(name)
    except ValueError as err:
        raise SpecError(f"{what}: {err}") from None


def spec_from_gguf(
    path: PathOrReader,
    layer: int | None = None,
    name: str | None = None,
    *,
    activation_dtype: ActivationDtype | str = ActivationDtype.BF16,
) -> MoeSpec:
    """A spec for one MoE layer of a qwen3moe / olmoe / llama (Mixtral) GGUF file.

    Sizes come from the metadata, quant types from the tensors of `layer` (default: the
    first layer with all three expert tensors), and the sizes are cross-checked against
    those tensors' shapes. When layers differ in quant types, a MixedQuantWarning says
    which layers the spec fits; :func:`quant_types_by_layer` lists them all. The spec is
    named by :func:`default_spec_name` unless `name` is given.
    """
    if name is not None:
        check_spec_name(name)
    activation_dtype = ActivationDtype(activation_dtype)
    reader = _reader(path)
    fname = _file_name(reader)

    arch = _get_str(reader, "general.architecture")
    if arch is None:
        raise GgufError(
            f"GGUF file {fname!r} has no metadata key 'general.architecture': the file is not a "
            "llama.cpp model file, or is corrupt; re-convert it"
        )
    if arch not in SUPPORTED_ARCHS:
        raise GgufError(
            f"GGUF file {fname!r} has architecture {arch!r} (general.architecture), which ferrum-gen "
            f"does not support: it reads {', '.join(SUPPORTED_ARCHS)} (Mixtral is 'llama') files, whose "
            "MoE is softmax top-k routing over SiLU-gated experts with no shared expert"
        )

    types = _expert_tensor_types(reader)
    complete = _complete_layers(types)
    # the layer whose entry a per-layer array key (e.g. feed_forward_length) gives
    key_layer = layer if layer is not None else (complete[0] if complete else 0)
    missing: list[str] = []

    def need(key: str, why: str = "") -> int | None:
        v = _get_int(reader, key, key_layer)
        if v is None:
            missing.append(f"{key!r}{why}")
        return v

    hidden = need(f"{arch}.embedding_length")
    num_experts = _get_int(reader, f"{arch}.expert_count")
    if num_experts is None and arch == "llama":
        raise GgufError(
            f"GGUF file {fname!r} is a dense llama model (it has no 'llama.expert_count' key): "
            "ferrum-gen generates MoE layers only; give a Mixtral (MoE) llama file"
        )
    if num_experts is None:
        missing.append(f"'{arch}.expert_count'")
    top_k = need(f"{arch}.expert_used_count")
    inter_key = f"{arch}.expert_feed_forward_length"
    inter = _get_int(reader, inter_key, key_layer)
    if inter is None and arch in _FFN_FALLBACK_ARCHS:
        inter_key = f"{arch}.feed_forward_length"
        inter = _get_int(reader, inter_key, key_layer)
        if inter is None:
            missing.append(f"'{arch}.expert_feed_forward_length' (or '{arch}.feed_forward_length')")
    elif inter is None:
        missing.append(f"'{arch}.expert_feed_forward_length'")
    if missing:
        raise GgufError(
            f"GGUF file {fname!r} ({arch}) lacks metadata key(s) " + ", ".join(missing)
            + ": the file was written by an old or broken converter; re-convert it with a current llama.cpp"
        )
    assert hidden is not None and num_experts is not None and top_k is not None and inter is not None

    if not complete:
        raise GgufError(
            f"GGUF file {fname!r} ({arch}) has no MoE expert tensors (blk.N.ffn_gate_exps.weight, "
            "ffn_up_exps, ffn_down_exps)" + _no_experts_hint(reader)
        )
    if layer is None:
        layer = complete[0]
    elif layer not in complete:
        raise GgufError(
            f"GGUF file {fname!r} has no complete set of expert tensors for layer {layer} "
            f"({expert_tensor_name(layer, 'gate')} etc.): {_file_layers_text(reader, types)}"
            + _no_experts_hint(reader)
        )
    triple = tuple(_as_quant(reader, expert_tensor_name(layer, p), types[layer][p]) for p in PROJECTIONS)

    # The metadata must agree with the tensors the spec will be used to read.
    tensors = _tensors_by_name(reader)
    for proj in PROJECTIONS:
        tname = expert_tensor_name(layer, proj)
        ne = [int(x) for x in tensors[tname].shape]
        want = [inter, hidden, num_experts] if proj == "down" else [hidden, inter, num_experts]
        if ne != want:
            raise GgufError(
                f"GGUF file {fname!r}: tensor {tname} has ggml ne={ne} but the metadata "
                f"({arch}.embedding_length={hidden}, {inter_key}={inter}, "
                f"{arch}.expert_count={num_experts}) implies {want}: the file is inconsistent; re-convert it"
            )

    model = _get_str(reader, "general.name") or ""
    data = {
        "name": name if name is not None else default_spec_name(
            arch, f"h{hidden}_i{inter}_e{num_experts}_k{top_k}", triple, activation_dtype),
        "model": model,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_experts": num_experts,
        "top_k": top_k,
        "norm_topk_prob": _NORM_TOPK_PROB[arch],
        "quant": dict(zip(PROJECTIONS, (q.value for q in triple))),
        "activation_dtype": activation_dtype.value,
    }
    try:
        spec = spec_from_dict(data, source=f"from GGUF file {fname!r} layer {layer}")
    except SpecError as err:
        raise GgufError(f"GGUF file {fname!r} describes a MoE layer ferrum-gen cannot generate: {err}") from None

    by_layer = quant_types_by_layer(reader)
    if len(set(by_layer.values())) > 1:
        fits = [lay for lay, t in by_layer.items() if t == triple]
        warnings.warn(
            MixedQuantWarning(
                f"GGUF file {fname!r} mixes quant types across layers: {describe_quant_layers(by_layer)}. "
                f"The spec describes layer {layer} and fits {_layers_phrase(fits)} only; "
                "for the others, run `ferrum-gen spec-from-gguf FILE --layer N` once per mix, N a layer "
                "of that mix (each spec is named after its mix unless you give `--name`)"
            ),
            stacklevel=2,
        )
    return spec
