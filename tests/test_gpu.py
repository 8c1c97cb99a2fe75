"""GPU suite (`make gpu-test`, `pytest -m gpu`): every kernel and the whole layer against the
float64 reference, for every shipped spec, on fresh random inputs with poisoned outputs.

Skipped, with the reason shown, on machines without CuPy or without a GPU.
"""

from __future__ import annotations

import contextlib
import json
import zlib

import numpy as np
import pytest

from ferrum_gen import reference, tuning
from ferrum_gen.families import grouped as grouped_family
from ferrum_gen.families import route_align as route_align_family
from ferrum_gen.families import stream as stream_family
from ferrum_gen.quant import dequantize, random_matrix_bytes
from ferrum_gen.settings import Settings
from ferrum_gen.spec import ActivationDtype, MoeSpec, load_spec, shipped_spec_names

from conftest import TEST_SEED

try:
    import cupy as cp

    _GPUS = cp.cuda.runtime.getDeviceCount()
    _WHY = "" if _GPUS else "no CUDA GPU visible to CuPy"
except Exception as err:  # noqa: BLE001 - any failure means: no usable GPU here
    cp = None
    _GPUS = 0
    _WHY = f"CuPy/CUDA unavailable: {type(err).__name__}: {err}"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_GPUS == 0, reason=f"GPU suite skipped: {_WHY}")]

TOKEN_COUNTS = (1, 2, 7, 33, 64, 513, 4097)
GROUPED_TOKEN_COUNTS = (1, 2, 3, 7, 8, 9, 16, 17, 31, 32, 33, 64)
"""The grouped path's kernels: every count around its 8- and 16-token passes."""
STREAM_TOKEN_COUNTS = (1, 32, 33, 64, 65, 127, 129, 161, 512, 513, 1000, 4096, 4097)
"""The stream path's kernels: around their 32-, 64-, 128- and 160-token blocks (one expert takes every
token in one of the routings), and up to the layer's max_tokens."""
MAX_TOKENS = max(TOKEN_COUNTS)
# ||out - ref|| / ||ref|| bounds from the design brief
LAYER_TOL = {ActivationDtype.F32: 2e-3, ActivationDtype.F16: 2e-3, ActivationDtype.BF16: 1e-2}
DEQUANT_TOL = 1e-5


def rel_err(out, ref) -> float:
    out = cp.asarray(out, dtype=cp.float64)
    ref = cp.asarray(ref, dtype=cp.float64)
    assert not bool(cp.isnan(out).any()), "NaN in the output: an element was not written (outputs are poisoned)"
    return float(cp.linalg.norm(out - ref) / cp.linalg.norm(ref))


# --- activations in the spec's dtype (bf16 travels as uint16 bits) ---------------------

