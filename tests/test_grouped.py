"""The grouped path's families on CPU: which specs get them, their geometry, and the runtime's choice."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import ferrum_gen
from ferrum_gen import __version__, tuning
from ferrum_gen.enumerate import enumerate_kernels
from ferrum_gen.families import grouped
from ferrum_gen.families.base import SMEM_LIMIT
from ferrum_gen.quant import QK_K
from ferrum_gen.spec import ActivationDtype, load_spec, shipped_spec_names


@pytest.fixture(params=shipped_spec_names())
def spec(request):
    return load_spec(request.param)


def test_grouped_kernels_exist_exactly_where_gate_and_up_share_a_quant_type_and_x_is_16_bit(spec) -> None:
    families = {k.family for k in enumerate_kernels(spec)}
    has = {"grouped_gate_up_silu", "grouped_down_combine"} <= families
    assert has is (spec.quant.gate == spec.quant.up and spec.activation_dtype is not ActivationDtype.F32)
    assert has is grouped.supported(spec)


def test_float32_activations_get_no_grouped_kernels() -> None:
    spec = load_spec("qwen3moe").model_copy(update={"activation_dtype": ActivationDtype.F32})
    assert not grouped.supported(spec)
    assert not any(k.family.startswith("grouped") for k in enumerate_kernels(spec))


def test_grouped_geometry_splits_rows_evenly_and_fits_every_target_arch(spec) -> None:
    for k in enumerate_kernels(spec):
        if not k.family.startswith("grouped"):
            continue
        in_dim = spec.hidden_size if k.family == "grouped_gate_up_silu" else spec.intermediate_size
        out_dim = spec.intermediate_size if k.family == "grouped_gate_up_silu" else spec.hidden_size
        warps = k.values["WARPS"]
        row_tiles = k.values.get("ROW_TILES", 1)  # down's multi-tile variants: a group of warps a tile
        assert (in_dim // QK_K) % warps == 0 and 1 <= warps <= grouped.MAX_WARPS
        assert k.launch["rows_per_cta"] == grouped.ROWS_PER_CTA * row_tiles
        assert out_dim % k.launch["rows_per_cta"] == 0 and k.launch["threads"] == 32 * warps * row_tiles
        assert k.launch["threads"] <= 1024
        matrices = 2 if k.family == "grouped_gate_up_silu" else 1
        if k.variant == grouped.INT_DOT_VARIANT:
            smem = grouped.int_dot_smem_bytes(warps, matrices)
        else:
            smem = grouped.smem_bytes(warps, k.values["TOKENS"], matrices, row_tiles)
        assert k.values["SMEM_BYTES"] == smem
        for arch in spec.target_archs:
            assert k.launch["smem_bytes"][arch.value] == smem <= SMEM_LIMIT[arch]


def test_warps_take_the_largest_even_split_up_to_eight() -> None:
    assert grouped.warps_for(2048) == 8  # 8 blocks
    assert grouped.warps_for(768) == 3  # 3 blocks
    assert grouped.warps_for(14336) == 8  # 56 blocks, 7 per warp
    assert grouped.warps_for(256) == 1


def _available(spec, with_grouped: bool) -> tuple[dict, dict]:
    available: dict[str, dict[str, list]] = {}
    defaults: dict[str, str] = {}
    for k in enumerate_kernels(spec):
        if k.family.startswith("grouped") and not with_grouped:
            continue
        if k.default:
            defaults[k.family] = k.variant
        available.setdefault(k.family, {}).setdefault(k.variant, []).append(k.uri)
    return available, defaults


def test_the_default_rule_takes_grouped_where_it_exists_and_decode_elsewhere() -> None:
    spec = load_spec("qwen3moe")
    for with_grouped, small in ((True, "grouped"), (False, "decode")):
        available, defaults = _available(spec, with_grouped)
        assert tuning.choose(spec, 1, available, defaults).path == small
        large = "stream" if tuning.path_available("stream", available) else "prefill"
        assert tuning.choose(spec, spec.decode_max_tokens + 1, available, defaults).path == large


def test_a_table_naming_a_path_without_kernels_gives_way_to_the_default_rule() -> None:
    spec = load_spec("qwen3moe")
    available, defaults = _available(spec, with_grouped=False)
    table = tuning.TuningTable(spec.name, spec.spec_hash(), __version__, "NVIDIA H200", [
        tuning.TuningEntry(1, "grouped", {"grouped_gate_up_silu": "t8", "grouped_down_combine": "t8"})])
    choice = tuning.choose(spec, 1, available, defaults, table)
    assert choice.path == "decode" and choice.source == tuning.DEFAULT_RULE
    with pytest.raises(ValueError, match="grouped path has no kernels"):
        tuning.choose(spec, 1, available, defaults, table, path="grouped")


def test_the_routing_variant_is_a_bounded_gate_up_variant_with_the_same_arguments(spec) -> None:
    kernels = {(k.family, k.variant): k for k in enumerate_kernels(spec) if k.family.startswith("grouped")}
    if not grouped.supported(spec):
        assert not kernels
        return
    r8 = kernels[("grouped_gate_up_silu", "r8")]
    assert r8.launch["routes"] and r8.launch["max_tokens"] == grouped.ROUTED_TOKENS and not r8.default
    assert ("grouped_down_combine", "r8") not in kernels
    t8 = kernels[("grouped_gate_up_silu", "t8")]
    assert r8.args == t8.args and "routes" not in t8.launch  # the runtime launches both alike


@pytest.mark.parametrize("prefix, mode, few", [(grouped.ONE_TOKEN_PREFIX, "PAIR", 0),
                                               *((f"p{few}", "FEW", few) for few in grouped.FEW_PAIRS)])
def test_the_search_free_variants_are_t8_and_its_row_tile_forms_for_few_tokens(spec, prefix: str, mode: str,
                                                                               few: int) -> None:
    """o1 (one token) and p64/p128 (few pairs, a slot per pair) are t8's kernels with another way to
    find a CTA's expert and pairs, bounded to the token counts where that way holds."""
    kernels = {(k.family, k.variant): k for k in enumerate_kernels(spec) if k.family.startswith("grouped")}
    forms = {fv: k for fv, k in kernels.items() if fv[1] == prefix or fv[1].startswith(prefix + "m")}
    assert bool(forms) == grouped.supported(spec)
    max_tokens = 1 if mode == "PAIR" else grouped.few_pairs_tokens(spec, few)
    assert max_tokens * spec.top_k <= max(few, spec.top_k)
    for (family, variant), k in forms.items():
        twin = kernels[(family, variant.replace(prefix, f"t{grouped.DEFAULT_TOKENS}", 1))]
        launch = {**twin.launch, "max_tokens": max_tokens}
        if mode == "FEW":
            launch.update(slot_per_pair=True, grid="(rows / rows_per_cta, num_pairs)")
        assert k.launch == launch and k.args == twin.args and not k.default
        assert k.values == {**twin.values, "SLOT_MODE": mode, "FEW_PAIRS": few}
        assert twin.values["SLOT_MODE"] == "SEARCH" and twin.values["FEW_PAIRS"] == 0
    assert {v for f, v in forms if f == "grouped_gate_up_silu"} <= {prefix}


