"""Spec loading and validation: every shipped spec loads, every mistake is named with its fix."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from ferrum_gen.spec import (
    MAX_EXPERTS,
    MAX_TOP_K,
    QK_K,
    SPECS_DIR,
    ActivationDtype,
    Arch,
    MoeSpec,
    QuantType,
    SpecError,
    load_spec,
    resolve_spec_path,
    shipped_spec_names,
    shipped_specs,
    spec_from_dict,
    spec_to_yaml,
)

SHIPPED = shipped_spec_names()


def _base() -> dict[str, Any]:
    """A valid spec with every key written out (qwen3moe's shape)."""
    return {
        "name": "base",
        "model": "test",
        "hidden_size": 2048,
        "intermediate_size": 768,
        "num_experts": 128,
        "top_k": 8,
        "norm_topk_prob": True,
        "quant": {"gate": "q4_k", "up": "q4_k", "down": "q6_k"},
        "activation_dtype": "bf16",
        "decode_max_tokens": 16,
        "prefill": {"block_sizes": [16, 32, 64], "padding_budget": 1.3, "gate_up_tile_n": 32, "down_tile_n": 64,
                    "sorted_x": False},
        "target_archs": ["sm_80", "sm_90"],
    }


# --- shipped specs ---------------------------------------------------------


def test_shipped_specs_exist() -> None:
    assert "qwen3moe" in SHIPPED
    assert "tiny" in SHIPPED
    assert len(shipped_specs()) == len(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_loads(name: str) -> None:
    spec = load_spec(name)
    assert isinstance(spec, MoeSpec)
    # A spec's name is its bundle directory; the shipped files are named after it.
    assert spec.name == name
    for size in (spec.hidden_size, spec.intermediate_size):
        assert size % QK_K == 0
    assert 1 <= spec.top_k <= min(spec.num_experts, MAX_TOP_K)
    assert isinstance(spec.quant.gate, QuantType)
    assert isinstance(spec.activation_dtype, ActivationDtype)
    assert all(isinstance(a, Arch) for a in spec.target_archs)
    assert list(spec.prefill.block_sizes) == sorted(spec.prefill.block_sizes)
    assert spec.shape_tag == (
        f"h{spec.hidden_size}_i{spec.intermediate_size}_e{spec.num_experts}_k{spec.top_k}"
    )


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_is_frozen(name: str) -> None:
    spec = load_spec(name)
    with pytest.raises(pydantic.ValidationError):
        spec.hidden_size = 4096  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        spec.quant.gate = QuantType.Q6_K  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        spec.prefill.block_sizes = (16,)  # type: ignore[misc]
    with pytest.raises((TypeError, AttributeError)):
        spec.target_archs.append(Arch.SM_80)  # type: ignore[attr-defined]
    # Frozen models hash, so specs can key dicts and caches.
    assert hash(spec) == hash(load_spec(name))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_hash_is_stable(name: str, tmp_path: Path) -> None:
    spec = load_spec(name)
    h = spec.spec_hash()
    assert len(h) == 64 and int(h, 16) >= 0
    assert load_spec(name).spec_hash() == h

    data = yaml.safe_load((SPECS_DIR / f"{name}.yaml").read_text())
    # Reversed key order, block style, no comments: the same spec, the same hash.
    reordered = {k: data[k] for k in reversed(list(data))}
    if isinstance(reordered.get("quant"), dict):
        reordered["quant"] = {k: reordered["quant"][k] for k in reversed(list(reordered["quant"]))}
    other = tmp_path / "other.yaml"
    reformatted = yaml.safe_dump(reordered, sort_keys=False, default_flow_style=False, indent=4)
    other.write_text("# reformatted\n\n" + reformatted)
    assert load_spec(other).spec_hash() == h
    # Flow style, sorted keys.
    flow = tmp_path / "flow.yaml"
    flow.write_text(yaml.safe_dump(data, sort_keys=True, default_flow_style=True))
    assert load_spec(flow).spec_hash() == h
    # The dump round-trips.
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(spec_to_yaml(spec))
    assert load_spec(dumped) == spec
    assert load_spec(dumped).spec_hash() == h


def test_hash_ignores_spelling_of_equal_values() -> None:
    a = _base()
    b = _base()
    b["prefill"]["block_sizes"] = [64, 16, 32]  # sorted on load
    b["prefill"]["padding_budget"] = 1.30
    b["prefill"]["padding_budget"] = 1.3
    assert spec_from_dict(a).spec_hash() == spec_from_dict(b).spec_hash()
    # Defaults written out or left out hash the same.
    c = _base()
    del c["prefill"], c["decode_max_tokens"]
    d = _base()
    d["prefill"] = {}
    d["decode_max_tokens"] = 16
    assert spec_from_dict(c).spec_hash() == spec_from_dict(d).spec_hash()


def test_hash_changes_with_the_spec() -> None:
    a = spec_from_dict(_base())
    for key, value in (("top_k", 4), ("activation_dtype", "f16"), ("norm_topk_prob", False)):
        changed = _base()
        changed[key] = value
        assert spec_from_dict(changed).spec_hash() != a.spec_hash(), key
    changed = _base()
    changed["quant"]["down"] = "q4_k"
    assert spec_from_dict(changed).spec_hash() != a.spec_hash()


def test_defaults() -> None:
    data = _base()
    for key in ("model", "decode_max_tokens", "prefill", "target_archs"):
        del data[key]
    spec = spec_from_dict(data)
    assert spec.model == ""
    assert spec.decode_max_tokens == 16
    assert spec.prefill.block_sizes == (16, 32, 64)
    assert spec.prefill.padding_budget == pytest.approx(1.30)
    assert spec.prefill.gate_up_tile_n == 32
    assert spec.prefill.down_tile_n == 64
    assert spec.target_archs == (Arch.SM_90,)


def test_boundaries_are_accepted() -> None:
    data = _base()
    data["num_experts"] = MAX_EXPERTS
    data["top_k"] = MAX_TOP_K
    data["prefill"]["block_sizes"] = [128, 16]
    data["prefill"]["padding_budget"] = 1.0
    assert spec_from_dict(data).prefill.block_sizes == (16, 128)
    data = _base()
    data["num_experts"] = 1
    data["top_k"] = 1
    data["prefill"]["padding_budget"] = 4.0
    spec_from_dict(data)


# --- finding a spec --------------------------------------------------------


def test_load_by_name_file_name_and_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing named qwen3moe here
    by_name = load_spec("qwen3moe")
    assert by_name.name == "qwen3moe"
    assert load_spec("qwen3moe.yaml") == by_name
    assert load_spec(SPECS_DIR / "qwen3moe.yaml") == by_name
    assert load_spec(str(SPECS_DIR / "qwen3moe.yaml")) == by_name
    assert resolve_spec_path("qwen3moe") == SPECS_DIR / "qwen3moe.yaml"
    # A user file with its own name.
    mine = tmp_path / "mine.yaml"
    data = _base()
    data["name"] = "mine"
    mine.write_text(yaml.safe_dump(data))
    assert load_spec(mine).name == "mine"
    assert load_spec("mine.yaml").name == "mine"  # relative to the working directory


def test_a_missing_path_does_not_fall_back_to_a_shipped_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as exc:
        load_spec(tmp_path / "qwen3moe.yaml")
    assert "does not exist" in str(exc.value)
    assert "qwen3moe" in str(exc.value)


# --- bad specs -------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def modify(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value

    return modify


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def modify(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        del d[last]

    return modify


def _rename(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def modify(d: dict[str, Any]) -> None:
        *parents, last = old.split(".")
        for p in parents:
            d = d[p]
        d[new] = d.pop(last)

    return modify


def _all(*mods: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def modify(d: dict[str, Any]) -> None:
        for m in mods:
            m(d)

    return modify


SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_experts", "top_k", "decode_max_tokens")

BAD_SPECS: list[tuple[str, Callable[[dict[str, Any]], None], list[str]]] = [
    # k-quant super-blocks
    ("hidden_size not a multiple of 256, q4_k gate", _set("hidden_size", 2000),
     ["quant.gate", "q4_k", "hidden_size=2000", "multiple of 256"]),
    ("hidden_size not a multiple of 256, q6_k up", _all(_set("hidden_size", 2080), _set("quant.gate", "q6_k")),
     ["quant.gate", "q6_k", "hidden_size", "multiple of 256"]),
    ("intermediate_size not a multiple of 256, q6_k down", _set("intermediate_size", 800),
     ["quant.down", "q6_k", "intermediate_size=800", "multiple of 256"]),
    # top_k against num_experts
    ("top_k larger than num_experts", _all(_set("num_experts", 8), _set("top_k", 16)),
     ["top_k (16)", "num_experts (8)", "lower top_k or raise num_experts"]),
    ("top_k above the router's limit", _set("top_k", 33), ["top_k is 33", "between 1 and 32"]),
    ("too many experts", _set("num_experts", MAX_EXPERTS + 1),
     ["num_experts is 1025", f"between 1 and {MAX_EXPERTS}"]),
    # zero and negative sizes, each size field
    *[(f"{f} zero", _set(f, 0), [f"{f} is 0", "positive integer"]) for f in SIZE_FIELDS],
    *[(f"{f} negative", _set(f, -256), [f"{f} is -256", "positive integer"]) for f in SIZE_FIELDS],
    # wrong types
    ("hidden_size a string", _set("hidden_size", "big"), ["hidden_size is 'big'", "whole number"]),
    ("hidden_size fractional", _set("hidden_size", 2048.5), ["hidden_size is 2048.5", "whole number"]),
    ("top_k written as a boolean", _set("top_k", True), ["top_k is true", "not true/false"]),
    ("padding_budget written as a boolean", _set("prefill.padding_budget", True),
     ["prefill.padding_budget is true", "not true/false"]),
    ("norm_topk_prob not a boolean", _set("norm_topk_prob", "maybe"), ["norm_topk_prob", "true or false"]),
    ("quant not a mapping", _set("quant", "q4_k"), ["quant is 'q4_k'", "{gate: q4_k, up: q4_k, down: q6_k}"]),
    ("prefill not a mapping", _set("prefill", [16, 32]), ["prefill is [16, 32]", "mapping"]),
    ("target_archs not a list", _set("target_archs", "sm_90"), ["target_archs is 'sm_90'", "list, e.g. [sm_90]"]),
    ("block_sizes not a list", _set("prefill.block_sizes", 32),
     ["prefill.block_sizes is 32", "list, e.g. [16, 32, 64]"]),
    ("name not a string", _set("name", 3), ["name is 3", "string"]),
    # enums
    ("unknown quant type", _set("quant.down", "q5_k"), ["quant.down", "'q5_k'", "'q4_k'", "'q6_k'"]),
    ("upper-case quant type", _set("quant.gate", "Q4_K"), ["quant.gate", "'Q4_K'", "'q4_k'"]),
    ("bad activation dtype", _set("activation_dtype", "fp16"),
     ["activation_dtype", "'fp16'", "'f32'", "'f16'", "'bf16'"]),
    ("bad arch", _set("target_archs", ["sm_90", "sm_70"]),
     ["target_archs[1]", "'sm_70'", "'sm_80'", "'sm_90'"]),
    ("empty target_archs", _set("target_archs", []), ["target_archs is empty", "at least one", "[sm_90]"]),
    ("repeated target_archs", _set("target_archs", ["sm_90", "sm_80", "sm_90"]),
     ["target_archs", "repeats", "list each once", "[sm_80, sm_90]"]),
    # unknown / missing keys
    ("unknown top-level key (typo)", _rename("hidden_size", "hiden_size"),
     ["unknown key 'hiden_size'", "did you mean 'hidden_size'", "missing required key 'hidden_size'"]),
    ("nested key at the top level", _set("block_sizes", [16]),
     ["unknown key 'block_sizes'", "belongs under prefill"]),
    ("unknown key in quant", _set("quant.gaet", "q4_k"), ["unknown key 'quant.gaet'", "did you mean 'gate'"]),
    ("unknown key in prefill", _set("prefill.block_size", [16]),
     ["unknown key 'prefill.block_size'", "did you mean 'block_sizes'", "remove it"]),
    ("missing required key", _delete("top_k"), ["missing required key 'top_k'", "add it", "top_k: 8"]),
    ("missing nested key", _delete("quant.down"), ["missing required key 'quant.down'", "add it", "down: q6_k"]),
    ("missing quant", _delete("quant"), ["missing required key 'quant'", "quant: {gate: q4_k"]),
    # prefill block sizes
    ("block size not a multiple of 16", _set("prefill.block_sizes", [16, 24]),
     ["prefill.block_sizes has 24", "multiple of 16", "between 16 and 128"]),
    ("block size above 128", _set("prefill.block_sizes", [16, 256]),
     ["prefill.block_sizes has 256", "between 16 and 128"]),
    ("block size zero", _set("prefill.block_sizes", [0]), ["prefill.block_sizes has 0", "multiple of 16"]),
    ("block size repeated", _set("prefill.block_sizes", [32, 16, 32]),
     ["prefill.block_sizes", "repeats", "list each once", "[16, 32]"]),
    ("block sizes empty", _set("prefill.block_sizes", []),
     ["prefill.block_sizes is empty", "at least one", "[16, 32, 64]"]),
    ("block size not a number", _set("prefill.block_sizes", [16, "big"]),
     ["prefill.block_sizes[1]", "whole number"]),
    # padding budget
    ("padding_budget below 1", _set("prefill.padding_budget", 0.9),
     ["prefill.padding_budget is 0.9", "between 1.0 and 4.0"]),
    ("padding_budget zero", _set("prefill.padding_budget", 0), ["prefill.padding_budget is 0", "between 1.0 and 4.0"]),
    ("padding_budget above 4", _set("prefill.padding_budget", 5),
     ["prefill.padding_budget is 5", "between 1.0 and 4.0"]),
    ("padding_budget NaN", _set("prefill.padding_budget", float("nan")),
     ["prefill.padding_budget", "between 1.0 and 4.0"]),
    ("padding_budget a string", _set("prefill.padding_budget", "loose"), ["prefill.padding_budget", "write a number"]),
    # tiles
    ("gate_up_tile_n does not divide intermediate_size", _set("prefill.gate_up_tile_n", 512),
     ["prefill.gate_up_tile_n (512)", "intermediate_size (768)", "multiple of 32 that divides 768", "384"]),
    ("down_tile_n does not divide hidden_size", _set("prefill.down_tile_n", 96),
     ["prefill.down_tile_n (96)", "hidden_size (2048)", "multiple of 32 that divides 2048"]),
    ("gate_up_tile_n not a multiple of 32", _set("prefill.gate_up_tile_n", 48),
     ["prefill.gate_up_tile_n is 48", "positive multiple of 32"]),
    ("down_tile_n not a multiple of 32", _set("prefill.down_tile_n", 16),
     ["prefill.down_tile_n is 16", "positive multiple of 32"]),
    ("down_tile_n zero", _set("prefill.down_tile_n", 0), ["prefill.down_tile_n is 0", "positive multiple of 32"]),
    # sorted x
    ("sorted_x not a boolean", _set("prefill.sorted_x", "maybe"), ["prefill.sorted_x", "true or false"]),
    ("sorted_x with f32 activations", lambda d: (_set("prefill.sorted_x", True)(d), _set("activation_dtype", "f32")(d)),
     ["prefill.sorted_x is true", "activation_dtype f16 or bf16", "set prefill.sorted_x to false"]),
    ("sorted_x with q6_k gate", lambda d: (_set("prefill.sorted_x", True)(d), _set("quant.gate", "q6_k")(d)),
     ["prefill.sorted_x is true", "quant.gate and quant.up q4_k", "set prefill.sorted_x to false"]),
    ("sorted_x without sm_90", lambda d: (_set("prefill.sorted_x", True)(d), _set("target_archs", ["sm_80"])(d)),
     ["prefill.sorted_x is true", "sm_90 in target_archs", "set prefill.sorted_x to false"]),
    # name
    ("upper-case name with a dash", _set("name", "Qwen-3"), ["name 'Qwen-3'", "lower-case", "e.g. qwen3moe"]),
    ("name starting with a digit", _set("name", "3moe"), ["name '3moe'", "starting with a letter"]),
    ("empty name", _set("name", ""), ["name ''", "lower-case"]),
    ("name too long", _set("name", "a" * 65), ["name 'aaa", "lower-case"]),
]


@pytest.mark.parametrize(
    ("modify", "needles"),
    [pytest.param(mod, needles, id=desc) for desc, mod, needles in BAD_SPECS],
)
def test_bad_spec_is_rejected_with_field_and_fix(
    modify: Callable[[dict[str, Any]], None], needles: list[str]
) -> None:
    data = _base()
    spec_from_dict(data)  # the base is valid
    data = copy.deepcopy(data)
    modify(data)
    with pytest.raises(SpecError) as exc:
        spec_from_dict(data, "bad.yaml")
    message = str(exc.value)
    assert message.startswith("invalid spec bad.yaml:")
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    assert "Value error" not in message
    assert "<top level>" not in message


@pytest.mark.parametrize(
    ("top", "needles"),
    [
        pytest.param([1, 2], ["top level must be a mapping", "not a list"], id="list"),
        pytest.param("qwen3moe", ["top level must be a mapping", "not a str"], id="string"),
        pytest.param(None, ["top level must be a mapping", "empty document"], id="empty"),
    ],
)
def test_top_level_not_a_mapping(top: Any, needles: list[str]) -> None:
    with pytest.raises(SpecError) as exc:
        spec_from_dict(top)
    for needle in needles:
        assert needle in str(exc.value)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        pytest.param("name: [qwen3moe\nhidden_size: 2048\n", ["not valid YAML", "line"], id="unclosed-flow"),
        pytest.param("name: a\n  hidden_size: 2048\n bad: [\n", ["not valid YAML"], id="bad-indent"),
        pytest.param("name: a\nhidden_size: 2048\nhidden_size: 4096\n",
                     ["not valid YAML", "'hidden_size' a second time", "line 2", "remove one"], id="duplicate-key"),
        pytest.param("quant:\n  gate: q4_k\n  gate: q6_k\n",
                     ["'gate' a second time", "remove one"], id="duplicate-nested-key"),
        pytest.param("", ["top level must be a mapping", "empty document"], id="empty-file"),
        pytest.param("- name: a\n- hidden_size: 1\n", ["top level must be a mapping", "not a list"], id="list"),
        pytest.param("!!python/object:os.system {}\n", ["not valid YAML"], id="python-tag"),
    ],
)
def test_bad_yaml_file(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    message = str(exc.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    data = _base()
    del data["quant"]
    path = tmp_path / "merge.yaml"
    path.write_text(
        yaml.safe_dump(data)
        + "quant:\n  <<: {gate: q6_k, up: q4_k, down: q4_k}\n  gate: q4_k\n  down: q6_k\n"
    )
    spec = load_spec(path)
    assert (spec.quant.gate, spec.quant.up, spec.quant.down) == (QuantType.Q4_K, QuantType.Q4_K, QuantType.Q6_K)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: Mixtral \xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="UTF-8"):
        load_spec(path)


@pytest.mark.parametrize("name", ["nonexistent", "nonexistent.yaml", "qwen3"])
def test_unknown_spec_name_lists_shipped(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as exc:
        load_spec(name)
    message = str(exc.value)
    assert repr(name) in message
    assert "shipped specs" in message
    for shipped in SHIPPED:
        assert shipped in message


def test_directory_is_not_a_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)
