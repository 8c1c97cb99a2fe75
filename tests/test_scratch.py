"""A layer's scratch memory on CPU: what scratch_shapes sizes, and the table of it in the docs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from ferrum_gen import tuning
from ferrum_gen.quant import row_bytes
from ferrum_gen.runtime import aligned_block_sizes, aligned_rows, block_size_cap, decode_token_cap, scratch_shapes, shapes_bytes
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
    bs = max(spec.prefill.block_sizes)
    rows = bs * (min(spec.num_experts, pairs) + (pairs - min(spec.num_experts, pairs)) // bs)
    assert shapes["ids"][0] == shapes["weights"][0] == (pairs,)
    assert shapes["sorted_ids"][0] == (rows,)
    assert shapes["block_expert"][0] == shapes["block_a_row"][0] == (rows // min(spec.prefill.block_sizes) + 1,)
    assert shapes["a_sorted"][0] == (pairs + bs - 1, spec.intermediate_size)  # a row a real slot, and the slack
    assert shapes["y_pairs"][0] == (pairs, spec.hidden_size)  # by pair: no padding rows
    assert shapes["a_decode"][0] == (min(max_tokens, 16) * spec.top_k, spec.intermediate_size)
    assert shapes["tile_counters"][0] == (math.ceil(spec.hidden_size / 16),)
    assert ("x_mma" in shapes) is (spec.activation_dtype is ActivationDtype.F32)
    assert shapes_bytes(shapes) > 2 * pairs * (spec.intermediate_size + spec.hidden_size)  # a and y, 16-bit or wider


def padded_rows(pairs_per_expert: np.ndarray, block_size: int) -> int:
    """The sorted rows align fills: each expert's pairs padded to whole blocks."""
    return int((-(-pairs_per_expert // block_size) * block_size).sum())


def most_padded_routing(spec, tokens: int, block_size: int) -> np.ndarray:
    """Pairs per expert that pad the most: one pair on as many experts as can have one, the rest in whole
    blocks, no expert above `tokens` pairs (a token picks an expert once)."""
    pairs = tokens * spec.top_k
    counts = np.zeros(spec.num_experts, dtype=np.int64)
    counts[: min(spec.num_experts, pairs)] = 1
    left = pairs - counts.sum()
    for e in range(spec.num_experts):
        take = min(left, tokens - counts[e]) // block_size * block_size
        counts[e] += take
        left -= take
    for e in range(spec.num_experts):  # what no whole block takes, wherever there is room
        take = min(left, tokens - counts[e])
        counts[e] += take
        left -= take
    return counts


@pytest.mark.parametrize("max_tokens", (1, 3, 65, 257, 1000))
def test_the_sorted_rows_hold_the_most_padded_call_at_every_block_size(spec, max_tokens: int) -> None:
    cap = block_size_cap(spec, committed_table(spec), max_tokens)
    rows = aligned_rows(spec, max_tokens, cap)
    rng = np.random.default_rng(max_tokens)
    worst = 0
    for b in (b for b in aligned_block_sizes(spec) if b <= cap):
        for tokens in {1, max(1, max_tokens // 2), max_tokens}:
            counts = most_padded_routing(spec, tokens, b)
            assert counts.sum() == tokens * spec.top_k and counts.max() <= tokens
            worst = max(worst, padded_rows(counts, b))
            for _ in range(20):
                picks = np.argsort(rng.random((tokens, spec.num_experts)), axis=1)[:, : spec.top_k]
                assert padded_rows(np.bincount(picks.ravel(), minlength=spec.num_experts), b) <= rows
    if cap <= max_tokens:  # the bound is reached, so no smaller buffer would do (an expert holds at most max_tokens pairs)
        assert worst == rows


def test_the_tuned_block_sizes_grow_the_scratch_by_at_most_a_fifth(spec) -> None:
    """Issue 8's bound on max_tokens memory: a table's larger stream blocks (w96 to w160) pad only the sorted
    slots and their per-block words, never a or y, so at no max_tokens does the scratch exceed the one
    padded to the spec's own largest block size by more than 20 %."""
    table = committed_table(spec)
    for max_tokens in sorted({*range(1, 4097, 61), *(e.bucket + 1 for e in table.entries), 4096}):
        decode = decode_token_cap(spec, table, max_tokens)
        tuned = shapes_bytes(scratch_shapes(spec, max_tokens, decode, block_size_cap(spec, table, max_tokens)))
        own = shapes_bytes(scratch_shapes(spec, max_tokens, decode, max(spec.prefill.block_sizes)))
        assert tuned <= 1.2 * own, f"max_tokens {max_tokens}: {tuned / own - 1:.1%} more scratch"


def test_without_a_table_the_scratch_fits_the_default_rules_stream_blocks(spec) -> None:
    """The default rule's stream block grows with T (families/stream.py RULE_BY_PAIRS_PER_EXPERT): a layer
    without a table sizes its sorted rows for the rule's block at max_tokens, so no call up to it grows the
    scratch inside a forward (which may be under graph capture)."""
    from ferrum_gen.families import stream

    sizes = stream.variant_block_sizes(spec)
    for max_tokens in (1, spec.decode_max_tokens + 1, 300, 1000, 4096):
        cap = block_size_cap(spec, None, max_tokens)
        for tokens in range(spec.decode_max_tokens + 1, max_tokens + 1):
            assert sizes.get(stream.rule_variant(spec, tokens), 0) <= cap
    largest = stream.rule_variant(spec, 4096)
    if largest.startswith("w") and largest in sizes:  # a wgmma variant the spec has, above its own block sizes
        assert block_size_cap(spec, None, 4096) == sizes[largest] > max(spec.prefill.block_sizes)


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
