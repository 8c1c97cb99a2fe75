"""The float64 numpy reference of every stage of the MoE layer, and of the whole layer.

Every GPU kernel and the runtime are tested against these functions; see DESIGN.md,
"The computation". Shapes: x [T,H], logits [T,E], ids/weights [T,k]. Pair p = t*k + j is
token t's j-th choice; the align sentinel is T*k (the number of pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import quant
from .spec import QK_K, MoeSpec, QuantType

# --- routing ----------------------------------------------------------------


def _check_logits(logits: np.ndarray, top_k: int) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"router logits must be 2-D [T, E], got shape {logits.shape}")
    if not (np.issubdtype(logits.dtype, np.floating) or logits.dtype.name == "bfloat16"):  # ml_dtypes' bf16
        raise ValueError(f"router logits must be a float array, got dtype {logits.dtype}")
    if not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({logits.shape[1]})")
    return logits


def _select(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k expert ids by logit (descending, ties to the smaller index) and the non-finite mask.

    Selecting by logit rather than by p keeps distinct logits distinct when their
    probabilities underflow to the same value; it is what the GPU router does.
    """
    bad = np.isnan(logits).any(axis=1) | np.isposinf(logits).any(axis=1) | np.isneginf(logits).all(axis=1)
    # a stable sort of the negated logits puts equal values in ascending expert order
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :top_k].astype(np.int32)
    ids[bad] = np.arange(top_k, dtype=np.int32)
    return ids, bad


def _weights(e: np.ndarray, ids: np.ndarray, bad: np.ndarray, norm_topk_prob: bool) -> np.ndarray:
    """Routing weights from unnormalised exponentials e [T,E] (any float dtype, kept)."""
    top = np.take_along_axis(e, ids.astype(np.intp), axis=1)
    denom = top.sum(axis=1, keepdims=True) if norm_topk_prob else e.sum(axis=1, keepdims=True)
    ok = denom > 0
    w = np.where(ok, top / np.where(ok, denom, 1), e.dtype.type(1.0 / ids.shape[1]))
    w[bad] = np.nan
    return w.astype(e.dtype, copy=False)


def _exp_shifted(logits: np.ndarray, bad: np.ndarray) -> np.ndarray:
    # non-finite tokens get a harmless stand-in row so that no warning fires; their weights become NaN
    safe = np.where(bad[:, None], 0, logits)
    with np.errstate(over="ignore"):  # l - m may overflow to -inf for huge spreads; exp(-inf) = 0 is right
        return np.exp(safe - safe.max(axis=1, keepdims=True))


def route(logits: np.ndarray, top_k: int, norm_topk_prob: bool) -> tuple[np.ndarray, np.ndarray]:
    """logits [T,E] -> ids int32 [T,k], weights float64 [T,k].

    p = softmax(logits) in float64; top-k by p descending, ties to the smaller expert (selected
    by logit, which orders like p but stays exact where p underflows); norm: w = p_top / sum(p_top)
    (1/k if that sum is not > 0), else w = p_top. A token whose logits hold NaN or +inf, or are
    all -inf, gets ids 0..k-1 and NaN weights (NaN in, NaN out for that token only).
    """
    logits = _check_logits(logits, top_k).astype(np.float64)
    ids, bad = _select(logits, top_k)
    # softmax's Z cancels in p_top / sum(p_top), so both paths share one formula on e = exp(l - m)
    return ids, _weights(_exp_shifted(logits, bad), ids, bad, norm_topk_prob)


def route_f32(logits: np.ndarray, top_k: int, norm_topk_prob: bool) -> tuple[np.ndarray, np.ndarray]:
    """The runtime's host-routing path: the GPU router's selection and float32 weights.

    Experts are chosen by float32 logit (descending, ties to the smaller index); with
    m = max logit, e_i = exp(l_i - m), Z = sum_E e_i: norm w_j = e_j / sum_top e, else e_j / Z.
    Non-finite tokens as in route(). Returns ids int32 [T,k], weights float32 [T,k].
    """
    logits = _check_logits(logits, top_k).astype(np.float32)
    ids, bad = _select(logits, top_k)
    return ids, _weights(_exp_shifted(logits, bad), ids, bad, norm_topk_prob)


# --- align ------------------------------------------------------------------


@dataclass(frozen=True)
class AlignPlan:
    sorted_ids: np.ndarray  # int32 [num_padded]: pairs grouped by expert, segments padded with the sentinel
    block_expert: np.ndarray  # int32 [num_padded // block_size]
    # int32 [num_padded // block_size]: the row of the unpadded sorted rows (one a real pair, a's layout on
    # the device) that holds the block's first slot
    block_a_row: np.ndarray
    num_padded: int
    pairs_by_token: np.ndarray  # int32 [T*k]: slot of pair p in sorted_ids
    block_size: int
    sentinel: int


