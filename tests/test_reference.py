"""The float64 reference (ferrum_gen.reference) against independent, straightforward code."""

from __future__ import annotations

import math

import gguf
import gguf.quants
import numpy as np
import pytest

from ferrum_gen import quant
from ferrum_gen import reference as ref
from ferrum_gen.spec import MoeSpec, QuantType, load_spec, shipped_specs, spec_from_dict

SPECS = shipped_specs()
SPEC_IDS = [s.name for s in SPECS]
GGML = {QuantType.Q4_K: gguf.GGMLQuantizationType.Q4_K, QuantType.Q6_K: gguf.GGMLQuantizationType.Q6_K}


# --- helpers ------------------------------------------------------------------


def reduced(spec: MoeSpec, h: int = 256, i: int = 256, **changes) -> MoeSpec:
    """The spec with a smaller H and I (and any other changes), validated again."""
    return spec_from_dict({**spec.model_dump(mode="json"), "hidden_size": h, "intermediate_size": i, **changes})


def random_weight_bytes(spec: MoeSpec, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
    out = []
    for qt, rows, in_dim in ((spec.quant.gate, i, h), (spec.quant.up, i, h), (spec.quant.down, h, i)):
        out.append(quant.random_matrix_bytes(qt, e * rows, in_dim, rng).reshape(e, rows, -1))
    return tuple(out)


_CACHE: dict = {}


def weights_for(spec: MoeSpec, seed: int = 0):
    """(bytes, DenseExperts, independently dequantized gate/up/down), cached per spec."""
    key = (spec.spec_hash(), seed)
    if key not in _CACHE:
        gb, ub, db = random_weight_bytes(spec, seed)
        dense = ref.DenseExperts.from_quantized(spec, gb, ub, db)
        e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
        indep = tuple(
            gguf.quants.dequantize(b, GGML[qt]).reshape(e, rows, cols).astype(np.float64)
            for b, qt, rows, cols in (
                (gb, spec.quant.gate, i, h),
                (ub, spec.quant.up, i, h),
                (db, spec.quant.down, h, i),
            )
        )
        _CACHE[key] = ((gb, ub, db), dense, indep)
    return _CACHE[key]


def loop_layer(x, logits, wg, wu, wd, top_k, norm):
    """The layer written as plainly as possible: one token, one expert at a time."""
    n_tokens, n_experts = logits.shape
    out = np.zeros((n_tokens, wd.shape[1]))
    for t in range(n_tokens):
        l = [float(v) for v in logits[t]]
        m = max(l)
        ex = [math.exp(v - m) for v in l]
        z = sum(ex)
        p = [v / z for v in ex]
        chosen = sorted(range(n_experts), key=lambda e: (-p[e], e))[:top_k]
        w = [p[e] for e in chosen]
        if norm:
            s = sum(w)
            w = [v / s for v in w] if s > 0 else [1.0 / top_k] * top_k
        xt = x[t].astype(np.float64)
        for e, we in zip(chosen, w):
            g = wg[e] @ xt
            u = wu[e] @ xt
            a = g / (1.0 + np.exp(-g)) * u
            out[t] += we * (wd[e] @ a)
    return out


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_inputs(rng, n_tokens, spec_or_h, n_experts=None, dtype=np.float32):
    h = spec_or_h.hidden_size if isinstance(spec_or_h, MoeSpec) else spec_or_h
    e = spec_or_h.num_experts if isinstance(spec_or_h, MoeSpec) else n_experts
    x = rng.standard_normal((n_tokens, h)).astype(dtype)
    logits = (rng.standard_normal((n_tokens, e)) * 2).astype(np.float32)
    return x, logits


def random_ids(rng, n_tokens, n_experts, top_k, skew):
    """Distinct experts per token; skew > 0 makes a few experts hot and leaves others empty."""
    score = rng.random((n_tokens, n_experts)) + skew * np.linspace(1, 0, n_experts) ** 4
    return np.argsort(-score, axis=1)[:, :top_k].astype(np.int32)


# --- the whole layer -------------------------------------------------------------


TINY = load_spec("tiny")


@pytest.mark.parametrize("n_tokens", [1, 7, 33])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("experts_k", [(8, 2), (16, 4)], ids=lambda ek: f"e{ek[0]}k{ek[1]}")
def test_layer_matches_loop(n_tokens, norm, experts_k):
    n_experts, top_k = experts_k
    spec = reduced(TINY, 512, 256, num_experts=n_experts, top_k=top_k, norm_topk_prob=norm)
    _, dense, (wg, wu, wd) = weights_for(spec)
    rng = np.random.default_rng(n_tokens * 10 + n_experts)
    x, logits = random_inputs(rng, n_tokens, spec)
    want = loop_layer(x, logits, wg, wu, wd, top_k, norm)
    got = ref.moe_layer(x, logits, dense, top_k, norm)
    assert got.shape == (n_tokens, spec.hidden_size) and got.dtype == np.float64
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_layer_matches_loop_per_spec(spec):
    """The spec's E, k, norm and quant types, H and I reduced to 256."""
    small = reduced(spec)
    _, dense, (wg, wu, wd) = weights_for(small)
    rng = np.random.default_rng(11)
    x, logits = random_inputs(rng, 13, small)
    want = loop_layer(x, logits, wg, wu, wd, spec.top_k, spec.norm_topk_prob)
    for bs in spec.prefill.block_sizes:
        got = ref.moe_layer(x, logits, dense, spec.top_k, spec.norm_topk_prob, block_size=bs)
        assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_dense_experts_dequantize_like_gguf(spec):
    small = reduced(spec)
    _, dense, indep = weights_for(small)
    e, h, i = small.num_experts, small.hidden_size, small.intermediate_size
    assert dense.gate.shape == dense.up.shape == (e, i, h) and dense.down.shape == (e, h, i)
    for got, want in zip((dense.gate, dense.up, dense.down), indep):
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)