def test_the_tuner_times_the_search_free_variants_only_where_they_serve() -> None:
    from ferrum_gen.tune import candidates

    spec = load_spec("qwen3moe")
    layer = _fake_layer(spec, {})

    def with_variant(bucket, variant):
        return [c for c in candidates(layer, bucket) if ("grouped_gate_up_silu", variant) in c.variants]

    assert with_variant(1, grouped.ONE_TOKEN_PREFIX) and not with_variant(2, grouped.ONE_TOKEN_PREFIX)
    most = grouped.few_pairs_tokens(spec, grouped.INT_DOT_MAX_PAIRS)
    assert with_variant(most, grouped.INT_DOT_VARIANT) and not with_variant(most + 1, grouped.INT_DOT_VARIANT)
    for few in grouped.FEW_PAIRS:
        most = grouped.few_pairs_tokens(spec, few)
        assert with_variant(most, f"p{few}") and not with_variant(most + 1, f"p{few}")


def test_the_tuner_times_only_variants_that_serve_every_count_of_a_bucket(spec) -> None:
    """A bucket of several counts (bucket 2 of a table without bucket 1 holds T = 1 and 2) times only the
    variants that serve both its edges: not a fused kernel of one count, which the tuner could not run at
    the other (it stopped with "serves exactly 2 tokens, not 1")."""
    from ferrum_gen.tune import candidates

    layer = _fake_layer(spec, {})
    both = candidates(layer, 2, tuning.bucket_edges(2, (2, 4)))
    assert both and not [c for c in both if c.path == "fused"]
    for cand in both:
        for family, variant in cand.variants:
            assert layer.variant_refusal(family, variant, 1) is None and layer.variant_refusal(family, variant, 2) is None
    two = candidates(layer, 2)
    assert set(both) <= set(two)
    for cand in set(two) - set(both):  # left out only for T = 1
        assert any(layer.variant_refusal(family, variant, 1) is not None for family, variant in cand.variants)
    fused_two = [v for v in layer.variants.get("fused_moe", {}) if layer.variant_refusal("fused_moe", v, 2) is None]
    assert {dict(c.variants)["fused_moe"] for c in two if c.path == "fused"} == set(fused_two)


def _fake_layer(spec, env: dict[str, str]):
    """What tune.candidates reads of a MoeLayer, with the real variant_refusal."""
    from types import SimpleNamespace

    from ferrum_gen.runtime import MoeLayer
    from ferrum_gen.settings import Settings

    variants: dict[str, dict[str, list]] = {}
    for k in enumerate_kernels(spec):
        if k.family in tuning.TUNED_FAMILIES:
            variants.setdefault(k.family, {}).setdefault(k.variant, []).append(SimpleNamespace(launch=k.launch))
    layer = SimpleNamespace(spec=spec, variants=variants, settings=Settings.from_env(env))
    layer.variant_refusal = lambda f, v, t: MoeLayer.variant_refusal(layer, f, v, t)
    return layer


