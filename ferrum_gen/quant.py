"""GGUF k-quant block layouts: one registry of every fact about a quant type, numpy
dequantisation, random valid blocks for tests, and the one-time conversion into the layout
the GPU kernels read.

Adding a k-quant means: a QuantType member and a QuantLayout entry here, its struct in
templates/dequant.cuh.j2, and its tests. Everything else (spec validation, kernel families,
GGUF reading, the runtime) reads the registry; code that branches on the type raises for a
type it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

QK_K = 256
"""Weights per k-quant super-block: a k-quantized row's input size must be a multiple."""

WEIGHT_TILE_ROWS = 64
"""Rows of a weight tile in the GPU layout (to_gpu_layout): inside a tile, block kb of every row is
stored side by side, so the rows x one block that a kernel step reads is one contiguous run. A
projection's output size is a multiple of QK_K (it is the input size of the other projection), so
tiles never straddle two experts. The templates' fg::weight_block reads the same value."""


class QuantType(str, Enum):
    Q4_K = "q4_k"
    Q6_K = "q6_k"


@dataclass(frozen=True)
class QuantLayout:
    """Where a quant type's bytes and scales live, in the GGUF file and on the GPU."""

    qtype: QuantType
    ggml_id: int
    """ggml's numeric type id, as GGUF files store it."""
    weights_per_block: int
    gguf_block_bytes: int
    """Bytes of one super-block as stored in a GGUF file."""
    gpu_block_bytes: int
    """Bytes of one super-block in the layout the kernels read (16-byte aligned; the blocks themselves
    are ordered tile-major there, see to_gpu_layout)."""
    cuda_struct: str
    """The block's struct in templates/dequant.cuh.j2."""
    gemv_chunks_per_block: int
    """16-byte lane chunks one GEMV lane group splits a block into (see RowDot in dequant.cuh.j2)."""
    separate_scale: bool
    """True when the block's f16 `d` moves to its own array on the GPU (the kernels take it as `*_d`)."""
    layout_doc: str


LAYOUTS: dict[QuantType, QuantLayout] = {
    QuantType.Q4_K: QuantLayout(
        qtype=QuantType.Q4_K, ggml_id=12, weights_per_block=QK_K, gguf_block_bytes=144, gpu_block_bytes=144,
        cuda_struct="fg::Q4K", gemv_chunks_per_block=8, separate_scale=False,
        layout_doc="d f16, dmin f16, 12 bytes of packed 6-bit scales and mins for 8 sub-blocks of 32, "
                   "128 bytes of 4-bit values; its bytes kept as they are on the GPU (144 bytes are 16-byte aligned)",
    ),
    QuantType.Q6_K: QuantLayout(
        qtype=QuantType.Q6_K, ggml_id=14, weights_per_block=QK_K, gguf_block_bytes=210, gpu_block_bytes=208,
        cuda_struct="fg::Q6K", gemv_chunks_per_block=4, separate_scale=True,
        layout_doc="ql[128], qh[64], scales[16] int8, d f16; on the GPU ql | qh | scales reordered per lane "
                   "chunk (208 bytes) with d in a separate f16 array",
    ),
}


def layout(qt: QuantType) -> QuantLayout:
    """The registry entry of `qt`; a type without one is an error, never a silent default."""
    try:
        return LAYOUTS[QuantType(qt)]
    except (KeyError, ValueError):
        raise ValueError(f"quant type {qt!r} has no layout in ferrum_gen.quant.LAYOUTS") from None


def by_ggml_id(ggml_id: int) -> QuantType | None:
    """The QuantType whose ggml id is `ggml_id`, or None for a type ferrum-gen does not generate."""
    return next((lay.qtype for lay in LAYOUTS.values() if lay.ggml_id == int(ggml_id)), None)


BLOCK_BYTES = {qt: lay.gguf_block_bytes for qt, lay in LAYOUTS.items()}
"""Bytes of one super-block as stored in a GGUF file (derived from LAYOUTS)."""

GGML_TYPE_ID = {qt: lay.ggml_id for qt, lay in LAYOUTS.items()}
"""ggml's numeric type ids (derived from LAYOUTS)."""


