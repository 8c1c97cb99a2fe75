"""The MoE spec: one model's MoE-layer shape, loaded from YAML and validated.

Every mistake a user can make in a spec file is rejected here, with a message
that names the field and says how to fix it.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import re
import reprlib
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator, model_validator

from .quant import QK_K, QuantType

__all__ = ["QK_K", "QuantType", "ActivationDtype", "Arch", "MoeSpec", "SpecError", "load_spec", "spec_from_dict"]

SPECS_DIR = Path(__file__).parent / "specs"

MAX_EXPERTS = 1024
"""The align kernel keeps three per-expert int32 arrays in shared memory."""

MAX_TOP_K = 32
"""The router keeps the chosen experts in registers across one warp."""

MAX_DIM = 65536
"""The largest hidden_size and intermediate_size: the kernels index within one row, one
column tile and one token's activations with 32-bit ints, and a row's byte count
(MAX_DIM / 256 super-blocks x 210 bytes for q6_k) and every per-expert row count must stay
far below 2**31 for that. Sizes beyond this also overflow the launch-geometry arithmetic."""

MAX_SPEC_BYTES = 64 * 1024
"""A spec file is a few hundred bytes; anything this large is not a spec."""

MAX_SPEC_DEPTH = 16
"""A spec nests three levels deep; deeper YAML is refused before it is built."""

MAX_REPR = 120
"""Characters of an offending value quoted in an error message."""


class ActivationDtype(str, Enum):
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"


class Arch(str, Enum):
    SM_80 = "sm_80"
    SM_86 = "sm_86"
    SM_89 = "sm_89"
    SM_90 = "sm_90"


class SpecError(ValueError):
    """A spec that cannot be used; the message names the field and the fix."""


_FROZEN = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = MAX_REPR
_REPR.maxlevel = 3


def _short(value: Any) -> str:
    """repr(value), cut to about MAX_REPR characters: a message never quotes a whole hostile input."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    try:
        text = _REPR.repr(value)
    except ValueError:  # e.g. an integer nested in a container, too long to print
        text = f"a {type(value).__name__}"
    return text if len(text) <= 2 * MAX_REPR else text[: 2 * MAX_REPR] + "..."


def _reject_bool(v: Any, where: str) -> Any:
    """pydantic's lax mode reads `true` as 1 in a number field; a spec never means that."""
    if isinstance(v, bool):
        raise ValueError(f"{where} is {str(v).lower()}: it is a number, not true/false; write the number")
    return v


class ProjectionQuant(BaseModel):
    """GGUF quant type of each expert projection (read per tensor, never assumed)."""

    model_config = _FROZEN

    gate: QuantType = Field(description="quant type of ffn_gate_exps (input size hidden_size)")
    up: QuantType = Field(description="quant type of ffn_up_exps (input size hidden_size)")
    down: QuantType = Field(description="quant type of ffn_down_exps (input size intermediate_size)")