def test_the_tuner_times_the_routing_variant_only_where_it_serves() -> None:
    from ferrum_gen.tune import candidates

    spec = load_spec("qwen3moe")

    def routing_candidates(layer, bucket):
        return [c for c in candidates(layer, bucket) if ("grouped_gate_up_silu", "r8") in c.variants]

    layer = _fake_layer(spec, {})
    down_variants = [v for v in layer.variants["grouped_down_combine"]
                     if layer.variant_refusal("grouped_down_combine", v, grouped.ROUTED_TOKENS) is None]
    assert len(routing_candidates(layer, grouped.ROUTED_TOKENS)) == len(down_variants)  # with each that serves
    assert not routing_candidates(layer, 2 * grouped.ROUTED_TOKENS)
    assert not routing_candidates(_fake_layer(spec, {"FERRUM_MOE_HOST_ROUTE": "1"}), 1)


def test_the_integer_dot_variants_take_a_cta_a_pair_up_to_their_most_pairs(spec) -> None:
    """o1i (integer dot products) is a variant of gate+up and of down on one row tile, launched with
    a slot per pair (a CTA a pair, slot mode PAIR) for up to INT_DOT_MAX_PAIRS pairs, and marked as
    arithmetic of its own (the bit-identity test compares the mma variants only)."""
    if not grouped.supported(spec):
        return
    by_family = {}
    for k in enumerate_kernels(spec):
        if k.family.startswith("grouped"):
            by_family.setdefault(k.family, {})[k.variant] = k
    most = grouped.INT_DOT_MAX_PAIRS // spec.top_k
    for family, kernels in by_family.items():
        k = kernels[grouped.INT_DOT_VARIANT]
        assert k.values["INT_DOT"] == "true" and k.values["SLOT_MODE"] == "PAIR"
        assert k.launch["max_tokens"] == most >= 1 and k.launch["integer_dot"] is True
        assert k.launch["slot_per_pair"] is True and k.launch["grid"] == "(rows / rows_per_cta, num_pairs)"
        assert k.launch["rows_per_cta"] == grouped.ROWS_PER_CTA
        assert all(v.values["INT_DOT"] == "false" and "integer_dot" not in v.launch
                   for name, v in kernels.items() if name != grouped.INT_DOT_VARIANT)
    gate_up = by_family["grouped_gate_up_silu"][grouped.INT_DOT_VARIANT]
    assert gate_up.values["LAUNCH_BOUNDS"] == f"THREADS, {grouped.INT_DOT_MIN_CTAS}"


def _magic_constants() -> dict[str, dict[str, int]]:
    """The Mma<T> constants of templates/grouped.cuh.j2, by type: {"__half": {"MAGIC": ..., ...}, ...}."""
    source = (Path(ferrum_gen.__file__).parent / "templates" / "grouped.cuh.j2").read_text()
    out: dict[str, dict[str, int]] = {}
    for mt, body in re.findall(r"template <> struct Mma<(\w+)> \{(.*?)\n\};", source, re.S):
        values = dict(re.findall(r"static constexpr u32 (\w+) = 0x([0-9A-Fa-f]{8})u;", body))
        aliases = dict(re.findall(r"static constexpr u32 (\w+) = ([A-Z_]+);", body))
        out[mt] = {k: int(v, 16) for k, v in values.items()} | {k: int(values[v], 16) for k, v in aliases.items()}
    return out


def test_the_magic_constants_make_every_code_an_exact_16_bit_float() -> None:
    """The dequantisation ORs a code into a 16-bit float and subtracts the float's magic value: exact only
    if the code lands in the mantissa's units. Low nibbles and Q6_K's 6-bit codes go under MAGIC; Q4_K's
    high nibbles stay at bits 4-7 under HIGH_MAGIC in f16 (64 + q), and are shifted down in bf16."""
    consts = _magic_constants()
    half, bf16 = consts["__half"], consts["__nv_bfloat16"]

    def as_f16(bits: int) -> float:
        return float(np.array([bits & 0xFFFF], dtype=np.uint16).view(np.float16)[0])

    def as_bf16(bits: int) -> float:
        return float(np.array([(bits & 0xFFFF) << 16], dtype=np.uint32).view(np.float32)[0])

    for q in range(64):
        assert as_f16(half["MAGIC"] | q) == as_f16(half["MAGIC"]) + q
        assert as_bf16(bf16["MAGIC"] | q) == as_bf16(bf16["MAGIC"]) + q
    for q in range(16):
        assert as_f16(half["HIGH_MAGIC"] | (q << 4)) == as_f16(half["HIGH_MAGIC"]) + q
    assert half["HIGH_MAGIC"] != half["MAGIC"]
    assert bf16["HIGH_MAGIC"] == bf16["MAGIC"]
    # each 32-bit constant is one 16-bit pattern twice (a register's two halves)
    for c in (half["MAGIC"], half["HIGH_MAGIC"], bf16["MAGIC"]):
        assert c >> 16 == c & 0xFFFF