def to_act(a64, dtype: ActivationDtype):
    if dtype is ActivationDtype.F32:
        return a64.astype(cp.float32)
    if dtype is ActivationDtype.F16:
        return a64.astype(cp.float16)
    bits = a64.astype(cp.float32).view(cp.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
    return rounded.astype(cp.uint16)


def from_act(a, dtype: ActivationDtype):
    if dtype is ActivationDtype.BF16 or a.dtype == cp.uint16:
        return (a.astype(cp.uint32) << 16).view(cp.float32).astype(cp.float64)
    return a.astype(cp.float64)


def mma_dtype(spec: MoeSpec) -> ActivationDtype:
    """The 16-bit type the tensor-core kernels hold a in (f16 where the activations are f32)."""
    return ActivationDtype.BF16 if spec.activation_dtype is ActivationDtype.BF16 else ActivationDtype.F16


def poison(buf) -> None:
    if buf.dtype == cp.uint16:
        buf.fill(0x7FC0)  # bf16 NaN
    else:
        buf.fill(np.nan)


# --- one spec's layer, weights and dense float64 reference, built once per spec ---------

class Case:
    def __init__(self, spec: MoeSpec, settings: Settings | None = None):
        from ferrum_gen.bundle import KernelBundle
        from ferrum_gen.runtime import MoeLayer

        self.spec = spec
        # a stable seed: str hashes change from one process to the next, and so would the weights
        rng = np.random.default_rng(zlib.crc32(spec.name.encode()))
        E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size
        q = spec.quant
        self.raw = {
            "gate": random_matrix_bytes(q.gate, E * I, H, rng).reshape(E, I, -1),
            "up": random_matrix_bytes(q.up, E * I, H, rng).reshape(E, I, -1),
            "down": random_matrix_bytes(q.down, E * H, I, rng).reshape(E, H, -1),
        }
        self.bundle = KernelBundle.load(spec)
        self.settings = settings or Settings.from_env({})
        self.layer = MoeLayer(self.bundle, self.raw["gate"], self.raw["up"], self.raw["down"], MAX_TOKENS,
                              settings=self.settings)
        # exact float32 weights (what gguf's dequantize gives), on the GPU to keep the reference fast
        self.wg = dequantize(q.gate, cp.asarray(self.raw["gate"]), (E, I, H), xp=cp)
        self.wu = dequantize(q.up, cp.asarray(self.raw["up"]), (E, I, H), xp=cp)
        self.wd = dequantize(q.down, cp.asarray(self.raw["down"]), (E, H, I), xp=cp)

    def inputs(self, T: int, rng: np.random.Generator):
        x64 = cp.asarray(rng.standard_normal((T, self.spec.hidden_size)))
        x = to_act(x64, self.spec.activation_dtype)
        logits = cp.asarray((2.0 * rng.standard_normal((T, self.spec.num_experts))).astype(np.float32))
        return x, logits

    def reference(self, x, logits):
        """float64 layer output [T,H], per-pair a [T*k,I] and y [T*k,H], ids, weights."""
        spec = self.spec
        ids, w = reference.route(cp.asnumpy(logits), spec.top_k, spec.norm_topk_prob)
        x64 = from_act(x, spec.activation_dtype)
        T, k = ids.shape
        a = cp.zeros((T * k, spec.intermediate_size))
        y = cp.zeros((T * k, spec.hidden_size))
        flat = ids.reshape(-1)
        for e in np.unique(flat):
            pairs = np.nonzero(flat == e)[0]
            xe = x64[cp.asarray(pairs // k)]
            g = xe @ self.wg[e].astype(cp.float64).T
            u = xe @ self.wu[e].astype(cp.float64).T
            a[cp.asarray(pairs)] = g / (1.0 + cp.exp(-g)) * u
            y[cp.asarray(pairs)] = a[cp.asarray(pairs)] @ self.wd[e].astype(cp.float64).T
        out = (cp.asarray(w).reshape(T, k, 1) * y.reshape(T, k, -1)).sum(axis=1)
        return out, a, y, ids, w

    def run(self, x, logits, path: str, variants=None, stop_after: str | None = None):
        out = cp.empty((x.shape[0], self.spec.hidden_size), dtype=x.dtype)
        poison(out)
        for buf in (self.layer.a_decode, self.layer.a_sorted, self.layer.y_pairs, self.layer.y_grouped, self.layer.ids,
                    self.layer.weights, self.layer.sorted_ids, self.layer.block_a_row, self.layer.pair_row):
            poison(buf) if buf.dtype != cp.int32 else buf.fill(-7)
        self.layer.forward(x, logits, out=out, path=path, variants=variants, stop_after=stop_after)
        cp.cuda.get_current_stream().synchronize()
        return out


SMALL_GRID = 37
"""A grid for the smaller-grid tests: prime, so that no tile or unit count divides evenly."""


@contextlib.contextmanager
def small_grid(layer, kernels):
    """The persistent kernels in `kernels` launched on SMALL_GRID CTAs instead of every resident one."""
    saved = {kern.uri: layer._resident[kern.uri] for kern in kernels}
    layer._resident.update((uri, SMALL_GRID) for uri in saved)
    try:
        yield
    finally:
        layer._resident.update(saved)


def variant_sets(layer, path: str, tokens: int | None = None) -> list[dict[str, str]]:
    """Variant choices that run every usable variant of each of the path's families at least once
    (the i-th set takes each family's i-th variant, or its default when it has fewer); with
    `tokens`, only the variants that serve that many tokens."""
    from ferrum_gen.tuning import PATH_FAMILIES

    families = PATH_FAMILIES[path]
    per_family = {f: sorted(v for v in layer.variants[f]
                            if tokens is None or layer.variant_refusal(f, v, tokens) is None) for f in families}
    if path in tuning.LOCKSTEP_PATHS:  # the families take one variant together: those they all have
        shared = sorted(set.intersection(*(set(v) for v in per_family.values())))
        return [{f: v for f in families} for v in shared]
    longest = max(len(v) for v in per_family.values())
    return [{f: (vs[i] if i < len(vs) else layer._default_variants[f]) for f, vs in per_family.items()}
            for i in range(longest)]


_CASES: dict[str, Case] = {}


@pytest.fixture(scope="module", params=shipped_spec_names())
def case(request) -> Case:
    name = request.param
    if name not in _CASES:
        _CASES.clear()  # one spec's weights on the GPU at a time
        _CASES[name] = Case(load_spec(name))
    return _CASES[name]


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Fresh inputs every run, by design; the seed is printed so that a failure can be replayed
    (conftest.py: FERRUM_TEST_SEED)."""
    seed = TEST_SEED if TEST_SEED is not None else int(np.random.SeedSequence().entropy)
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


# --- kernels, stage by stage ----------------------------------------------------------------

@pytest.mark.parametrize("T", TOKEN_COUNTS)
def test_router_matches_reference(case: Case, T: int, rng) -> None:
    x, logits = case.inputs(T, rng)
    case.run(x, logits, "decode" if T * case.spec.top_k <= 65535 else "prefill")
    _, _, _, ids, w = case.reference(x, logits)
    k = case.spec.top_k
    got_ids = cp.asnumpy(case.layer.ids[: T * k]).reshape(T, k)
    got_w = cp.asnumpy(case.layer.weights[: T * k]).reshape(T, k)
    np.testing.assert_array_equal(got_ids, ids)
    host_ids, _ = reference.route_f32(cp.asnumpy(logits), k, case.spec.norm_topk_prob)
    np.testing.assert_array_equal(got_ids, host_ids)
    assert np.linalg.norm(got_w - w) / np.linalg.norm(w) <= 1e-5


@pytest.mark.parametrize("T", (1, route_align_family.MAX_TOKENS, 33, 513))
def test_router_sums_x_by_sub_block_where_the_stream_gate_up_reads_them(case: Case, T: int, rng) -> None:
    """Where the spec's mma.sync stream gate+up kernels add Q4_K's min terms apart (stream.x_sums), the router
    (route_align up to its max_tokens) also stores each token's x summed over each 32-element sub-block, as a
    high and a low bf16 part: their sum is the float64 sum to 2^-15 of the sub-block's absolute sum. It does so
    only for a call whose gate+up reads them (a wgmma variant does not: the buffer keeps its poison), and with
    the plan made on the host too."""
    from ferrum_gen.runtime import MoeLayer

    spec = case.spec
    if not stream_family.x_sums(spec):
        pytest.skip(f"{spec.name}: no x sums (stream.x_sums)")
    layer = case.layer
    x, logits = case.inputs(T, rng)
    x64 = from_act(x, spec.activation_dtype).reshape(T, -1, 32)
    want, scale = x64.sum(axis=2), cp.abs(x64).sum(axis=2)
    host = MoeLayer(case.bundle, case.raw["gate"], case.raw["up"], case.raw["down"], T,
                    settings=Settings.from_env({"FERRUM_MOE_HOST_ROUTE": "1"}))
    for variants in variant_sets(layer, "stream"):
        reads = mins_apart(layer, variants)
        for who in (layer, host):
            who.x_sums.fill(0x7FC07FC0)  # bf16 NaNs
            who.forward(x, logits, path="stream", variants=variants, stop_after="route")
            cp.cuda.get_current_stream().synchronize()
            parts = who.x_sums[:T].view(cp.uint16).reshape(T, -1, 4)  # per pair of sub-blocks: hi, hi, lo, lo
            hi = from_act(parts[:, :, 0:2].reshape(T, -1), ActivationDtype.BF16)
            lo = from_act(parts[:, :, 2:4].reshape(T, -1), ActivationDtype.BF16)
            where = (variants, "host" if who is host else "device")
            if not reads:
                assert bool(cp.isnan(hi).all()), f"{where}: sums stored for a gate+up that does not read them"
                continue
            assert float(cp.max(cp.abs(hi + lo - want) - scale * 2.0**-15)) <= 0.0, where


def mins_apart(layer, variants: dict[str, str]) -> bool:
    """Whether the stream gate+up variant of `variants` takes Q4_K's mins apart (stream.mins_apart)."""
    return any(kern.launch.get("x_sums") for kern in layer.variants["stream_gate_up_silu"][variants["stream_gate_up_silu"]])


def ran_variant(layer, variant: str) -> str:
    """The stream variant whose kernels did the last call's work: `variant`, or the part of a mixed one whose block
    size align chose (its plan)."""
    parts = stream_family.variant_parts(variant)
    sizes = stream_family.variant_block_sizes(layer.spec)
    (ran,) = [v for v in parts if sizes[v] == int(layer.plan[1])]
    return ran


def a_rows_by_pair(layer, num_pairs: int):
    """The row of the layer's a_sorted that holds each pair's a after an aligned path (align's plan:
    a slot's row is its block's block_a_row plus its place in the block)."""
    num_padded, bs = (int(v) for v in cp.asnumpy(layer.plan))
    pairs = layer.sorted_ids[:num_padded]
    slot = cp.arange(num_padded, dtype=cp.int32)
    real = pairs < num_pairs
    rows = cp.full(num_pairs, -1, dtype=cp.int32)
    rows[pairs[real]] = (layer.block_a_row[slot // bs] + slot % bs)[real]
    assert not bool((rows < 0).any()), "a pair with no slot"
    return rows


@pytest.mark.parametrize("T", sorted({*TOKEN_COUNTS, route_align_family.MAX_TOKENS,
                                        route_align_family.MAX_TOKENS + 1}))
def test_align_plan_invariants(case: Case, T: int, rng) -> None:
    """align's plan (and the routing before it) on the device: up to route_align's max_tokens one launch makes
    both, above it the router then align."""
    spec = case.spec
    x, logits = case.inputs(T, rng)
    one_launch = "route_align" in case.layer.selected_kernels(T, "prefill")
    assert one_launch == (T <= route_align_family.MAX_TOKENS)
    case.layer.sorted_ids.fill(-7)
    case.layer.block_a_row.fill(-7)
    case.run(x, logits, "prefill")
    k, P = spec.top_k, T * spec.top_k
    ids = cp.asnumpy(case.layer.ids[:P]).reshape(T, k)
    ref_ids, ref_w = reference.route(cp.asnumpy(logits), k, spec.norm_topk_prob)
    np.testing.assert_array_equal(ids, ref_ids)
    got_w = cp.asnumpy(case.layer.weights[:P]).reshape(T, k)
    assert np.linalg.norm(got_w - ref_w) / np.linalg.norm(ref_w) <= 1e-5
    num_padded, bs = (int(v) for v in cp.asnumpy(case.layer.plan))
    counts = reference.expert_counts(ids, spec.num_experts)
    assert bs == reference.pick_block_size(counts, spec.prefill.block_sizes, spec.prefill.padding_budget)
    want = reference.align(ids, spec.num_experts, bs)
    assert num_padded == want.num_padded
    sorted_ids = cp.asnumpy(case.layer.sorted_ids[:num_padded])
    block_expert = cp.asnumpy(case.layer.block_expert[: num_padded // bs])
    np.testing.assert_array_equal(block_expert, want.block_expert)
    # the same pairs in every block (order inside a segment is free), sentinel elsewhere
    for b in range(num_padded // bs):
        got = np.sort(sorted_ids[b * bs:(b + 1) * bs])
        exp = np.sort(want.sorted_ids[b * bs:(b + 1) * bs])
        if b == 0 or block_expert[b] != block_expert[b - 1]:
            seg_end = b * bs + (np.searchsorted(block_expert, block_expert[b], side="right") - b) * bs
            got = np.sort(sorted_ids[b * bs:seg_end])
            exp = np.sort(want.sorted_ids[b * bs:seg_end])
            np.testing.assert_array_equal(got, exp)
    # a's rows by block: the real slots in order, no padding (they depend on the counts alone)
    np.testing.assert_array_equal(cp.asnumpy(case.layer.block_a_row[: num_padded // bs]), want.block_a_row)
    np.testing.assert_array_equal(np.sort(cp.asnumpy(a_rows_by_pair(case.layer, P))), np.arange(P))


@pytest.mark.parametrize("T", TOKEN_COUNTS)
def test_decode_kernels_match_reference(case: Case, T: int, rng) -> None:
    if T * case.spec.top_k > 65535:
        pytest.skip("beyond the decode grid")
    P = T * case.spec.top_k
    tol = DEQUANT_TOL if case.spec.activation_dtype is ActivationDtype.F32 else LAYER_TOL[case.spec.activation_dtype]
    for variants in variant_sets(case.layer, "decode"):
        x, logits = case.inputs(T, rng)
        out = case.run(x, logits, "decode", variants)
        ref_out, ref_a, _, _, _ = case.reference(x, logits)
        # gate+up+SiLU computes in float32 from exactly dequantized weights: the dequant bound applies
        assert rel_err(case.layer.a_decode[:P], ref_a) <= DEQUANT_TOL, variants
        assert rel_err(from_act(out, case.spec.activation_dtype), ref_out) <= tol, variants


@pytest.mark.parametrize("T", TOKEN_COUNTS)
def test_prefill_kernels_match_reference(case: Case, T: int, rng) -> None:
    spec = case.spec
    tol = LAYER_TOL[spec.activation_dtype]
    P = T * spec.top_k
    mma = mma_dtype(spec)
    for variants in variant_sets(case.layer, "prefill"):
        x, logits = case.inputs(T, rng)
        out = case.run(x, logits, "prefill", variants)
        ref_out, ref_a, ref_y, _, _ = case.reference(x, logits)
        assert rel_err(from_act(case.layer.a_sorted[a_rows_by_pair(case.layer, P)], mma), ref_a) <= tol, variants
        assert rel_err(from_act(case.layer.y_pairs[:P], spec.activation_dtype), ref_y) <= tol, variants
        assert rel_err(from_act(out, spec.activation_dtype), ref_out) <= tol, variants


def path_or_skip(case: Case, path: str) -> None:
    if not tuning.path_available(path, case.layer.variants):
        pytest.skip(f"spec {case.spec.name} has no {path} kernels "
                    "(gate and up differ in quant type, or f32 activations)")


def grouped_or_skip(case: Case) -> None:
    path_or_skip(case, "grouped")


def one_expert_logits(case: Case, T: int):
    """Router logits that send every token to the same top-k experts (the most tokens per expert)."""
    logits = cp.zeros((T, case.spec.num_experts), dtype=cp.float32)
    logits[:, : case.spec.top_k] = cp.arange(case.spec.top_k, 0, -1, dtype=cp.float32)
    return logits


def routed_inputs(case: Case, T: int, rng):
    """(routing, x, logits) under normal routing and with every token on the same experts."""
    for routing in ("normal", "one expert"):
        x, logits = case.inputs(T, rng)
        yield routing, x, one_expert_logits(case, T) if routing == "one expert" else logits


@pytest.mark.parametrize("T", GROUPED_TOKEN_COUNTS)
def test_grouped_kernels_match_reference(case: Case, T: int, rng) -> None:
    grouped_or_skip(case)
    spec = case.spec
    tol = LAYER_TOL[spec.activation_dtype]
    P = T * spec.top_k
    mma = mma_dtype(spec)
    for variants in variant_sets(case.layer, "grouped", T):
        for routing, x, logits in routed_inputs(case, T, rng):
            out = case.run(x, logits, "grouped", variants)
            ref_out, ref_a, ref_y, _, _ = case.reference(x, logits)
            where = (variants, routing)
            assert rel_err(from_act(case.layer.a_sorted[:P], mma), ref_a) <= tol, where
            assert rel_err(case.layer.y_grouped[:P], ref_y) <= tol, where
            assert rel_err(from_act(out, spec.activation_dtype), ref_out) <= tol, where
            assert not bool(case.layer.tile_counters.any()), "a row tile's counter was not reset"


F16_UNIT_ROUNDOFF = 2.0 ** -11
O1I_PAIR = {family: grouped_family.INT_DOT_VARIANT for family in tuning.PATH_FAMILIES["grouped"]}
"""The grouped path with both kernels by integer dot products (o1i)."""


@pytest.mark.parametrize("T", (1, 3, 8))
def test_grouped_gate_up_with_the_scales_after_the_mma_rounds_only_a(case: Case, T: int, rng) -> None:
    """Where the grouped gate+up applies Q4_K's scales after the mma (families/grouped.py scales_after), the
    weights are exact and a differs from the float64 reference by its rounding to f16 alone: each value by at most
    the unit roundoff, so the norm too. With the scales rounded into each weight, a erred by 5.5-7e-4, above it
    (docs/perf-notes.md, fifty-fifth session)."""
    grouped_or_skip(case)
    if not grouped_family.scales_after(case.spec, gate_up=True):
        pytest.skip(f"spec {case.spec.name}: its grouped gate+up keeps the scales in each weight")
    P = T * case.spec.top_k
    for variants in variant_sets(case.layer, "grouped", T):
        for routing, x, logits in routed_inputs(case, T, rng):
            case.run(x, logits, "grouped", variants, stop_after="gate_up_silu")
            _, ref_a, _, _, _ = case.reference(x, logits)
            err = rel_err(from_act(case.layer.a_sorted[:P], ActivationDtype.F16), ref_a)
            assert err <= 1.01 * F16_UNIT_ROUNDOFF, (variants, routing, err)


@pytest.mark.parametrize("T", (1, 3, 8))
def test_the_routing_gate_up_variant_routes_as_the_router_does(case: Case, T: int, rng) -> None:
    """r8 routes inside gate+up (no router launch): the same ids and weights, bit for bit, so the
    same output; a token with a NaN logit still gets the NaN row."""
    grouped_or_skip(case)
    P = T * case.spec.top_k
    x, logits = case.inputs(T, rng)
    if T >= 3:
        logits[1, 0] = cp.nan
    routed = {}
    for variant in ("t8", "r8"):
        out = case.run(x, logits, "grouped", {"grouped_gate_up_silu": variant})
        routed[variant] = (case.layer.ids[:P].copy(), case.layer.weights[:P].view(cp.uint32).copy(),
                           out.view(cp.uint16).copy())  # bits: NaN rows compare equal
    for before, after in zip(routed["t8"], routed["r8"]):
        assert bool((before == after).all())
    for variant, routes in (("t8", False), ("r8", True)):
        choice = case.layer.choose(T, "grouped", {"grouped_gate_up_silu": variant})
        assert case.layer.routes_in_gate_up(choice) is routes


def test_the_routing_variant_serves_only_its_token_count(case: Case, rng) -> None:
    grouped_or_skip(case)
    x, logits = case.inputs(9, rng)
    with pytest.raises(ValueError, match="serves at most 8 tokens, not 9"):
        case.layer.forward(x, logits, path="grouped", variants={"grouped_gate_up_silu": "r8"})
    assert case.layer.choose(9, "grouped").variants["grouped_gate_up_silu"] != "r8"


@pytest.mark.parametrize("T", (2, 3, 16))
def test_o1i_down_after_o1i_gate_up_waits_for_its_pairs_count_even_after_a_cut_call(case: Case, T: int, rng) -> None:
    """o1i down after o1i gate+up, as programmatic dependents, waits for its own pair's count of gate+up's stores
    of a (pair_ready) instead of the gate+up grid: the output matches the reference and has the bits of plain
    launches (which wait for the grid), also after calls cut after gate+up, whose counts no down consumed (the
    router zeroes each call's)."""
    grouped_or_skip(case)
    variants = O1I_PAIR
    if any(case.layer.variant_refusal(f, v, T) for f, v in variants.items()):
        pytest.skip(f"{grouped_family.INT_DOT_VARIANT} does not serve {T} tokens of {case.spec.name}")
    plain = plain_launch_layer_or_skip(case, 16)
    assert case.layer.uses_pdl(case.layer.choose(T, "grouped", variants))
    dtype = case.spec.activation_dtype
    for cut_before in (0, 2):
        x, logits = case.inputs(T, rng)
        for _ in range(cut_before):
            case.layer.forward(*case.inputs(T, rng), path="grouped", variants=variants, stop_after="gate_up_silu")
        out = case.run(x, logits, "grouped", variants).copy()
        want = plain.forward(x, logits, path="grouped", variants=variants)
        cp.testing.assert_array_equal(out, want, err_msg=f"{cut_before} cut calls before")
        assert rel_err(from_act(out, dtype), case.reference(x, logits)[0]) <= LAYER_TOL[dtype]


@pytest.mark.parametrize("T", (1, 9, 33))
def test_grouped_path_is_deterministic_and_agrees_with_prefill(case: Case, T: int, rng) -> None:
    grouped_or_skip(case)
    x, logits = case.inputs(T, rng)
    dtype = case.spec.activation_dtype
    first = case.run(x, logits, "grouped").copy()
    second = case.run(x, logits, "grouped")
    cp.testing.assert_array_equal(first, second)  # the same bits: a fixed summation order
    pre = from_act(case.run(x, logits, "prefill"), dtype)
    assert rel_err(pre, from_act(first, dtype)) <= LAYER_TOL[dtype]


@pytest.mark.parametrize("T", (1, 3, 8, 9, 16, 33))
def test_every_grouped_variant_gives_the_bits_of_the_chosen_one(case: Case, T: int, rng) -> None:
    """Every grouped variant gives each of a warp's accumulators the same blocks in the same order
    and adds the warps' partial sums in the same order: t16 (two token fragments a pass), r8 (routes
    itself), t8m32/t8m64 (row tiles side by side in one CTA, sharing the token search and the
    copy of a), and the forms without a search (o1/o1m32/o1m64 at T = 1; p64 and p128 with their
    row-tile forms up to 64 and 128 pairs) give the chosen variants' a, y and output bit for bit;
    and the row tiles' counters are back at zero. The integer-dot variant (o1i) has arithmetic of
    its own: the mma variants are compared with the default in its place, and it with the reference
    (test_grouped_kernels_match_reference)."""
    grouped_or_skip(case)
    P = T * case.spec.top_k
    layer = case.layer

    def integer_dot(family: str, variant: str) -> bool:
        return bool(layer.variants[family][variant][0].launch.get("integer_dot"))

    chosen = {f: (layer._default_variants[f] if integer_dot(f, v) else v)
              for f, v in layer.choose(T, "grouped").variants.items()}
    for routing, x, logits in routed_inputs(case, T, rng):
        want = case.run(x, logits, "grouped", chosen).copy()
        want_a, want_y = layer.a_sorted[:P].copy(), layer.y_grouped[:P].copy()
        for family, variants in layer.variants.items():
            if family not in chosen:
                continue
            for variant in variants:
                if (variant == chosen[family] or integer_dot(family, variant)
                        or layer.variant_refusal(family, variant, T) is not None):
                    continue
                where = f"{family}={variant} {routing}"
                got = case.run(x, logits, "grouped", {**chosen, family: variant})
                cp.testing.assert_array_equal(got, want, err_msg=where)
                cp.testing.assert_array_equal(layer.a_sorted[:P], want_a, err_msg=where)
                cp.testing.assert_array_equal(layer.y_grouped[:P], want_y, err_msg=where)
                assert not bool(layer.tile_counters.any()), f"{where}: a row tile's counter was not reset"


@pytest.mark.parametrize("T", (2, 9, 16))
def test_the_integer_dot_variant_gives_each_token_the_bits_it_gets_alone(case: Case, T: int, rng) -> None:
    """o1i takes a CTA a pair, so a token's output does not depend on the call's other tokens: the
    same bits as that token alone, under normal routing and with every token on the same experts
    (where the pairs of one expert each read its rows, and each row tile's combine waits for all)."""
    grouped_or_skip(case)
    variants = O1I_PAIR
    for routing, x, logits in routed_inputs(case, T, rng):
        together = case.run(x, logits, "grouped", variants).copy()
        for t in range(T):
            alone = case.run(x[t:t + 1], logits[t:t + 1], "grouped", variants)
            cp.testing.assert_array_equal(alone[0], together[t], err_msg=f"token {t} of {T}, {routing}")
        assert not bool(case.layer.tile_counters.any()), "a row tile's counter was not reset"


@pytest.mark.parametrize("T", STREAM_TOKEN_COUNTS)
def test_stream_kernels_match_reference(case: Case, T: int, rng) -> None:
    """Every stream variant (block size) against the reference: a and y in sorted order and the
    output, under normal routing and with every token on the same experts (one block per 64 pairs
    of an expert, the padding in the last)."""
    path_or_skip(case, "stream")
    spec = case.spec
    tol = LAYER_TOL[spec.activation_dtype]
    P = T * spec.top_k
    for variants in variant_sets(case.layer, "stream"):
        for routing, x, logits in routed_inputs(case, T, rng):
            out = case.run(x, logits, "stream", variants)
            ref_out, ref_a, ref_y, _, _ = case.reference(x, logits)
            where = (variants, routing)
            ran = ran_variant(case.layer, variants["stream_down"])
            a = case.layer.a_sorted[a_rows_by_pair(case.layer, P)]
            stored = stream_family.a_columns(spec, ran)
            if stored is not None:  # the wgmma variants keep a's columns in their down kernel's k-step order
                a = a[:, cp.asarray(stored)]
            assert rel_err(from_act(a, spec.activation_dtype), ref_a) <= tol, where
            y_rows = cp.arange(P)
            if stream_family.y_by_row(spec, ran):  # y in x_sorted's buffer, by a's row
                y_rows = a_rows_by_pair(case.layer, P)
                cp.testing.assert_array_equal(case.layer.pair_row[:P], y_rows, err_msg=f"{where}: pair_row")
            assert rel_err(from_act(case.layer.y_pairs[y_rows], spec.activation_dtype), ref_y) <= tol, where
            assert rel_err(from_act(out, spec.activation_dtype), ref_out) <= tol, where
            assert not bool(case.layer.tile_claims.any()), f"{where}: a tile claim count was not reset"
            blocks = int(case.layer.plan[0]) // int(case.layer.plan[1])  # every row of a counted, once
            cp.testing.assert_array_equal(case.layer.block_ready[:blocks], spec.intermediate_size,
                                          err_msg=f"{where}: block_ready")
            x_stored = stream_family.x_columns(spec)
            if x_stored is not None and ran.startswith("w"):  # gather_x: exact copies
                case.run(x, logits, "stream", variants, stop_after="gate_up_silu")  # before down overwrites them
                rows = case.layer.x_sorted[a_rows_by_pair(case.layer, P)][:, cp.asarray(x_stored)]
                assert bool((rows == x[cp.arange(P) // spec.top_k]).all()), f"{where}: x_sorted"


@pytest.mark.parametrize("T", (130, 1000))
def test_stream_kernels_give_the_full_grids_bits_on_a_smaller_grid(case: Case, T: int, rng) -> None:
    """On a grid of fewer CTAs each CTA runs more tiles: the wgmma kernels claim theirs at run time
    (so which CTA runs a tile changes from call to call), the others take them round robin. A tile's
    sums keep their order whichever CTA runs it, so a and the output have the full grid's bits, and
    the claim counts are left at zero for the next call."""
    path_or_skip(case, "stream")
    layer, k = case.layer, T * case.spec.top_k
    x, logits = case.inputs(T, rng)
    for variants in variant_sets(layer, "stream"):
        kerns = [kern for fam, var in variants.items() for kern in layer.variants[fam][var]]
        full = case.run(x, logits, "stream", variants).copy()
        full_a = layer.a_sorted[a_rows_by_pair(layer, k)].copy()
        with small_grid(layer, kerns):
            small = case.run(x, logits, "stream", variants)
        cp.testing.assert_array_equal(small, full, err_msg=f"{variants}: output")
        cp.testing.assert_array_equal(layer.a_sorted[a_rows_by_pair(layer, k)], full_a, err_msg=f"{variants}: a")
        assert not bool(layer.tile_claims.any()), f"{variants}: a tile claim count was not reset"


@pytest.mark.parametrize("T", (33, 513))
def test_stream_path_is_deterministic_and_every_block_size_gives_the_same_bits(case: Case, T: int, rng) -> None:
    """Each output of a stream kernel is one warp's sum over k in a fixed order, whatever else its
    tile holds: within a form (b<size>: mma.sync, with Q4_K's mins apart or in each weight; w<size>:
    wgmma, whose k order differs) every block size gives the same bits, run after run; and each form
    agrees with prefill."""
    path_or_skip(case, "stream")
    dtype = case.spec.activation_dtype
    x, logits = case.inputs(T, rng)
    by_form: dict[tuple[str, bool], list] = {}
    for variants in variant_sets(case.layer, "stream"):
        first = case.run(x, logits, "stream", variants).copy()
        ran = ran_variant(case.layer, variants["stream_down"])
        outs = by_form.setdefault((ran[0], mins_apart(case.layer, {f: ran for f in variants})), [])
        outs.append(first)
        outs.append(case.run(x, logits, "stream", variants).copy())
    pre = from_act(case.run(x, logits, "prefill"), dtype)
    for outs in by_form.values():
        for other in outs[1:]:
            cp.testing.assert_array_equal(other, outs[0])
        assert rel_err(pre, from_act(outs[0], dtype)) <= LAYER_TOL[dtype]


@pytest.mark.parametrize("T", (33, 300, 513))
def test_a_mixed_stream_variant_runs_the_block_size_its_rule_picks_with_that_variants_bits(case: Case, T: int,
                                                                                          rng) -> None:
    """A mixed variant (stream.MIXED_PAIRS) launches both block sizes' kernels and align picks one a call by the
    pair's rule (reference.pick_block_size): under normal routing and with every token on the same experts, its
    plan is the rule's, and its output and a are bit for bit those of the picked variant alone; the other
    size's kernels leave nothing behind (claim counts at zero)."""
    path_or_skip(case, "stream")
    mixed = {name: pair for name, pair in stream_family.mixed_variants(case.spec).items()
             if name in case.layer.variants["stream_down"]}
    if not mixed:
        pytest.skip(f"{case.spec.name}: no mixed stream variant on this card")
    P = T * case.spec.top_k
    for name, (small, large, cost) in mixed.items():
        for routing, x, logits in routed_inputs(case, T, rng):
            where = (name, routing)
            out = case.run(x, logits, "stream", {f: name for f in tuning.PATH_FAMILIES["stream"]}).copy()
            counts = reference.expert_counts(cp.asnumpy(case.layer.ids[:P]).reshape(T, -1), case.spec.num_experts)
            sizes = stream_family.variant_block_sizes(case.spec)
            want_bs = reference.pick_block_size(counts, (), 0.0, None, (sizes[small], sizes[large], round(cost * 8)))
            assert int(case.layer.plan[1]) == want_bs, where
            ran = ran_variant(case.layer, name)
            a = case.layer.a_sorted[a_rows_by_pair(case.layer, P)].copy()
            assert not bool(case.layer.tile_claims.any()), f"{where}: a tile claim count was not reset"
            alone = case.run(x, logits, "stream", {f: ran for f in tuning.PATH_FAMILIES["stream"]})
            cp.testing.assert_array_equal(out, alone, err_msg=f"{where}: output against {ran} alone")
            cp.testing.assert_array_equal(a, case.layer.a_sorted[a_rows_by_pair(case.layer, P)],
                                          err_msg=f"{where}: a against {ran} alone")


def test_stream_path_with_host_routing_matches_device_routing(case: Case, rng) -> None:
    """With the plan made on the host, align's block size is still the stream variant's."""
    from ferrum_gen.runtime import MoeLayer

    path_or_skip(case, "stream")
    T = 513
    x, logits = case.inputs(T, rng)
    dtype = case.spec.activation_dtype
    host = MoeLayer(case.bundle, case.raw["gate"], case.raw["up"], case.raw["down"], 1024,
                    settings=Settings.from_env({"FERRUM_MOE_HOST_ROUTE": "1"}))
    for variants in variant_sets(case.layer, "stream"):
        device_out = from_act(case.run(x, logits, "stream", variants), dtype)
        host_out = from_act(host.forward(x, logits, path="stream", variants=variants), dtype)
        assert int(host.plan[1]) == int(case.layer.plan[1])
        assert rel_err(host_out, device_out) <= LAYER_TOL[dtype], variants


def test_dependent_launches_are_used_on_hopper_and_give_the_bits_of_plain_launches(case: Case, rng) -> None:
    """On sm_90+ with cuda-bindings the grouped path launches gate+up and down as programmatic
    dependents (the down kernel starts while gate+up ends): the output, a and y are bit for bit
    those of plain launches (FERRUM_MOE_PDL=0), in eager calls and in a replayed CUDA graph."""
    grouped_or_skip(case)
    plain = plain_launch_layer_or_skip(case, 64)
    assert case.layer.pdl_off_reason is None and plain.pdl_off_reason == "FERRUM_MOE_PDL=0"
    for T in (1, 3, 9, 33, 64):
        for variants in variant_sets(case.layer, "grouped", T):
            x, logits = case.inputs(T, rng)
            P = T * case.spec.top_k
            choice = case.layer.choose(T, "grouped", variants)
            assert case.layer.uses_pdl(choice) is not case.layer.routes_in_gate_up(choice)
            assert not plain.uses_pdl(choice)
            got = case.run(x, logits, "grouped", variants)
            want = plain.forward(x, logits, path="grouped", variants=variants)
            cp.cuda.get_current_stream().synchronize()
            where = (T, variants)
            cp.testing.assert_array_equal(got, want, err_msg=str(where))
            cp.testing.assert_array_equal(case.layer.a_sorted[:P], plain.a_sorted[:P], err_msg=str(where))
            cp.testing.assert_array_equal(case.layer.y_grouped[:P], plain.y_grouped[:P], err_msg=str(where))
    assert_graph_replays_match(case, plain, 9, "grouped", rng)


def plain_launch_layer_or_skip(case: Case, max_tokens: int):
    """case's layer again with plain launches (FERRUM_MOE_PDL=0), to compare with; skips where
    programmatic dependent launch is not available (case.layer then launches plainly too)."""
    from ferrum_gen.launch import pdl_unavailable
    from ferrum_gen.runtime import MoeLayer

    reason = pdl_unavailable(case.bundle.arch)
    assert case.layer.pdl_off_reason == reason
    if reason is not None:
        pytest.skip(f"no programmatic dependent launch here: {reason}")
    return MoeLayer(case.bundle, case.raw["gate"], case.raw["up"], case.raw["down"], max_tokens,
                    settings=Settings.from_env({"FERRUM_MOE_PDL": "0"}))


def assert_graph_replays_match(case: Case, plain, T: int, path: str, rng) -> None:
    """A captured graph of case.layer's call keeps the programmatic edges: its replays on new inputs
    give the bits of `plain`'s eager calls."""
    x, logits = case.inputs(T, rng)
    out = cp.empty((T, case.spec.hidden_size), dtype=x.dtype)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        case.layer.forward(x, logits, out=out, path=path)
        stream.begin_capture()
        case.layer.forward(x, logits, out=out, path=path)
        graph = stream.end_capture()
    assert case.layer.uses_pdl(case.layer.choose(T, path))
    for _ in range(3):
        x2, logits2 = case.inputs(T, rng)
        x[...] = x2
        logits[...] = logits2
        poison(out)
        cp.cuda.get_current_stream().synchronize()  # the writes above are on another stream
        graph.launch(stream)
        stream.synchronize()
        cp.testing.assert_array_equal(out, plain.forward(x, logits, path=path), err_msg=f"{path}, T = {T}")


def test_the_stream_path_with_dependent_launches_gives_the_bits_of_plain_launches(case: Case, rng) -> None:
    """On sm_90+ with cuda-bindings the stream path launches align, gate+up, down and (below
    runtime.COMBINE_PLAIN_FROM tokens) combine as programmatic dependents (down's first weights are
    copied while gate+up ends): the output is bit for bit that of plain launches (FERRUM_MOE_PDL=0)
    for every variant, one align CTA or several, in eager calls and in replayed CUDA graphs. (a and y
    in sorted order are not compared: align's order within an expert follows atomics.)"""
    from ferrum_gen.families.align import PAIRS_PER_CTA

    path_or_skip(case, "stream")
    several_ctas = PAIRS_PER_CTA // case.spec.top_k + 1  # more pairs than one align CTA places: align_count first
    counts = (7, 33, several_ctas)
    plain = plain_launch_layer_or_skip(case, several_ctas)
    for T in counts:
        for variants in variant_sets(case.layer, "stream", T):
            x, logits = case.inputs(T, rng)
            choice = case.layer.choose(T, "stream", variants)
            assert case.layer.uses_pdl(choice)
            assert not plain.uses_pdl(choice)
            got = case.run(x, logits, "stream", variants)
            want = plain.forward(x, logits, path="stream", variants=variants)
            cp.cuda.get_current_stream().synchronize()
            cp.testing.assert_array_equal(got, want, err_msg=str((T, variants)))
    for T in (9, several_ctas):
        assert_graph_replays_match(case, plain, T, "stream", rng)


def test_the_stream_path_launches_the_combine_plainly_from_its_edge(case: Case, monkeypatch) -> None:
    """With PDL in use the stream path launches every kernel after the router as a programmatic dependent,
    except the combine from runtime.COMBINE_PLAIN_FROM tokens on, which waits for down's end as a plain launch."""
    from ferrum_gen.runtime import COMBINE_PLAIN_FROM

    path_or_skip(case, "stream")
    layer = case.layer
    if not layer.uses_pdl(layer.choose(COMBINE_PLAIN_FROM, "stream")):
        pytest.skip(f"no programmatic dependent launch here: {layer.pdl_status}")
    launched: list[tuple[str, bool]] = []
    real_launch = layer._launch

    def recording_launch(kern, grid, stream, smem=0, dependent=False, **args):
        launched.append((kern.uri, dependent))
        return real_launch(kern, grid, stream, smem, dependent, **args)

    monkeypatch.setattr(layer, "_launch", recording_launch)
    for T in (COMBINE_PLAIN_FROM - 1, COMBINE_PLAIN_FROM):
        launched.clear()
        x, logits = case.inputs(T, np.random.default_rng(T))
        case.run(x, logits, "stream")
        combine = [dep for uri, dep in launched if uri == layer.k_combine.uri]
        others = [(uri, dep) for uri, dep in launched if uri != layer.k_combine.uri]
        assert combine == [T < COMBINE_PLAIN_FROM], (T, launched)
        assert all(dep for _, dep in others), (T, launched)


LATE_COPY = r"""
extern "C" __global__ void late_copy(const unsigned char* x_src, unsigned char* x, long long x_bytes,
                                     const unsigned char* l_src, unsigned char* l, long long l_bytes, long long spin) {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
  const long long t0 = clock64();
  while (clock64() - t0 < spin) {}
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = blockIdx.x * blockDim.x + threadIdx.x; i < x_bytes; i += step) x[i] = x_src[i];
  for (long long i = blockIdx.x * blockDim.x + threadIdx.x; i < l_bytes; i += step) l[i] = l_src[i];
}
"""
"""A kernel that lets its programmatic dependents start at once and writes a call's inputs only
after a spin of ~50 us: a dependent that read them before its fg::grid_wait would see poison."""


@pytest.mark.parametrize("path", ("grouped", "fused", "stream"))
def test_calls_launched_as_dependents_wait_for_the_kernels_before_them(case: Case, path: str, rng) -> None:
    """With PDL a call's first kernel (the router, or the fused kernel) is a programmatic dependent
    of the kernel before it in the stream, and the call's last kernel lets the next launch start early.
    A kernel that triggers at once and writes x and the logits late precedes the first of two calls
    back to back (the second overwrites the routing and scratch that the first's last kernel reads).
    Both outputs have the bits of plain launches, eagerly and replayed from a captured graph. The
    grouped path runs its chosen variants and the o1i pair, whose down waits for its pair's count rather
    than for the gate+up grid (grouped.PAIR_READY)."""
    path_or_skip(case, path)
    plain = plain_launch_layer_or_skip(case, 16)
    late_copy = cp.RawKernel(LATE_COPY, "late_copy")
    T = {"fused": 1, "grouped": 3, "stream": 9}[path]
    (x_src, l_src), (x2, l2) = case.inputs(T, rng), case.inputs(T, rng)
    x, logits = cp.empty_like(x_src), cp.empty_like(l_src)
    outs = [cp.empty((T, case.spec.hidden_size), dtype=x.dtype) for _ in range(2)]

    def calls(layer, variants) -> None:
        for buf in (x, logits, *outs):
            poison(buf)
        late_copy((8,), (256,), (x_src, x, cp.int64(x.nbytes), l_src, logits, cp.int64(logits.nbytes),
                                 cp.int64(100_000)))
        layer.forward(x, logits, out=outs[0], path=path, variants=variants)
        layer.forward(x2, l2, out=outs[1], path=path, variants=variants)

    choices = [None] + ([O1I_PAIR] if path == "grouped" and all(
        v in case.layer.variants[f] for f, v in O1I_PAIR.items()) else [])
    for variants in choices:
        assert (case.layer.uses_pdl(case.layer.choose(T, path, variants))
                and not plain.uses_pdl(plain.choose(T, path, variants)))
        cp.cuda.Device().synchronize()  # the inputs were written on the default stream
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            calls(plain, variants)
            want = [o.copy() for o in outs]
            calls(case.layer, variants)
            got = [o.copy() for o in outs]
            stream.begin_capture()
            calls(case.layer, variants)
            graph = stream.end_capture()
            for buf in (x, logits, *outs):
                poison(buf)
            graph.launch(stream)
            replayed = [o.copy() for o in outs]
        stream.synchronize()
        for i, w in enumerate(want):
            where = f"{path}, {variants}, T = {T}, call {i}"
            assert not bool(cp.isnan(from_act(w, case.spec.activation_dtype)).any()), f"{where}: plain gave NaN"
            cp.testing.assert_array_equal(got[i], w, err_msg=f"{where}, eager")
            cp.testing.assert_array_equal(replayed[i], w, err_msg=f"{where}, graph replay")


def test_the_layer_allocates_the_scratch_scratch_shapes_lists_and_its_repr_states_it(case: Case) -> None:
    from ferrum_gen.runtime import block_size_cap, decode_token_cap, scratch_shapes, shapes_bytes

    layer = case.layer
    shapes = scratch_shapes(case.spec, layer.max_tokens, decode_token_cap(case.spec, layer.tuning, layer.max_tokens),
                            block_size_cap(case.spec, layer.tuning, layer.max_tokens))
    grown = ("a_decode", "y_grouped", "sorted_ids", "block_expert", "block_ready", "block_a_row", "a_sorted")
    for name, (shape, dtype) in shapes.items():
        buf = getattr(layer, name)
        assert buf.dtype == np.dtype(dtype), name
        if name in grown:  # grow once where a test forced their path (or a larger block size) beyond them
            assert buf.shape[0] >= shape[0] and buf.shape[1:] == shape[1:], name
        else:
            assert buf.shape == shape, name
    assert layer.scratch_bytes >= shapes_bytes(shapes)
    text = repr(layer)
    assert f"spec={case.spec.name}" in text and f"max_tokens={layer.max_tokens}" in text
    assert f"scratch={layer.scratch_bytes / 2**20:.1f} MiB" in text and f"weights={layer.weight_bytes / 2**20:.1f} MiB" in text


def test_every_variant_of_the_bundle_is_exercised(case: Case) -> None:
    """variant_sets covers each usable variant; on sm_90 every variant of the shipped specs is usable."""
    for path in [p for p in tuning.PATHS if tuning.path_available(p, case.layer.variants)]:
        sets = variant_sets(case.layer, path)
        for family in case.layer.variants:
            if family in sets[0]:
                assert {s[family] for s in sets} == set(case.layer.variants[family])
    if case.bundle.arch == "sm_90":
        manifest_variants = {(e["family"], e["variant"]) for e in case.bundle.manifest["kernels"]}
        usable = {(f, v) for f, vs in case.layer.variants.items() for v in vs}
        assert usable == {fv for fv in manifest_variants if fv[0] in case.layer.variants}


# --- the fused path (one or two tokens, one launch) ---------------------------------------------

FUSED_TOKEN_COUNTS = (1, 2)


def fused_or_skip(case: Case, T: int) -> None:
    from ferrum_gen.families import fused_moe

    path_or_skip(case, "fused")
    if T > fused_moe.max_tokens(case.spec):
        pytest.skip(f"spec {case.spec.name}'s fused rings for {T} tokens do not fit sm_90's shared memory")


@pytest.mark.parametrize("T", FUSED_TOKEN_COUNTS)
def test_fused_kernels_match_reference(case: Case, T: int, rng) -> None:
    """Every fused variant for T tokens against the reference: a, the output, the routing it hands
    back, and the arrival counters left at zero for the next launch; normal routing, and every token
    on the same experts (two tokens: each expert's blocks read for both)."""
    fused_or_skip(case, T)
    spec = case.spec
    tol = LAYER_TOL[spec.activation_dtype]
    k = T * spec.top_k
    mma = mma_dtype(spec)
    for variants in variant_sets(case.layer, "fused", T):
        for routing, x, logits in routed_inputs(case, T, rng):
            out = case.run(x, logits, "fused", variants)
            ref_out, ref_a, _, ids, w = case.reference(x, logits)
            where = (variants, routing)
            np.testing.assert_array_equal(cp.asnumpy(case.layer.ids[:k]), ids.reshape(-1))
            assert np.linalg.norm(cp.asnumpy(case.layer.weights[:k]) - w.reshape(-1)) <= 1e-5 * np.linalg.norm(w)
            assert rel_err(from_act(case.layer.a_sorted[:k], mma), ref_a) <= tol, where
            assert rel_err(from_act(out, spec.activation_dtype), ref_out) <= tol, where
            assert not bool(case.layer.fused_sync.any()), "the arrival counters were not reset"


@pytest.mark.parametrize("T", FUSED_TOKEN_COUNTS)
def test_fused_path_is_deterministic_and_agrees_with_grouped(case: Case, T: int, rng) -> None:
    fused_or_skip(case, T)
    dtype = case.spec.activation_dtype
    x, logits = case.inputs(T, rng)
    for variants in variant_sets(case.layer, "fused", T):
        first = case.run(x, logits, "fused", variants).copy()
        second = case.run(x, logits, "fused", variants)
        cp.testing.assert_array_equal(first, second)  # the same bits: fixed orders throughout
        grouped = from_act(case.run(x, logits, "grouped"), dtype)
        assert rel_err(from_act(first, dtype), grouped) <= LAYER_TOL[dtype], variants


@pytest.mark.parametrize("T", FUSED_TOKEN_COUNTS)
def test_fused_kernels_give_the_full_grids_bits_on_a_smaller_grid(case: Case, T: int, rng) -> None:
    """On a grid of fewer CTAs (a card with fewer SMs) each CTA takes more units of both kinds, so the
    rings wrap where they held a CTA's share and wrap more where they did not. Every sum keeps its
    order whichever CTA makes it, so a and the output have the full grid's bits, and the arrival
    counters are left at zero."""
    fused_or_skip(case, T)
    layer, k = case.layer, T * case.spec.top_k
    x, logits = case.inputs(T, rng)
    for variants in variant_sets(layer, "fused", T):
        (kern,) = layer.variants["fused_moe"][variants["fused_moe"]]
        full = case.run(x, logits, "fused", variants).copy()
        full_a = layer.a_sorted[:k].copy()
        with small_grid(layer, [kern]):
            small = case.run(x, logits, "fused", variants)
        cp.testing.assert_array_equal(small, full, err_msg=f"{variants}: output")
        cp.testing.assert_array_equal(layer.a_sorted[:k], full_a, err_msg=f"{variants}: a")
        assert not bool(layer.fused_sync.any()), "the arrival counters were not reset"


def test_fused_path_serves_its_token_counts_with_device_routing(case: Case, rng) -> None:
    """More tokens than its kernels serve, or routing on the host, are refused by name when the fused
    path is forced, and 'auto' never picks it for them; a forced one-token variant takes its copy
    form's kernel for two tokens (where the spec has them); a NaN logit gives that token's NaN row."""
    from ferrum_gen.families import fused_moe
    from ferrum_gen.runtime import MoeLayer

    path_or_skip(case, "fused")
    most = fused_moe.max_tokens(case.spec)
    x, logits = case.inputs(most + 1, rng)
    with pytest.raises(ValueError, match=f"serve .*tokens, not {most + 1}"):
        case.layer.forward(x, logits, path="fused")
    assert case.layer.choose(most + 1).path != "fused"
    with pytest.raises(ValueError, match=f"serves exactly 1 token, not {most + 1}"):
        case.layer.forward(x, logits, path="fused", variants={"fused_moe": "f1b"})
    if most >= 2:
        (served,) = case.layer.choose(2, "fused").variants.values()
        assert case.layer.variant_refusal("fused_moe", served, 2) is None
        assert case.layer._fused_variant("f1b", 2) == case.layer._fused_variant("f1", 2) == "f2b"
    host = MoeLayer(case.bundle, case.raw["gate"], case.raw["up"], case.raw["down"], 4,
                    settings=Settings.from_env({"FERRUM_MOE_HOST_ROUTE": "1"}))
    for T in range(1, most + 1):
        with pytest.raises(ValueError, match="its kernel routes on the device, and FERRUM_MOE_HOST_ROUTE=1"):
            host.forward(x[:T], logits[:T], path="fused")
        assert host.choose(T).path != "fused"
    for T in range(1, most + 1):
        bad = logits[:T].copy()
        bad[T - 1, 3] = np.nan
        out = from_act(case.run(x[:T], bad, "fused"), case.spec.activation_dtype)
        assert bool(cp.isnan(out[T - 1]).all()) and not bool(cp.isnan(out[: T - 1]).any()), T


# --- the whole layer ----------------------------------------------------------------------------

@pytest.mark.parametrize("T", TOKEN_COUNTS)
def test_decode_and_prefill_agree(case: Case, T: int, rng) -> None:
    if T * case.spec.top_k > 65535:
        pytest.skip("beyond the decode grid")
    x, logits = case.inputs(T, rng)
    dtype = case.spec.activation_dtype
    dec = from_act(case.run(x, logits, "decode"), dtype)
    pre = from_act(case.run(x, logits, "prefill"), dtype)
    assert rel_err(pre, dec) <= LAYER_TOL[dtype]


@pytest.mark.parametrize("T", (1, 33, 513))
def test_host_routing_matches_device_routing(case: Case, T: int, rng) -> None:
    from ferrum_gen.runtime import MoeLayer

    x, logits = case.inputs(T, rng)
    dtype = case.spec.activation_dtype
    path = case.layer.choose_path(T)
    device_out = from_act(case.run(x, logits, path), dtype)
    device_ids = cp.asnumpy(case.layer.ids[: T * case.spec.top_k])
    host = MoeLayer(case.bundle, case.raw["gate"], case.raw["up"], case.raw["down"], 1024,
                    settings=Settings.from_env({"FERRUM_MOE_HOST_ROUTE": "1"}))
    # the fused path routes on the device: with routing on the host, 'auto' takes another path for T
    host_out = from_act(host.forward(x, logits, path=host.choose_path(T)), dtype)
    np.testing.assert_array_equal(cp.asnumpy(host.ids[: T * case.spec.top_k]), device_ids)
    assert rel_err(host_out, device_out) <= LAYER_TOL[dtype]


@pytest.mark.parametrize("path", ("decode", "grouped", "fused", "prefill", "stream"))
def test_path_is_graph_capturable(case: Case, path: str, rng) -> None:
    if path in ("grouped", "fused", "stream"):
        path_or_skip(case, path)
    spec = case.spec
    T = 33 if path in tuning.ALIGNED_PATHS else 1 if path == "fused" else 4
    x, logits = case.inputs(T, rng)
    out = cp.empty((T, spec.hidden_size), dtype=x.dtype)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        case.layer.forward(x, logits, out=out, path=path)  # warm up outside the capture
        stream.begin_capture()
        case.layer.forward(x, logits, out=out, path=path)
        graph = stream.end_capture()
    for _ in range(2):  # replay on fresh inputs written into the captured buffers
        x2, logits2 = case.inputs(T, rng)
        x[...] = x2
        logits[...] = logits2
        poison(out)
        graph.launch(stream)
        stream.synchronize()
        ref_out = case.reference(x, logits)[0]
        assert rel_err(from_act(out, spec.activation_dtype), ref_out) <= LAYER_TOL[spec.activation_dtype]


def test_torch_tensors_in_and_out(case: Case, rng) -> None:
    torch = pytest.importorskip("torch")
    spec = case.spec
    T = 7
    x, logits = case.inputs(T, rng)
    if spec.activation_dtype is ActivationDtype.BF16:
        xt = torch.from_dlpack(x.view(cp.int16)).view(torch.bfloat16)
    else:
        xt = torch.from_dlpack(x)
    lt = torch.from_dlpack(logits)
    out = case.layer.forward(xt, lt)
    assert isinstance(out, torch.Tensor) and out.dtype == xt.dtype and out.device == xt.device
    torch.cuda.synchronize()
    got = out.view(torch.int16) if out.dtype == torch.bfloat16 else out
    got_c = cp.from_dlpack(got)
    ref_out = case.reference(x, logits)[0]
    assert rel_err(from_act(got_c.view(cp.uint16) if spec.activation_dtype is ActivationDtype.BF16 else got_c,
                            spec.activation_dtype), ref_out) <= LAYER_TOL[spec.activation_dtype]


def test_torch_output_buffer_is_written_in_place(case: Case, rng) -> None:
    torch = pytest.importorskip("torch")
    spec = case.spec
    x, logits = case.inputs(3, rng)
    tdtype = {ActivationDtype.F32: torch.float32, ActivationDtype.F16: torch.float16,
              ActivationDtype.BF16: torch.bfloat16}[spec.activation_dtype]
    xt = torch.from_dlpack(x.view(cp.int16)).view(torch.bfloat16) if tdtype is torch.bfloat16 else torch.from_dlpack(x)
    out = torch.full((3, spec.hidden_size), float("nan"), dtype=tdtype, device=xt.device)
    got = case.layer.forward(xt, torch.from_dlpack(logits), out=out)
    torch.cuda.synchronize()
    assert got is out and not bool(torch.isnan(out).any())


def test_layer_from_a_gguf_file_matches_the_layer_from_raw_stacks(tmp_path, rng) -> None:
    from ferrum_gen.bundle import KernelBundle
    from ferrum_gen.runtime import MoeLayer
    from ferrum_gen.testing import write_moe_gguf

    spec = load_spec("tiny")
    q = spec.quant
    path = tmp_path / "tiny.gguf"
    written = write_moe_gguf(path, arch="qwen3moe", hidden_size=spec.hidden_size,
                             intermediate_size=spec.intermediate_size, num_experts=spec.num_experts,
                             top_k=spec.top_k, quant_by_layer=[(q.gate, q.up, q.down), (q.gate, q.up, q.down)],
                             rng=rng)
    bundle = KernelBundle.load(spec)
    from_file = MoeLayer.from_gguf(bundle, path, layer=1, max_tokens=64)
    raw = written[1]
    from_raw = MoeLayer(bundle, raw["gate"], raw["up"], raw["down"], max_tokens=64)
    x = cp.asarray(rng.standard_normal((9, spec.hidden_size)).astype(np.float32))
    logits = cp.asarray(rng.standard_normal((9, spec.num_experts)).astype(np.float32))
    for path_name in ("decode", "prefill"):
        a = from_file.forward(x, logits, path=path_name)
        b = from_raw.forward(x, logits, path=path_name)
        np.testing.assert_array_equal(cp.asnumpy(a), cp.asnumpy(b))


@pytest.mark.parametrize("logits_dtype", ("f16", "bf16"))
def test_half_precision_logits_route_like_their_float32_values(case: Case, logits_dtype: str, rng) -> None:
    x, logits = case.inputs(9, rng)
    if logits_dtype == "f16":
        low = logits.astype(cp.float16)
        exact = low.astype(cp.float32)
    else:
        low = to_act(logits.astype(cp.float64), ActivationDtype.BF16)
        exact = from_act(low, ActivationDtype.BF16).astype(cp.float32)
    k = case.spec.top_k
    case.layer.forward(x, exact)
    want_ids, want_w = cp.asnumpy(case.layer.ids[: 9 * k]), cp.asnumpy(case.layer.weights[: 9 * k])
    case.layer.forward(x, low)
    np.testing.assert_array_equal(cp.asnumpy(case.layer.ids[: 9 * k]), want_ids)
    np.testing.assert_array_equal(cp.asnumpy(case.layer.weights[: 9 * k]), want_w)


# --- bad input ----------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(case: Case, rng) -> None:
    spec = case.spec
    layer = case.layer
    x, logits = case.inputs(4, rng)
    with pytest.raises(ValueError, match=r"x has shape"):
        layer.forward(cp.ascontiguousarray(x[:, :-256]), logits)
    with pytest.raises(ValueError, match=r"router_logits has shape"):
        layer.forward(x, logits[:3])
    with pytest.raises(TypeError, match=r"dtype"):
        layer.forward(x.astype(cp.float64), logits)
    with pytest.raises(TypeError, match=r"host memory"):
        layer.forward(cp.asnumpy(x), logits)
    with pytest.raises(ValueError, match=r"not C-contiguous"):
        layer.forward(cp.concatenate([x, x], axis=1)[:, ::2], logits)
    big_x, big_logits = case.inputs(MAX_TOKENS + 1, rng)
    with pytest.raises(ValueError, match=r"max_tokens"):
        layer.forward(big_x, big_logits)
    with pytest.raises(ValueError, match=r"path="):
        layer.forward(x, logits, path="fast")
    empty = layer.forward(x[:0], logits[:0])
    assert empty.shape == (0, spec.hidden_size)


@pytest.mark.parametrize("path", ("decode", "grouped", "prefill", "stream"))
def test_non_finite_logits_give_nan_rows_for_those_tokens_only(case: Case, path: str, rng) -> None:
    if path in ("grouped", "stream"):
        path_or_skip(case, path)
    spec = case.spec
    T = 5
    x, logits = case.inputs(T, rng)
    logits[1, 3] = np.nan
    logits[3, :] = -np.inf
    out = from_act(case.run(x, logits, path), spec.activation_dtype)
    bad = cp.asnumpy(cp.isnan(out).all(axis=1))
    np.testing.assert_array_equal(bad, [False, True, False, True, False])
    assert not bool(cp.isnan(out[cp.asarray([0, 2, 4])]).any())
    with pytest.raises(ValueError, match=r"NaN or inf .* 2 token\(s\): 1, 3"):
        case.layer.forward(x, logits, check_finite=True)
    logits[1, 3] = -np.inf  # some -inf logits are a valid routing: no error, finite rows
    logits[3, :] = 0.0
    out = from_act(case.run(x, logits, path), spec.activation_dtype)
    case.layer.forward(x, logits, check_finite=True)
    assert not bool(cp.isnan(out).any())


def test_profile_table_lists_each_phase(case: Case, rng) -> None:
    from ferrum_gen.runtime import MoeLayer

    layer = MoeLayer(case.bundle, case.raw["gate"], case.raw["up"], case.raw["down"], 256,
                     settings=Settings.from_env({"FERRUM_MOE_PROFILE": "1"}))
    # the prefill phases are forced: a card's table may pick grouped at T = 100 (mixtral's does)
    for T, path in ((1, "auto"), (100, "prefill")):
        x, logits = case.inputs(T, rng)
        layer.forward(x, logits, path=path)
    small = layer.choose_path(1)
    table = layer.profile_table()
    for phase in (*(f"{small}/{name}" for name in layer.phases(small)), "prefill/align",
                  "prefill/gate_up_silu", "prefill/down", "prefill/combine", "prefill/total"):
        assert phase in table


# --- compile cache and prebuilt bundles (tiny spec only: they test mechanisms) --------------------

def test_cache_rebuilds_a_corrupt_entry(tmp_path, monkeypatch) -> None:
    from ferrum_gen import compile as fcompile
    from ferrum_gen.bundle import device_arch
    from ferrum_gen.render import render_spec

    spec = load_spec("tiny")
    arch = device_arch()
    cache = fcompile.KernelCache(tmp_path)
    sources = {r.kernel.uri: r.source for r in render_spec(spec)[:2]}
    first = cache.get_or_compile(sources, arch, workers=1)
    entries = sorted(tmp_path.glob("*.cubin"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # truncated: checksum fails
    calls = []
    real = fcompile.compile_cubin
    monkeypatch.setattr(fcompile, "compile_cubin", lambda *a: calls.append(a[1]) or real(*a))
    again = cache.get_or_compile(sources, arch, workers=1)
    assert again == first and len(calls) == 1


def test_prebuilt_bundle_loads_without_compiler_and_refuses_mismatches(tmp_path, monkeypatch) -> None:
    from ferrum_gen import bundle as fbundle
    from ferrum_gen import compile as fcompile

    spec = load_spec("tiny")
    arch = fbundle.device_arch()
    target = fbundle.build_bundle(spec, tmp_path, arch)
    assert (target / fbundle.BUILD_INFO).is_file()

    def no_compiler(*_a, **_k):
        raise AssertionError("a prebuilt bundle must load with no compiler")

    monkeypatch.setattr(fcompile, "compile_cubin", no_compiler)
    monkeypatch.setattr(fcompile, "compile_many", no_compiler)
    loaded = fbundle.KernelBundle.load(spec, bundle_dir=tmp_path / spec.name)
    assert set(loaded.kernels) == {e["uri"] for e in loaded.manifest["kernels"]}

    other = spec.model_copy(update={"top_k": 3})
    with pytest.raises(fbundle.BundleError, match="spec"):
        fbundle.KernelBundle.load(other, bundle_dir=tmp_path / spec.name)
    info_path = target / fbundle.BUILD_INFO
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "generator_version": "0.0.0"}))
    with pytest.raises(fbundle.BundleError, match="ferrum-gen 0.0.0"):
        fbundle.KernelBundle.load(spec, bundle_dir=tmp_path / spec.name)
    info_path.write_text(json.dumps({**info, "arch": "sm_80"}))
    with pytest.raises(fbundle.BundleError, match="built for sm_80"):
        fbundle.KernelBundle.load(spec, bundle_dir=tmp_path / spec.name)


def test_bundle_has_exactly_the_families_this_suite_exercises(case: Case) -> None:
    """The tests above launch every family listed here; a new family must get tests of its own."""
    families = {e["family"] for e in case.bundle.manifest["kernels"]}
    from ferrum_gen.families import fused_moe

    optional = {f for path in ("grouped", "stream") if tuning.path_available(path, case.layer.variants)
                for f in tuning.PATH_FAMILIES[path]}
    if fused_moe.supported(case.spec):  # in the bundle for every arch; run (and tested) on sm_90
        optional.add(fused_moe.FAMILY)
    if stream_family.sorted_x(case.spec):  # run before the wgmma gate+up kernels (test_stream_kernels_match_reference)
        optional.add("gather_x")
    assert families == {"router", "align_count", "align", "route_align", "gemv_gate_up_silu", "gemv_down_combine",
                        "gemm_gate_up_silu", "gemm_down", "combine"} | optional