def test_dense_experts_reject_wrong_shapes():
    spec = reduced(TINY)
    gb, ub, db = weights_for(spec)[0]
    with pytest.raises(ValueError, match="down"):
        ref.DenseExperts.from_quantized(spec, gb, ub, ub)  # Q6_K rows where Q4_K belongs
    with pytest.raises(ValueError, match="gate"):
        ref.DenseExperts.from_quantized(spec, gb[:-1], ub, db)
    with pytest.raises(ValueError, match="whole number"):
        ref.dequant_stack(QuantType.Q6_K, gb)  # Q4_K rows of 144 bytes are not Q6_K blocks


def test_layer_zero_tokens():
    spec = reduced(TINY)
    dense = weights_for(spec)[1]
    out = ref.moe_layer(np.zeros((0, 256), np.float32), np.zeros((0, 8), np.float32), dense, 2, True)
    assert out.shape == (0, 256) and out.dtype == np.float64


def test_layer_rejects_bad_shapes():
    spec = reduced(TINY)
    dense = weights_for(spec)[1]
    x, logits = random_inputs(np.random.default_rng(0), 3, spec)
    with pytest.raises(ValueError, match="x must be"):
        ref.moe_layer(x[:, :-1], logits, dense, 2, True)
    with pytest.raises(ValueError, match="logits"):
        ref.moe_layer(x, logits[:2], dense, 2, True)
    with pytest.raises(ValueError, match="top_k"):
        ref.moe_layer(x, logits, dense, 9, True)


def test_layer_non_finite_tokens_only_poison_themselves():
    spec = reduced(TINY)
    dense = weights_for(spec)[1]
    x, logits = random_inputs(np.random.default_rng(5), 6, spec)
    logits[1, 3] = np.nan
    logits[4, 0] = np.inf
    out = ref.moe_layer(x, logits, dense, 2, True)
    good = [0, 2, 3, 5]
    assert np.isnan(out[[1, 4]]).all()
    np.testing.assert_array_equal(out[good], ref.moe_layer(x[good], logits[good], dense, 2, True))