class PrefillConfig(BaseModel):
    """Knobs of the prefill (grouped GEMM) path."""

    model_config = _FROZEN

    block_sizes: tuple[StrictInt, ...] = Field(
        default=(16, 32, 64),
        description="candidate rows per aligned expert block; one GEMM kernel is generated per size",
    )
    padding_budget: float = Field(
        default=1.30,
        strict=True,
        description="the largest block size whose padded pair count stays within budget x real count wins",
    )
    gate_up_tile_n: StrictInt = Field(default=32, description="intermediate columns per gate+up GEMM tile")
    down_tile_n: StrictInt = Field(default=64, description="hidden columns per down GEMM tile")
    sorted_x: StrictBool = Field(
        default=False,
        description="the wgmma stream gate+up kernels read their tokens by tensor copies from a copy of x in "
                    "sorted order, made by a kernel of its own after align into the down kernels' output buffer (which "
                    "they then fill by a's row; scratch: 4 bytes a pair); needs Q4_K gate and up, 16-bit "
                    "activations and sm_90",
    )

    @field_validator("padding_budget", "gate_up_tile_n", "down_tile_n", mode="before")
    @classmethod
    def _numbers_not_bools(cls, v: Any, info: Any) -> Any:
        return _reject_bool(v, f"prefill.{info.field_name}")

    @field_validator("block_sizes", mode="before")
    @classmethod
    def _block_sizes_not_bools(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            for bs in v:
                _reject_bool(bs, "an entry of prefill.block_sizes")
        return v

    @field_validator("block_sizes")
    @classmethod
    def _block_sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("prefill.block_sizes is empty: list at least one size, e.g. [16, 32, 64]")
        for bs in v:
            if bs <= 0 or bs % 16 or bs > 128:
                raise ValueError(
                    f"prefill.block_sizes has {_short(bs)}: each size must be a multiple of 16 "
                    "(one tensor-core tile) between 16 and 128, i.e. one of 16, 32, 48, ..., 128"
                )
        if len(set(v)) != len(v):
            raise ValueError(
                f"prefill.block_sizes {list(v)} repeats a size: list each once, "
                f"e.g. {sorted(set(v))}"
            )
        return tuple(sorted(v))

    @field_validator("padding_budget")
    @classmethod
    def _budget(cls, v: float) -> float:
        if not (1.0 <= v <= 4.0):
            raise ValueError(
                f"prefill.padding_budget is {_short(v)}: it is a ratio of padded to real pairs, "
                "use a value between 1.0 and 4.0 (the seed uses 1.30)"
            )
        return v

    @field_validator("gate_up_tile_n", "down_tile_n")
    @classmethod
    def _tile(cls, v: int, info: Any) -> int:
        if v <= 0 or v % 32:
            raise ValueError(
                f"prefill.{info.field_name} is {_short(v)}: use a positive multiple of 32 "
                "(four warps, one 8-wide tensor-core tile each)"
            )
        return v


GEMV_WARP_CHOICES = (1, 2, 4, 8, 16)
"""Warps per CTA a decode GEMV may use (at most 512 threads, a power of two)."""

DEFAULT_GEMV_WARPS = 4
"""Warps per CTA of the default decode GEMV kernels."""


class VariantConfig(BaseModel):
    """Extra kernel variants for the tuner, beside the default kernels the other keys describe.

    Each listed value becomes its own kernel (its own uri). A variant may fit only some
    target archs (shared memory): it is generated with the archs it fits and the runtime
    and tuner use it only there; one that fits none is an error.
    """

    model_config = _FROZEN

    gemv_warps: tuple[int, ...] = Field(
        default=(), description="decode GEMVs: warps per CTA besides the default 4, e.g. [8]"
    )
    gate_up_tile_n: tuple[int, ...] = Field(
        default=(), description="prefill gate+up GEMM tile widths besides prefill.gate_up_tile_n, e.g. [64, 128]"
    )
    down_tile_n: tuple[int, ...] = Field(
        default=(), description="prefill down GEMM tile widths besides prefill.down_tile_n, e.g. [128]"
    )

    @field_validator("gemv_warps", "gate_up_tile_n", "down_tile_n", mode="before")
    @classmethod
    def _entries_not_bools(cls, v: Any, info: Any) -> Any:
        if isinstance(v, (list, tuple)):
            for item in v:
                _reject_bool(item, f"an entry of variants.{info.field_name}")
        return v

    @field_validator("gemv_warps", "gate_up_tile_n", "down_tile_n")
    @classmethod
    def _distinct(cls, v: tuple[int, ...], info: Any) -> tuple[int, ...]:
        if len(set(v)) != len(v):
            raise ValueError(
                f"variants.{info.field_name} {list(v)} repeats a value: list each once, e.g. {sorted(set(v))}"
            )
        return tuple(sorted(v))

    @field_validator("gemv_warps")
    @classmethod
    def _warps(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        for w in v:
            if w not in GEMV_WARP_CHOICES:
                raise ValueError(
                    f"variants.gemv_warps has {w}: use warps per CTA from {list(GEMV_WARP_CHOICES)}"
                )
            if w == DEFAULT_GEMV_WARPS:
                raise ValueError(
                    f"variants.gemv_warps lists {w}, which is already the default: list only the extra counts"
                )
        return v

    @field_validator("gate_up_tile_n", "down_tile_n")
    @classmethod
    def _tiles(cls, v: tuple[int, ...], info: Any) -> tuple[int, ...]:
        for n in v:
            if n <= 0 or n % 32:
                raise ValueError(
                    f"variants.{info.field_name} has {n}: use positive multiples of 32 "
                    "(four warps, one 8-wide tensor-core tile each)"
                )
        return v


class MoeSpec(BaseModel):
    """One model's MoE layer: every size here becomes a compile-time constant."""

    model_config = _FROZEN

    name: str = Field(description="bundle name: generated/<name>/; lower-case letters, digits, _")
    model: str = Field(default="", description="the model this spec describes, for people")
    hidden_size: StrictInt = Field(description="H: the model's embedding length")
    intermediate_size: StrictInt = Field(description="I: one expert's feed-forward length")
    num_experts: StrictInt = Field(description="E: experts per layer")
    top_k: StrictInt = Field(description="k: experts used per token")
    norm_topk_prob: StrictBool = Field(description="renormalise the top-k probabilities to sum to 1")
    quant: ProjectionQuant
    activation_dtype: ActivationDtype = Field(description="dtype of x and out: f32, f16 or bf16")
    decode_max_tokens: StrictInt = Field(
        default=16, description="token counts up to this take the decode (GEMV) path, larger ones prefill"
    )
    prefill: PrefillConfig = Field(default_factory=PrefillConfig)
    variants: VariantConfig = Field(default_factory=VariantConfig)
    target_archs: tuple[Arch, ...] = Field(
        default=(Arch.SM_90,), description="GPU architectures the bundle is compiled for"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", v):
            raise ValueError(
                f"name {_short(v)} is not usable as a directory and symbol prefix: use lower-case "
                "letters, digits and '_', starting with a letter (e.g. qwen3moe)"
            )
        return v

    @field_validator("hidden_size", "intermediate_size", "num_experts", "top_k", "decode_max_tokens", mode="before")
    @classmethod
    def _sizes_not_bools(cls, v: Any, info: Any) -> Any:
        return _reject_bool(v, info.field_name)

    @field_validator("hidden_size", "intermediate_size", "num_experts", "top_k", "decode_max_tokens")
    @classmethod
    def _positive(cls, v: int, info: Any) -> int:
        if v <= 0:
            raise ValueError(f"{info.field_name} is {_short(v)}: it must be a positive integer; use a value >= 1")
        return v

    @field_validator("hidden_size", "intermediate_size")
    @classmethod
    def _dim_bound(cls, v: int, info: Any) -> int:
        if v > MAX_DIM:
            raise ValueError(
                f"{info.field_name} is {_short(v)}: at most {MAX_DIM} is supported (the kernels index rows "
                f"and columns with 32-bit integers); use a value between 256 and {MAX_DIM}"
            )
        return v

    @field_validator("num_experts")
    @classmethod
    def _experts(cls, v: int) -> int:
        if v > MAX_EXPERTS:
            raise ValueError(
                f"num_experts is {_short(v)}: at most {MAX_EXPERTS} experts are supported; "
                f"use a value between 1 and {MAX_EXPERTS}"
            )
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v > MAX_TOP_K:
            raise ValueError(
                f"top_k is {_short(v)}: at most {MAX_TOP_K} experts per token are supported; "
                f"use a value between 1 and {MAX_TOP_K}"
            )
        return v

    @field_validator("target_archs")
    @classmethod
    def _archs(cls, v: tuple[Arch, ...]) -> tuple[Arch, ...]:
        if not v:
            raise ValueError("target_archs is empty: list at least one, e.g. [sm_90]")
        if len(set(v)) != len(v):
            names = [a.value for a in v]
            once = sorted(set(names))
            raise ValueError(f"target_archs {names} repeats an arch: list each once, e.g. [{', '.join(once)}]")
        return v

    @model_validator(mode="after")
    def _shapes(self) -> "MoeSpec":
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k ({self.top_k}) is larger than num_experts ({self.num_experts}): "
                "a token cannot use more experts than the layer has; lower top_k or raise num_experts"
            )
        for proj, in_name, in_dim in (
            ("gate", "hidden_size", self.hidden_size),
            ("up", "hidden_size", self.hidden_size),
            ("down", "intermediate_size", self.intermediate_size),
        ):
            if in_dim % QK_K:
                qt = getattr(self.quant, proj).value
                raise ValueError(
                    f"quant.{proj} is {qt} but its input size {in_name}={in_dim} is not a multiple "
                    f"of {QK_K}: k-quants need whole {QK_K}-weight super-blocks (llama.cpp falls back "
                    "to q5_0/q8_0 for such rows, which ferrum-gen does not generate); "
                    f"correct {in_name} if it is a typo (a model whose {in_name} is not a multiple of {QK_K} "
                    "is not supported)"
                )
        for field, tiles, size_name in (
            ("prefill.gate_up_tile_n", (self.prefill.gate_up_tile_n,), "intermediate_size"),
            ("prefill.down_tile_n", (self.prefill.down_tile_n,), "hidden_size"),
            ("variants.gate_up_tile_n", self.variants.gate_up_tile_n, "intermediate_size"),
            ("variants.down_tile_n", self.variants.down_tile_n, "hidden_size"),
        ):
            size = getattr(self, size_name)
            for n in tiles:
                if size % n:
                    choices = [c for c in range(32, min(size, 512) + 1, 32) if size % c == 0]
                    raise ValueError(
                        f"{field} ({n}) does not divide {size_name} ({size}): "
                        f"pick a multiple of 32 that divides {size}"
                        + (f", e.g. one of {choices}" if choices else "")
                    )
        if self.prefill.sorted_x:
            missing = [why for why, bad in (
                ("quant.gate and quant.up q4_k", not (self.quant.gate is self.quant.up is QuantType.Q4_K)),
                ("activation_dtype f16 or bf16", self.activation_dtype is ActivationDtype.F32),
                ("sm_90 in target_archs", Arch.SM_90 not in self.target_archs)) if bad]
            if missing:
                raise ValueError(
                    f"prefill.sorted_x is true, but only the wgmma Q4_K gate+up kernels read a sorted x, and this "
                    f"spec has none: it needs {', '.join(missing)}; set prefill.sorted_x to false"
                )
        for field, extra, default in (
            ("gate_up_tile_n", self.variants.gate_up_tile_n, self.prefill.gate_up_tile_n),
            ("down_tile_n", self.variants.down_tile_n, self.prefill.down_tile_n),
        ):
            if default in extra:
                raise ValueError(
                    f"variants.{field} lists {default}, which is already the default (prefill.{field}): "
                    "list only the extra widths"
                )
        return self

    # --- derived values -------------------------------------------------

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON form: equal specs hash equal, whatever the YAML looked like."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def shape_tag(self) -> str:
        """The shape part of every kernel uri, e.g. h2048_i768_e128_k8."""
        return f"h{self.hidden_size}_i{self.intermediate_size}_e{self.num_experts}_k{self.top_k}"


_EXAMPLES: dict[str, str] = {
    "name": "qwen3moe",
    "hidden_size": "2048",
    "intermediate_size": "768",
    "num_experts": "128",
    "top_k": "8",
    "norm_topk_prob": "true",
    "quant": "{gate: q4_k, up: q4_k, down: q6_k}",
    "quant.gate": "q4_k",
    "quant.up": "q4_k",
    "quant.down": "q6_k",
    "activation_dtype": "bf16",
}
"""An example line for each required key, shown when the key is missing."""

_TYPE_FIXES: dict[str, str] = {
    "int": "write a whole number, e.g. 2048",
    "float": "write a number, e.g. 1.30",
    "bool": "write true or false",
    "string": "write a string (quote it if YAML reads it as something else)",
    "dict": "write a mapping of keys to values (see docs/spec.md)",
    "model": "write a mapping of keys to values (see docs/spec.md)",
    "tuple": "write a list, e.g. [a, b]",
    "list": "write a list, e.g. [a, b]",
}
"""The fix for a value of the wrong type, by the first word of pydantic's error type (int_parsing...)."""

_LIST_EXAMPLES = {"target_archs": "[sm_90]", "prefill.block_sizes": "[16, 32, 64]"}


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out if len(out) <= MAX_REPR else out[:MAX_REPR] + "..."


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The spec model that the mapping at `loc` is validated as (MoeSpec for the top level)."""
    model: type[BaseModel] = MoeSpec
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _unknown_key_fix(loc: tuple[Any, ...]) -> str:
    key = str(loc[-1])
    model = _model_at(loc[:-1])
    if model is None:
        return "remove it or fix its spelling (see docs/spec.md for the keys)"
    known = list(model.model_fields)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {close[0]!r}? "
    else:
        hint = ""
        # A nested key written at the wrong level, e.g. block_sizes at the top level.
        for parent, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel) and key in ann.model_fields:
                hint = f"it belongs under {parent}: "
                break
    where = _format_loc(loc[:-1])
    return (
        f"{hint}remove it or fix its spelling; the keys {'of ' + where if where else 'at the top level'} "
        f"are {', '.join(known)} (see docs/spec.md)"
    )


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid spec {source}:"]
    for e in err.errors():
        loc = _format_loc(e["loc"])
        msg = e["msg"]
        etype = e["type"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if etype == "extra_forbidden":
            msg = f"unknown key {loc!r}: {_unknown_key_fix(e['loc'])}"
        elif etype == "missing":
            model = _model_at(e["loc"][:-1])
            field = model.model_fields.get(e["loc"][-1]) if model is not None else None
            what = f" ({field.description})" if field is not None and field.description else ""
            example = _EXAMPLES.get(loc)
            key = str(e["loc"][-1])
            msg = f"missing required key {loc!r}{what}: add it" + (f", e.g. `{key}: {example}`" if example else "")
        elif etype == "enum":
            allowed = e.get("ctx", {}).get("expected", "")
            msg = f"{loc} is {_short(e.get('input'))}: use one of {allowed}"
        elif etype.split("_")[0] in _TYPE_FIXES:
            kind = etype.split("_")[0]
            fix = _TYPE_FIXES[kind]
            if kind in ("tuple", "list") and loc in _LIST_EXAMPLES:
                fix = f"write a list, e.g. {_LIST_EXAMPLES[loc]}"
            elif kind in ("dict", "model") and loc in _EXAMPLES:
                fix = f"write a mapping, e.g. {_EXAMPLES[loc]}"
            msg = f"{loc} is {_short(e.get('input'))}, which is not valid here ({msg}): {fix}"
        lines.append(f"  - {loc}: {msg}" if loc else f"  - {msg}")
    return "\n".join(lines)


def spec_from_dict(data: Any, source: str = "<dict>") -> MoeSpec:
    """A validated spec: the model's checks, then whether every kernel fits its target archs."""
    if not isinstance(data, dict):
        got = "an empty document" if data is None else f"a {type(data).__name__}"
        raise SpecError(
            f"invalid spec {source}: the top level must be a mapping of keys to values "
            f"(`name: ...`, `hidden_size: ...`, one per line), not {got}"
        )
    try:
        spec = MoeSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_errors(err, source)) from None
    # The kernel families know each tile's shared-memory need, and they import this module;
    # importing them here, at call time, keeps the model free of that dependency while a tile
    # that no target arch can hold is still a spec error rather than a failure at generate time.
    from .enumerate import enumerate_kernels

    try:
        enumerate_kernels(spec)
    except ValueError as err:
        raise SpecError(f"invalid spec {source}:\n  - {err}") from None
    return spec


def resolve_spec_path(spec: str | Path) -> Path:
    """A path to a YAML file, or the name of a shipped spec (with or without .yaml)."""
    p = Path(spec)
    if p.is_file():
        return p
    text = str(spec)
    if len(p.parts) > 1 or "/" in text:
        # Looks like a path: never fall back to a shipped spec that happens to share its file name.
        what = "is a directory, not a spec file" if p.is_dir() else "does not exist"
        raise SpecError(
            f"spec file {text!r} {what}: give the path of a YAML spec file or the name of a shipped "
            "spec; shipped specs: " + ", ".join(shipped_spec_names())
        )
    name = p.stem + ".yaml" if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    shipped = SPECS_DIR / name
    if shipped.is_file():
        return shipped
    raise SpecError(
        f"spec {text!r} is neither a file nor a shipped spec: give the path of a YAML spec file "
        "or one of the shipped specs: " + ", ".join(shipped_spec_names())
    )


_PLAIN_INT = re.compile(r"-?(0|[1-9][0-9]*)")
_PLAIN_FLOAT = re.compile(r"-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")
_PLAIN_BOOL = {"true": True, "false": False}
_MAX_INT_DIGITS = 20
"""Longer integers are refused as text: no spec size needs more, and Python will not parse
more than a few thousand digits at all."""


class _SpecLoader(yaml.SafeLoader):
    """A SafeLoader for a contract, not a config file.

    - a key written twice in one mapping is an error (PyYAML keeps the last silently);
    - aliases are refused: a few hundred bytes of nested aliases expand to gigabytes;
    - nesting deeper than MAX_SPEC_DEPTH is refused before anything is built;
    - numbers and flags are read strictly: YAML 1.1 also reads 0x800, 0o4000, 34:8, 2_048,
      +2048, yes, off and On as numbers and flags; here those stay text, so that the spec's
      field check rejects them with its "write a whole number" / "write true or false" fix.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None,
                f"found the alias *{_short(event.anchor)[1:-1]}: aliases and anchors are not allowed in a spec; "
                "write the value out in full",
                event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_SPEC_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None,
                    f"the document nests deeper than {MAX_SPEC_DEPTH} levels: a spec is three levels deep; "
                    "see docs/spec.md for its layout",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping_once(loader: _SpecLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found key {_short(key)} a second time (first at line {seen[key].line + 1}): "
                "each key may appear once, remove one of them",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=deep)


def _construct_strict_int(loader: _SpecLoader, node: yaml.ScalarNode) -> Any:
    text = node.value
    if not _PLAIN_INT.fullmatch(text):
        return text  # 0x800, 34:8, 2_048, +2048: refused by the field check as "not a whole number"
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise yaml.constructor.ConstructorError(
            None, None,
            f"found an integer of {len(text.lstrip('-'))} digits: no spec value is that large "
            f"(sizes are at most {MAX_DIM}); correct the number",
            node.start_mark,
        )
    return int(text)


def _construct_strict_float(loader: _SpecLoader, node: yaml.ScalarNode) -> Any:
    text = node.value
    return float(text) if _PLAIN_FLOAT.fullmatch(text) and len(text) <= _MAX_INT_DIGITS else text


def _construct_strict_bool(loader: _SpecLoader, node: yaml.ScalarNode) -> Any:
    return _PLAIN_BOOL.get(node.value, node.value)  # yes/no/on/off stay text: "write true or false"


_SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_once)
_SpecLoader.add_constructor("tag:yaml.org,2002:int", _construct_strict_int)
_SpecLoader.add_constructor("tag:yaml.org,2002:float", _construct_strict_float)
_SpecLoader.add_constructor("tag:yaml.org,2002:bool", _construct_strict_bool)


def load_spec(spec: str | Path) -> MoeSpec:
    path = resolve_spec_path(spec)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError(f"cannot read spec {path}: {err.strerror or err}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(
            f"invalid spec {path}: larger than {MAX_SPEC_BYTES // 1024} KiB, which no spec is; "
            "give the spec YAML file (a few hundred bytes, see docs/spec.md)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"invalid spec {path}: not UTF-8 text ({err}): save the file as UTF-8") from None
    try:
        stream = io.StringIO(text)
        stream.name = str(path)  # so that PyYAML's error marks name the file
        data = yaml.load(stream, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise SpecError(f"invalid spec {path}: not valid YAML; fix it at the place marked below:\n{err}") from None
    return spec_from_dict(data, str(path))


def shipped_spec_names() -> list[str]:
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def shipped_specs() -> list[MoeSpec]:
    return [load_spec(SPECS_DIR / f"{n}.yaml") for n in shipped_spec_names()]


def spec_to_yaml(spec: MoeSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