def _check_ids(ids: np.ndarray, num_experts: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"expert ids must be a 2-D integer array [T, k], got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got {ids.min()}..{ids.max()}")
    return ids


def expert_counts(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Pairs routed to each expert, int64 [E]."""
    ids = _check_ids(ids, num_experts)
    return np.bincount(ids.reshape(-1), minlength=num_experts).astype(np.int64)


def pick_block_size(
    counts: np.ndarray, candidates: tuple[int, ...], padding_budget: float, override: int | None = None,
    pair: tuple[int, int, int] | None = None,
) -> int:
    """The seed's rule: the override if given; else, for a mixed stream variant's pair (small, large, the cost
    of a large block in eighths of a small one: families/align.py pair_arg), large where its blocks at that cost
    are no more than small's (small with no pairs); else the largest candidate whose padded pair count is
    within padding_budget x the real count; else (or with no pairs) the smallest candidate."""
    if override is not None:
        return int(override)
    if pair is not None:
        small, large, eighths = pair
        counts = np.asarray(counts, dtype=np.int64)
        small_blocks, large_blocks = int((-(-counts // small)).sum()), int((-(-counts // large)).sum())
        return int(large) if counts.sum() > 0 and large_blocks * eighths <= small_blocks * 8 else int(small)
    if not candidates:
        raise ValueError("pick_block_size needs at least one candidate block size")
    counts = np.asarray(counts, dtype=np.int64)
    real = int(counts.sum())
    if real == 0:
        return min(candidates)
    for bs in sorted(candidates, reverse=True):
        padded = int((-(-counts // bs) * bs).sum())
        if float(padded) <= float(real) * padding_budget:
            return int(bs)
    return min(candidates)


def align(ids: np.ndarray, num_experts: int, block_size: int) -> AlignPlan:
    """Counting sort of the T*k pairs by expert (ascending experts, ascending pair index inside
    a segment), each expert's segment padded with the sentinel to a multiple of block_size;
    experts with no pairs get no block."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    ids = _check_ids(ids, num_experts)
    flat = ids.reshape(-1).astype(np.int64)
    n_pairs = flat.size
    counts = np.bincount(flat, minlength=num_experts)
    padded = -(-counts // block_size) * block_size
    start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    padded_start = np.concatenate(([0], np.cumsum(padded)[:-1]))
    num_padded = int(padded.sum())

    order = np.argsort(flat, kind="stable")  # pair indices, grouped by expert, ascending within
    experts_in_order = flat[order]
    slot = padded_start[experts_in_order] + (np.arange(n_pairs) - start[experts_in_order])

    sorted_ids = np.full(num_padded, n_pairs, dtype=np.int32)
    sorted_ids[slot] = order
    pairs_by_token = np.empty(n_pairs, dtype=np.int32)
    pairs_by_token[order] = slot
    block_expert = np.repeat(np.arange(num_experts, dtype=np.int32), padded // block_size)
    block_slot = np.arange(block_expert.size, dtype=np.int64) * block_size
    block_a_row = (start[block_expert] + block_slot - padded_start[block_expert]).astype(np.int32)
    return AlignPlan(
        sorted_ids=sorted_ids,
        block_expert=block_expert,
        block_a_row=block_a_row,
        num_padded=num_padded,
        pairs_by_token=pairs_by_token,
        block_size=int(block_size),
        sentinel=n_pairs,
    )


def _segments(plan: AlignPlan):
    """(expert, first slot, end slot) of each expert's contiguous run of blocks."""
    be = plan.block_expert
    if be.size == 0:
        return
    edges = np.flatnonzero(np.diff(be)) + 1
    for b0, b1 in zip(np.concatenate(([0], edges)), np.concatenate((edges, [be.size]))):
        yield int(be[b0]), int(b0) * plan.block_size, int(b1) * plan.block_size


# --- the expert computation -------------------------------------------------


def _gather_slots(x: np.ndarray, slots: np.ndarray, sentinel: int, top_k: int) -> np.ndarray:
    real = slots != sentinel
    rows = np.zeros((slots.size, x.shape[1]), dtype=np.float64)
    rows[real] = x[slots[real] // top_k]
    return rows


def gather(x: np.ndarray, plan: AlignPlan, top_k: int) -> np.ndarray:
    """[num_padded, H] float64: row x[p // k] for pair p, zero rows at sentinel slots."""
    return _gather_slots(np.asarray(x), plan.sorted_ids, plan.sentinel, top_k)


def silu(z):
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(over="ignore"):  # exp(-z) -> inf for very negative z gives the right limit, -0
        return z / (1.0 + np.exp(-z))


def gate_up_silu(x_rows: np.ndarray, wg: np.ndarray, wu: np.ndarray) -> np.ndarray:
    """silu(x @ wg.T) * (x @ wu.T): [N,H], [I,H], [I,H] -> [N,I] float64."""
    x_rows = np.asarray(x_rows, dtype=np.float64)
    return silu(x_rows @ np.asarray(wg, np.float64).T) * (x_rows @ np.asarray(wu, np.float64).T)


def down(a: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """a @ wd.T: [N,I], [H,I] -> [N,H] float64."""
    return np.asarray(a, dtype=np.float64) @ np.asarray(wd, np.float64).T


def combine(y_sorted: np.ndarray, plan: AlignPlan, weights: np.ndarray) -> np.ndarray:
    """out[t] = sum_j w[t,j] * y_sorted[pairs_by_token[t*k + j]], [T,H] float64."""
    weights = np.asarray(weights, dtype=np.float64)
    n_tokens, top_k = weights.shape
    if n_tokens * top_k != plan.pairs_by_token.size:
        raise ValueError(f"weights {weights.shape} do not match the plan's {plan.pairs_by_token.size} pairs")
    out = np.zeros((n_tokens, y_sorted.shape[1]), dtype=np.float64)
    slots = plan.pairs_by_token.reshape(n_tokens, top_k)
    for j in range(top_k):  # one [T,H] slice at a time, not a [T,k,H] temporary
        out += weights[:, j, None] * y_sorted[slots[:, j]]
    return out


# --- weights ----------------------------------------------------------------


def dequant_stack(qt: QuantType, data: np.ndarray) -> np.ndarray:
    """GGUF bytes (E, rows, row_bytes) -> float64 (E, rows, in_dim)."""
    data = np.asarray(data)
    if data.ndim != 3 or data.dtype != np.uint8:
        raise ValueError(f"expected uint8 bytes of shape (E, rows, row_bytes), got {data.dtype} {data.shape}")
    nbytes = quant.BLOCK_BYTES[qt]
    if data.shape[2] % nbytes:
        raise ValueError(
            f"row of {data.shape[2]} bytes is not a whole number of {qt.value} blocks ({nbytes} bytes)"
        )
    in_dim = data.shape[2] // nbytes * QK_K
    # Float32 is enough: the block products (f16 scale x small ints) are exact in float32, so the only
    # rounding is Q4_K's final subtraction, the same one gguf and an f32 (or fma) GPU kernel make.
    # One expert at a time keeps its temporaries cache-sized (several times faster at full model shapes).
    out = np.empty(data.shape[:2] + (in_dim,), dtype=np.float64)
    for e in range(data.shape[0]):
        out[e] = quant.dequantize(qt, data[e], out.shape[1:])
    return out


@dataclass(frozen=True)
class DenseExperts:
    """Dequantized expert weights, float64."""

    gate: np.ndarray  # [E, I, H]
    up: np.ndarray  # [E, I, H]
    down: np.ndarray  # [E, H, I]

    @classmethod
    def from_quantized(cls, spec: MoeSpec, gate_bytes, up_bytes, down_bytes) -> "DenseExperts":
        e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
        for name, data, rows, in_dim in (
            ("gate", gate_bytes, i, h),
            ("up", up_bytes, i, h),
            ("down", down_bytes, h, i),
        ):
            want = (e, rows, quant.row_bytes(getattr(spec.quant, name), in_dim))
            if tuple(np.shape(data)) != want:
                raise ValueError(f"{name} bytes have shape {tuple(np.shape(data))}, spec {spec.name} needs {want}")
        return cls(
            gate=dequant_stack(spec.quant.gate, gate_bytes),
            up=dequant_stack(spec.quant.up, up_bytes),
            down=dequant_stack(spec.quant.down, down_bytes),
        )


# --- the layer --------------------------------------------------------------


def moe_layer(
    x: np.ndarray,
    logits: np.ndarray,
    experts: DenseExperts,
    top_k: int,
    norm_topk_prob: bool,
    block_size: int = 16,
) -> np.ndarray:
    """The whole layer in float64: route -> align -> gather -> gate_up_silu -> down -> combine.

    x [T,H], logits [T,E] -> out [T,H] float64; T may be 0.
    """
    x = np.asarray(x)
    n_experts, _, hidden = experts.gate.shape
    if x.ndim != 2 or x.shape[1] != hidden:
        raise ValueError(f"x must be [T, {hidden}], got shape {x.shape}")
    if np.shape(logits) != (x.shape[0], n_experts):
        raise ValueError(f"router logits must be [{x.shape[0]}, {n_experts}], got shape {np.shape(logits)}")
    ids, weights = route(logits, top_k, norm_topk_prob)
    plan = align(ids, n_experts, block_size)
    y_sorted = np.zeros((plan.num_padded, hidden), dtype=np.float64)
    # gathering one expert's segment at a time avoids a second [num_padded, H] array
    for e, s0, s1 in _segments(plan):
        rows = _gather_slots(x, plan.sorted_ids[s0:s1], plan.sentinel, top_k)
        y_sorted[s0:s1] = down(gate_up_silu(rows, experts.gate[e], experts.up[e]), experts.down[e])
    return combine(y_sorted, plan, weights)