@pytest.mark.parametrize("n_tokens,bs", [(1, 16), (2, 32), (7, 48), (33, 64), (33, 16)])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_decode_style_equals_layer(spec, n_tokens, bs):
    """Per pair, no align/gather/combine: the plan changes nothing numerically."""
    small = reduced(spec)
    dense = weights_for(small)[1]
    rng = np.random.default_rng(n_tokens)
    x, logits = random_inputs(rng, n_tokens, small)
    ids, w = ref.route(logits, spec.top_k, spec.norm_topk_prob)
    want = np.zeros((n_tokens, small.hidden_size))
    for t in range(n_tokens):
        for j in range(spec.top_k):
            e = ids[t, j]
            a = ref.gate_up_silu(x[t : t + 1], dense.gate[e], dense.up[e])
            want[t] += w[t, j] * ref.down(a, dense.down[e])[0]
    got = ref.moe_layer(x, logits, dense, spec.top_k, spec.norm_topk_prob, block_size=bs)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12 * np.abs(want).max())


def test_gather_and_combine_are_exact_permutations():
    rng = np.random.default_rng(9)
    n_tokens, n_experts, top_k, h = 37, 16, 4, 8
    ids = random_ids(rng, n_tokens, n_experts, top_k, skew=3.0)
    w = rng.random((n_tokens, top_k))
    x = rng.standard_normal((n_tokens, h)).astype(np.float32)
    plan = ref.align(ids, n_experts, 16)
    xs = ref.gather(x, plan, top_k)
    assert xs.shape == (plan.num_padded, h) and xs.dtype == np.float64
    assert not xs[plan.sorted_ids == plan.sentinel].any()
    pairs = np.arange(n_tokens * top_k)
    np.testing.assert_array_equal(xs[plan.pairs_by_token], x[pairs // top_k])
    # combine of the gathered rows themselves: out[t] = sum_j w[t, j] * x[t]
    want = np.zeros((n_tokens, h))
    for j in range(top_k):
        want += w[:, j, None] * x.astype(np.float64)
    np.testing.assert_array_equal(ref.combine(xs, plan, w), want)


def test_silu():
    z = np.array([-1e4, -50.0, -1.0, 0.0, 1.0, 50.0, 1e4])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        got = ref.silu(z)
    want = np.array([v / (1 + math.exp(-v)) if v > -700 else -0.0 for v in z])
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)


# --- routing -----------------------------------------------------------------------


def softmax64(logits):
    l = logits.astype(np.float64)
    e = np.exp(l - l.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("fn", [ref.route, ref.route_f32], ids=["route", "route_f32"])
def test_route_ties_go_to_the_smaller_index(fn):
    logits = np.array([[1, 3, 3, 2, 3], [0, 0, 0, 0, 0], [0, -np.inf, -np.inf, -np.inf, -np.inf]], np.float32)
    ids, w = fn(logits, 3, True)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [[1, 2, 4], [0, 1, 2], [0, 1, 2]])
    np.testing.assert_allclose(w, [[1 / 3] * 3, [1 / 3] * 3, [1, 0, 0]], rtol=1e-7)
    ids, w = fn(logits, 2, False)
    np.testing.assert_array_equal(ids, [[1, 2], [0, 1], [0, 1]])
    np.testing.assert_allclose(w[1], [0.2, 0.2], rtol=1e-7)
    np.testing.assert_allclose(w[2], [1, 0], rtol=1e-7)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_route_weights(spec):
    rng = np.random.default_rng(21)
    n_tokens, k = 50, spec.top_k
    logits = (rng.standard_normal((n_tokens, spec.num_experts)) * 3).astype(np.float32)
    p = softmax64(logits)
    want_ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    p_top = np.take_along_axis(p, want_ids, axis=1)

    ids, w = ref.route(logits, k, False)
    assert w.dtype == np.float64 and w.shape == (n_tokens, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(w, p_top, rtol=1e-13)
    assert (np.diff(w, axis=1) <= 0).all()

    ids, w = ref.route(logits, k, True)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(w, p_top / p_top.sum(axis=1, keepdims=True), rtol=1e-13)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-14)

    # the spec's own setting, through route_f32: same experts, float32 weights close to float64
    ids32, w32 = ref.route_f32(logits, k, spec.norm_topk_prob)
    ids64, w64 = ref.route(logits, k, spec.norm_topk_prob)
    assert w32.dtype == np.float32
    np.testing.assert_array_equal(ids32, ids64)
    np.testing.assert_allclose(w32, w64, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("n_tokens,n_experts,top_k", [(1, 8, 2), (33, 64, 8), (513, 128, 8), (200, 512, 32)])
def test_route_f32_selects_like_route(n_tokens, n_experts, top_k):
    rng = np.random.default_rng(n_tokens)
    logits = (rng.standard_normal((n_tokens, n_experts)) * 4).astype(np.float32)
    logits[::3] = np.round(logits[::3])  # many exact ties
    logits[1::7, : n_experts // 2] = -np.inf
    for norm in (True, False):
        ids, _ = ref.route(logits, top_k, norm)
        ids32, _ = ref.route_f32(logits, top_k, norm)
        np.testing.assert_array_equal(ids32, ids)
        assert (np.sort(ids, axis=1)[:, 1:] != np.sort(ids, axis=1)[:, :-1]).all()  # distinct


@pytest.mark.parametrize("fn", [ref.route, ref.route_f32], ids=["route", "route_f32"])
def test_route_never_divides_by_zero(fn):
    """sum(p_top) > 0 always holds for finite logits (the top expert has e = 1), even for
    extreme spreads; the 1/k fallback must not be reached through a 0/0."""
    logits = np.array(
        [[-3e38, 3e38, 0, -1], [-1e30, -1e30, -1e30, -1e30], [-3e38, -3e38, 3e38, 3e38], [80, -80, 40, -40]],
        np.float32,
    )
    with np.errstate(divide="raise", invalid="raise"):
        for norm in (True, False):
            ids, w = fn(logits, 2, norm)
            assert np.isfinite(w).all()
            np.testing.assert_array_equal(ids, [[1, 2], [0, 1], [2, 3], [0, 2]])
    ids, w = fn(logits, 2, True)
    np.testing.assert_allclose(w[:3], [[1, 0], [0.5, 0.5], [0.5, 0.5]], rtol=1e-7)


@pytest.mark.parametrize("fn", [ref.route, ref.route_f32], ids=["route", "route_f32"])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
def test_route_non_finite_tokens(fn, norm):
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((7, 16)).astype(np.float32)
    logits[1, 5] = np.nan
    logits[3, 9] = np.inf
    logits[4] = -np.inf
    logits[6, :8] = -np.inf  # some -inf: still a finite token
    k = 4
    ids, w = fn(logits, k, norm)
    bad, good = [1, 3, 4], [0, 2, 5, 6]
    np.testing.assert_array_equal(ids[bad], np.tile(np.arange(k), (3, 1)))
    assert np.isnan(w[bad]).all()
    ids_g, w_g = fn(logits[good], k, norm)
    np.testing.assert_array_equal(ids[good], ids_g)
    np.testing.assert_array_equal(w[good], w_g)
    assert np.isfinite(w[good]).all()
    assert (ids[6] >= 8).all()


def test_route_input_checks():
    logits = np.zeros((3, 8), np.float32)
    with pytest.raises(ValueError, match="2-D"):
        ref.route(logits[0], 2, True)
    with pytest.raises(ValueError, match="top_k"):
        ref.route(logits, 9, True)
    with pytest.raises(ValueError, match="top_k"):
        ref.route_f32(logits, 0, True)
    with pytest.raises(ValueError, match="float"):
        ref.route(logits.astype(np.int32), 2, True)
    ids, w = ref.route(logits.astype(np.float16), 2, True)  # any float dtype
    np.testing.assert_array_equal(ids, np.tile([0, 1], (3, 1)))
    ids, w = ref.route(np.zeros((0, 8), np.float32), 2, False)
    assert ids.shape == w.shape == (0, 2)


# --- align -------------------------------------------------------------------------


def check_plan(plan: ref.AlignPlan, ids: np.ndarray, n_experts: int, bs: int) -> None:
    n_tokens, top_k = ids.shape
    n_pairs = n_tokens * top_k
    flat = ids.reshape(-1)
    s = plan.sorted_ids
    assert plan.sentinel == n_pairs and plan.block_size == bs
    assert s.dtype == plan.block_expert.dtype == plan.pairs_by_token.dtype == np.int32
    assert plan.num_padded == s.size and plan.num_padded % bs == 0
    assert plan.num_padded <= n_pairs + n_experts * (bs - 1)
    assert plan.block_expert.size == plan.num_padded // bs

    real = s != plan.sentinel
    # every pair exactly once, and nothing else but the sentinel
    np.testing.assert_array_equal(np.sort(s[real]), np.arange(n_pairs))
    assert ((s >= 0) & (s <= plan.sentinel)).all()
    # pairs_by_token is the inverse
    assert plan.pairs_by_token.size == n_pairs
    np.testing.assert_array_equal(s[plan.pairs_by_token], np.arange(n_pairs))
    # each block's expert is that of the pairs in it
    slot_expert = np.repeat(plan.block_expert, bs)
    np.testing.assert_array_equal(flat[s[real]], slot_expert[real])
    # experts ascending, one run of ceil(count / bs) blocks each, none for an unused expert
    counts = np.bincount(flat, minlength=n_experts)
    np.testing.assert_array_equal(plan.block_expert, np.repeat(np.arange(n_experts), -(-counts // bs)))
    # inside a segment: the real pairs first (ascending pair index), then sentinel padding
    seg_start = np.repeat(np.concatenate(([0], np.cumsum(-(-counts // bs) * bs)[:-1])), -(-counts // bs) * bs)
    np.testing.assert_array_equal(real, np.arange(plan.num_padded) - seg_start < counts[slot_expert])
    same_seg = real[1:] & real[:-1] & (slot_expert[1:] == slot_expert[:-1])
    assert (np.diff(s)[same_seg] > 0).all()
    # a's rows: the real slots, in order, without the padding
    slot_a_row = np.repeat(plan.block_a_row, bs) + np.arange(plan.num_padded) % bs
    np.testing.assert_array_equal(slot_a_row[real], np.arange(n_pairs))
    np.testing.assert_array_equal(ref.expert_counts(ids, n_experts), counts)


@pytest.mark.parametrize("n_tokens", [1, 2, 7, 33, 64, 513, 1000, 4097, 5000])
@pytest.mark.parametrize("n_experts", [8, 64, 128, 512])
def test_align_invariants(n_tokens, n_experts):
    rng = np.random.default_rng(n_tokens * 1000 + n_experts)
    for top_k in (1, 2, 8):
        for skew in (0.0, 4.0):
            ids = random_ids(rng, n_tokens, n_experts, top_k, skew)
            for bs in (16, 32, 48, 64):
                check_plan(ref.align(ids, n_experts, bs), ids, n_experts, bs)


def test_align_example():
    ids = np.array([[2, 0], [0, 3], [2, 0]], np.int32)  # pairs 0..5
    plan = ref.align(ids, 5, 16)
    s = plan.sentinel
    assert s == 6 and plan.num_padded == 48
    np.testing.assert_array_equal(plan.sorted_ids[:16], [1, 2, 5] + [s] * 13)
    np.testing.assert_array_equal(plan.sorted_ids[16:32], [0, 4] + [s] * 14)
    np.testing.assert_array_equal(plan.sorted_ids[32:], [3] + [s] * 15)
    np.testing.assert_array_equal(plan.block_expert, [0, 2, 3])
    np.testing.assert_array_equal(plan.block_a_row, [0, 3, 5])
    np.testing.assert_array_equal(plan.pairs_by_token, [16, 0, 1, 32, 17, 2])


def test_align_empty_and_errors():
    plan = ref.align(np.zeros((0, 4), np.int32), 8, 16)
    assert plan.num_padded == 0 and plan.sentinel == 0
    assert plan.sorted_ids.size == plan.block_expert.size == plan.block_a_row.size == plan.pairs_by_token.size == 0
    with pytest.raises(ValueError, match="lie in"):
        ref.align(np.array([[0, 8]]), 8, 16)
    with pytest.raises(ValueError, match="lie in"):
        ref.expert_counts(np.array([[-1, 2]]), 8)
    with pytest.raises(ValueError, match="integer"):
        ref.align(np.array([[0.0, 1.0]]), 8, 16)


# --- block size ------------------------------------------------------------------


@pytest.mark.parametrize(
    "counts,candidates,budget,override,want",
    [
        ([64, 128, 60], (16, 32, 64), 1.30, None, 64),  # 256 <= 327.6
        ([32, 60], (16, 32, 64), 1.30, None, 32),  # 64: 128 > 119.6; 32: 96 <= 119.6
        ([16, 16, 16, 0], (16, 32, 64), 1.30, None, 16),  # 32: 96 > 62.4; 16: 48
        ([1, 1, 1], (16, 32, 64), 1.30, None, 16),  # none qualifies: the smallest
        ([1, 1, 1], (32, 48), 1.30, None, 32),
        ([0, 0, 0], (16, 32, 64), 1.30, None, 16),  # no pairs: the smallest
        ([0, 0], (48, 64), 4.0, None, 48),
        ([1, 1, 1], (16, 32, 64), 1.30, 64, 64),  # the override wins
        ([64, 64], (16, 32, 64), 1.30, 16, 16),
        ([32], (16, 32, 64), 2.0, None, 64),  # padded == real * budget qualifies
        ([32], (16, 32, 64), 1.99, None, 32),
        ([32, 60], (64, 16, 32), 1.30, None, 32),  # candidate order does not matter
        # 133.9 allowed; 64: 192, 48: 144, 32: 160 are over; 16: 112 + 16 = 128
        ([100, 0, 3], (16, 32, 48, 64), 1.30, None, 16),
    ],
)
def test_pick_block_size(counts, candidates, budget, override, want):
    got = ref.pick_block_size(np.array(counts, np.int64), candidates, budget, override)
    assert got == want and isinstance(got, int)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_pick_block_size_per_spec(spec):
    sizes, budget = spec.prefill.block_sizes, spec.prefill.padding_budget
    rng = np.random.default_rng(0)
    # decode-sized: a handful of pairs pads badly at any size -> the smallest
    ids = random_ids(rng, 1, spec.num_experts, spec.top_k, 0.0)
    assert ref.pick_block_size(ref.expert_counts(ids, spec.num_experts), sizes, budget) == min(sizes)
    # long prefill spread evenly over the experts -> the largest
    ids = np.tile(np.arange(spec.num_experts, dtype=np.int32), 64 * max(sizes) // spec.top_k + 1)
    ids = ids[: (ids.size // spec.top_k) * spec.top_k].reshape(-1, spec.top_k)
    assert ref.pick_block_size(ref.expert_counts(ids, spec.num_experts), sizes, budget) == max(sizes)
    assert ref.pick_block_size(np.zeros(spec.num_experts), sizes, budget, override=sizes[0]) == sizes[0]