def row_bytes(qt: QuantType, in_dim: int) -> int:
    if in_dim % QK_K:
        raise ValueError(f"a {qt.value} row needs a multiple of {QK_K} weights, got {in_dim}")
    return in_dim // QK_K * layout(qt).gguf_block_bytes


def _as_blocks(qt: QuantType, data: np.ndarray, xp=np) -> np.ndarray:
    raw = xp.ascontiguousarray(data, dtype=xp.uint8).reshape(-1)
    nbytes = layout(qt).gguf_block_bytes
    if raw.size % nbytes:
        raise ValueError(f"{raw.size} bytes is not a whole number of {qt.value} blocks ({nbytes} bytes each)")
    return raw.reshape(-1, nbytes)


def q4_k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12 scale bytes of each block (shape (N, 12)) into 8 scales and 8 mins."""
    q = scales.astype("uint16")
    sc = q[..., :8].copy()
    mn = q[..., :8].copy()
    sc[..., :4] = q[..., 0:4] & 63
    mn[..., :4] = q[..., 4:8] & 63
    sc[..., 4:] = (q[..., 8:12] & 15) | ((q[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return sc, mn


def q4_k_fields(blocks, xp=np):
    """Q4_K blocks (N, 144) -> d, dmin (N, 1) float32, the 8 scales and mins (N, 8) uint16, the codes (N, 8, 32)
    uint8: weight i of sub-block j is d * scale[j] * code[j, i] - dmin * min[j]."""
    n = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(xp.float16).astype(xp.float32)
    dmin = blocks[:, 2:4].copy().view(xp.float16).astype(xp.float32)
    sc, mn = q4_k_scales_mins(blocks[:, 4:16])
    qs = blocks[:, 16:144].reshape(n, 4, 32)
    return d, dmin, sc, mn, xp.stack([qs & 15, qs >> 4], axis=2).reshape(n, 8, 32)


def dequantize(qt: QuantType, data: np.ndarray, shape: tuple[int, ...] | None = None, xp=np) -> np.ndarray:
    """GGUF bytes to float32 weights, in the weights' natural order (input dim contiguous).

    xp is the array module: numpy, or cupy to dequantize large stacks on the GPU.
    """
    blocks = _as_blocks(qt, data, xp)
    n = blocks.shape[0]
    if qt is QuantType.Q4_K:
        d, dmin, sc, mn, codes = q4_k_fields(blocks, xp)
        q = codes.astype(xp.float32)
        w = d[:, :, None] * sc.astype(xp.float32)[:, :, None] * q - (dmin * mn.astype(xp.float32))[:, :, None]
        out = w.reshape(n, QK_K)
    elif qt is QuantType.Q6_K:
        ql = blocks[:, 0:128].reshape(n, 2, 64)
        qh = blocks[:, 128:192].reshape(n, 2, 32)
        scales = blocks[:, 192:208].copy().view(xp.int8).astype(xp.float32).reshape(n, 16)
        d = blocks[:, 208:210].copy().view(xp.float16).astype(xp.float32)
        lo, hi = ql[:, :, :32], ql[:, :, 32:]
        q = xp.stack(
            [
                (lo & 15) | (((qh >> 0) & 3) << 4),
                (hi & 15) | (((qh >> 2) & 3) << 4),
                (lo >> 4) | (((qh >> 4) & 3) << 4),
                (hi >> 4) | (((qh >> 6) & 3) << 4),
            ],
            axis=2,
        ).reshape(n, QK_K).astype(xp.float32) - 32.0
        out = d * xp.repeat(scales, 16, axis=1) * q
    else:
        raise ValueError(f"dequantize has no rule for quant type {qt!r}")
    out = out.reshape(-1)
    return out.reshape(shape) if shape is not None else out


def random_blocks(qt: QuantType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random but valid blocks: arbitrary quant bits, finite positive f16 scale fields.

    The scale fields are sized so that weights land around 1e-2 (a few 1e-1 at most), like
    real layers: Q4_K's d and dmin sit near 1e-4, Q6_K's d near 2e-5, which is below f16's
    normal range, as it often is in real files, so subnormal scales are exercised too.
    """
    raw = rng.integers(0, 256, size=(n_blocks, layout(qt).gguf_block_bytes), dtype=np.uint8)
    if qt is QuantType.Q4_K:
        raw[:, 0:2] = rng.uniform(5e-5, 1.5e-4, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
        raw[:, 2:4] = rng.uniform(0.0, 1e-4, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    elif qt is QuantType.Q6_K:
        raw[:, 208:210] = rng.uniform(1e-5, 4e-5, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    else:
        raise ValueError(f"random_blocks has no rule for the scale fields of quant type {qt!r}")
    return raw


def random_matrix_bytes(qt: QuantType, rows: int, in_dim: int, rng: np.random.Generator) -> np.ndarray:
    """A (rows, row_bytes) uint8 matrix of random valid blocks."""
    nb = in_dim // QK_K
    return random_blocks(qt, rows * nb, rng).reshape(rows, nb * layout(qt).gguf_block_bytes)


# Q6_K lane chunk (n, s) reads scales 8n + 2m + s, m = 0..3: store those four together.
_Q6_K_SCALE_ORDER = np.array([8 * n + 2 * m + s for n in range(2) for s in range(2) for m in range(4)])


def tile_major(rows: np.ndarray, blocks_per_row: int) -> np.ndarray:
    """(..., rows, blocks_per_row * item) -> the same shape, the rows regrouped tile-major: tiles of
    WEIGHT_TILE_ROWS rows, and inside a tile block kb of each row side by side (kb-major). Works for
    the block bytes (item = a block's bytes) and for a separate scale array (item = 1 scale)."""
    *lead, n_rows, row_items = rows.shape
    if n_rows % WEIGHT_TILE_ROWS:
        raise ValueError(f"{n_rows} rows do not make whole {WEIGHT_TILE_ROWS}-row tiles of the GPU layout: "
                         f"a projection's output size must be a multiple of {WEIGHT_TILE_ROWS}")
    item = row_items // blocks_per_row
    tiles = rows.reshape(*lead, n_rows // WEIGHT_TILE_ROWS, WEIGHT_TILE_ROWS, blocks_per_row, item)
    return np.ascontiguousarray(np.swapaxes(tiles, -3, -2)).reshape(rows.shape)


def to_gpu_layout(qt: QuantType, data: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The GGUF bytes (..., rows, row_bytes) of a stack of matrices in the layout the kernels read,
    converted once at load; rows must be a multiple of WEIGHT_TILE_ROWS.

    The rows are regrouped tile-major (tile_major; the kernels address a block through
    fg::weight_block). Q4_K blocks (144 bytes, 16-byte aligned) keep their bytes. Q6_K blocks (210
    bytes) are not aligned, so each becomes 208 bytes [ql | qh | scales reordered per lane chunk]
    plus its f16 d in a separate array of shape (..., rows, blocks_per_row), in the same tile-major
    order. Nothing is dequantised: the GPU holds exactly the GGUF's bytes, rearranged, and no more.
    """
    if data.ndim < 2:
        raise ValueError(f"to_gpu_layout takes (..., rows, row_bytes), got shape {data.shape}")
    nb = data.shape[-1] // layout(qt).gguf_block_bytes
    if qt is QuantType.Q4_K:
        _as_blocks(qt, data)  # whole blocks, or a clear error
        return tile_major(np.ascontiguousarray(data, dtype=np.uint8), nb), None
    if qt is not QuantType.Q6_K:
        raise ValueError(f"to_gpu_layout has no rule for quant type {qt!r}")
    gpu_bytes = layout(qt).gpu_block_bytes
    lead = data.shape[:-1]
    blocks = _as_blocks(qt, data)
    packed = np.empty((blocks.shape[0], gpu_bytes), dtype=np.uint8)
    packed[:, :192] = blocks[:, :192]
    packed[:, 192:208] = blocks[:, 192:208][:, _Q6_K_SCALE_ORDER]
    d = blocks[:, 208:210].copy().view(np.float16).reshape(-1)
    return tile_major(packed.reshape(lead + (nb * gpu_bytes,)), nb), tile_major(d.reshape(lead + (nb,)), nb)
