"""A layer's scratch memory on CPU: what scratch_shapes sizes, and the table of it in the docs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from ferrum_gen import tuning
from ferrum_gen.quant import row_bytes
from ferrum_gen.runtime import block_size_cap, decode_token_cap, scratch_shapes, shapes_bytes
from ferrum_gen.spec import ActivationDtype, load_spec, shipped_spec_names

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


@pytest.fixture(params=shipped_spec_names())
def spec(request):
    return load_spec(request.param)


def committed_table(spec) -> tuning.TuningTable:
    return tuning.TuningTable.load(ROOT / "generated" / spec.name / "tuning" / "nvidia_h200.json")


@pytest.mark.parametrize("max_tokens", (1, 300))
def test_scratch_holds_every_pair_and_each_experts_padding(spec, max_tokens: int) -> None:
    shapes = scratch_shapes(spec, max_tokens, decode_tokens=min(max_tokens, 16))
    pairs = max_tokens * spec.top_k
    rows = pairs + min(spec.num_experts, pairs) * (max(spec.prefill.block_sizes) - 1)
    assert shapes["ids"][0] == shapes["weights"][0] == shapes["pairs_by_token"][0] == (pairs,)
    assert shapes["sorted_ids"][0] == (rows,)
    assert shapes["a_sorted"][0] == (rows, spec.intermediate_size)
    assert shapes["y_pairs"][0] == (pairs, spec.hidden_size)  # by pair: no padding rows
    assert shapes["a_decode"][0] == (min(max_tokens, 16) * spec.top_k, spec.intermediate_size)
    assert shapes["tile_counters"][0] == (math.ceil(spec.hidden_size / 16),)
    assert ("x_mma" in shapes) is (spec.activation_dtype is ActivationDtype.F32)
    assert shapes_bytes(shapes) > 2 * (rows * spec.intermediate_size + pairs * spec.hidden_size)  # a and y, 16-bit or wider


def test_the_memory_table_in_the_docs_is_what_scratch_shapes_gives(spec) -> None:
    page = (ROOT / "docs" / "engine-integration.md").read_text()
    row = re.search(rf"^\| {spec.name} \| (.+) \|$", page, re.M)
    assert row, f"docs/engine-integration.md has no memory row for {spec.name}"
    cells = [float(c.split()[0]) for c in row.group(1).split(" | ")]
    E, H, I, q = spec.num_experts, spec.hidden_size, spec.intermediate_size, spec.quant
    weights = E * (I * row_bytes(q.gate, H) + I * row_bytes(q.up, H) + H * row_bytes(q.down, I))
    want = [round(weights / MIB)] + [
        round(shapes_bytes(scratch_shapes(spec, t, decode_token_cap(spec, committed_table(spec), t),
                                          block_size_cap(spec, committed_table(spec), t))) / MIB, 1)
        for t in (1, 256, 4096)]
    assert cells == want
