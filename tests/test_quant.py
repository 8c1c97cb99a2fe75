"""ferrum_gen.quant against gguf's numpy dequantizer, on random and on libgguf-quantized blocks."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest

from ferrum_gen import quant
from ferrum_gen.render import render_spec
from ferrum_gen.spec import QK_K, QuantType, load_spec, shipped_spec_names

QTYPES = list(quant.LAYOUTS)
GGML = {QuantType.Q4_K: gguf.GGMLQuantizationType.Q4_K, QuantType.Q6_K: gguf.GGMLQuantizationType.Q6_K}
# byte offsets of the f16 scale fields inside a block
F16_FIELDS = {QuantType.Q4_K: (0, 2), QuantType.Q6_K: (208,)}


def _gguf_dequant(qt: QuantType, data: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(data, GGML[qt])


def _assert_bitwise_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_ggml_type_ids_match_gguf():
    for qt in QTYPES:
        assert quant.GGML_TYPE_ID[qt] == int(GGML[qt])
        assert quant.BLOCK_BYTES[qt] == gguf.GGML_QUANT_SIZES[GGML[qt]][1]


@pytest.mark.parametrize("qt", QTYPES, ids=lambda q: q.value)
def test_dequantize_random_blocks(qt):
    rng = np.random.default_rng(1)
    rows, in_dim = 48, 4 * QK_K
    data = quant.random_matrix_bytes(qt, rows, in_dim, rng)
    assert data.shape == (rows, quant.row_bytes(qt, in_dim)) and data.dtype == np.uint8
    ours = quant.dequantize(qt, data, (rows, in_dim))
    _assert_bitwise_equal(ours, _gguf_dequant(qt, data))
    assert np.isfinite(ours).all()


@pytest.mark.parametrize("qt", QTYPES, ids=lambda q: q.value)
def test_dequantize_arbitrary_finite_scales(qt):
    """Every byte random, f16 fields anything finite: negative, subnormal, zero, huge."""
    rng = np.random.default_rng(2)
    n = 4000
    raw = rng.integers(0, 256, size=(n, quant.BLOCK_BYTES[qt]), dtype=np.uint8)
    for off in F16_FIELDS[qt]:
        f = raw[:, off : off + 2].copy().view(np.float16)
        f[~np.isfinite(f)] = np.float16(1.0)
        raw[:, off : off + 2] = f.view(np.uint8)
    ours = quant.dequantize(qt, raw)
    _assert_bitwise_equal(ours, _gguf_dequant(qt, raw).reshape(-1))


def _realistic_rows(rng: np.random.Generator, rows: int, in_dim: int) -> np.ndarray:
    x = (rng.standard_normal((rows, in_dim)) * 0.02).astype(np.float32)
    x[1] *= 50.0  # a loud row
    x[2, ::97] = 3.0  # outliers inside ordinary blocks
    x[3] = 0.0  # all zero
    x[4] = 0.125  # constant
    x[5] = np.abs(x[5])  # one-signed: min field 0
    return x


@pytest.mark.parametrize("qt", QTYPES, ids=lambda q: q.value)
def test_dequantize_libgguf_blocks(qt):
    libgguf = pytest.importorskip("libgguf")
    rng = np.random.default_rng(3)
    rows, in_dim = 32, 3 * QK_K
    x = _realistic_rows(rng, rows, in_dim)
    data = np.asarray(libgguf.quantize_rows(x, quant.GGML_TYPE_ID[qt]))
    assert data.dtype == np.uint8 and data.shape == (rows, quant.row_bytes(qt, in_dim))
    ours = quant.dequantize(qt, data, (rows, in_dim))
    _assert_bitwise_equal(ours, _gguf_dequant(qt, data))
    # the blocks are realistic: they approximate what was quantized
    rel = np.linalg.norm(ours - x) / np.linalg.norm(x)
    assert rel < {QuantType.Q4_K: 0.15, QuantType.Q6_K: 0.04}[qt]


def test_dequantize_shape_and_errors():
    rng = np.random.default_rng(4)
    data = quant.random_matrix_bytes(QuantType.Q4_K, 6, 2 * QK_K, rng).reshape(2, 3, -1)
    assert quant.dequantize(QuantType.Q4_K, data).shape == (6 * 2 * QK_K,)
    assert quant.dequantize(QuantType.Q4_K, data, (2, 3, 2 * QK_K)).shape == (2, 3, 2 * QK_K)
    with pytest.raises(ValueError, match="whole number"):
        quant.dequantize(QuantType.Q6_K, np.zeros(211, np.uint8))


def test_q4_k_scales_mins_follow_the_design_formula():
    rng = np.random.default_rng(5)
    q = rng.integers(0, 256, size=(200, 12), dtype=np.uint8)
    sc, mn = quant.q4_k_scales_mins(q)
    qi = q.astype(int)
    for j in range(8):
        if j < 4:
            want_sc, want_m = qi[:, j] & 63, qi[:, j + 4] & 63
        else:
            want_sc = (qi[:, j + 4] & 15) | ((qi[:, j - 4] >> 6) << 4)
            want_m = (qi[:, j + 4] >> 4) | ((qi[:, j] >> 6) << 4)
        np.testing.assert_array_equal(sc[:, j], want_sc)
        np.testing.assert_array_equal(mn[:, j], want_m)


def _blocks_in_kernel_order(packed: np.ndarray, rows: int, blocks_per_row: int) -> np.ndarray:
    """GPU blocks (or scales) back in GGUF order, (rows, blocks_per_row, item): block kb of row r read
    at fg::weight_block's index, ((r / T) * KB + kb) * T + r % T, written here from the template."""
    tile = quant.WEIGHT_TILE_ROWS
    flat = packed.reshape(rows * blocks_per_row, -1)
    r, kb = np.meshgrid(np.arange(rows), np.arange(blocks_per_row), indexing="ij")
    return flat[((r // tile) * blocks_per_row + kb) * tile + r % tile]


def test_q4_k_gpu_layout_is_the_gguf_blocks_tile_major():
    rng = np.random.default_rng(6)
    experts, rows, nb = 2, 2 * quant.WEIGHT_TILE_ROWS, 3
    data = quant.random_matrix_bytes(QuantType.Q4_K, experts * rows, nb * QK_K, rng).reshape(experts, rows, -1)
    packed, d = quant.to_gpu_layout(QuantType.Q4_K, data)
    assert d is None and packed.shape == data.shape and packed.dtype == np.uint8
    np.testing.assert_array_equal(_blocks_in_kernel_order(packed, experts * rows, nb),
                                  data.reshape(experts * rows, nb, -1))


def _unpack_q6_k_gpu(packed: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The inverse of to_gpu_layout for Q6_K, written from its docstring."""
    lead = packed.shape[:-1]
    rows, nb = int(np.prod(lead)), d.shape[-1]
    blocks = _blocks_in_kernel_order(packed, rows, nb).reshape(-1, quant.layout(QuantType.Q6_K).gpu_block_bytes)
    d = _blocks_in_kernel_order(d, rows, nb).reshape(-1)
    out = np.empty((blocks.shape[0], quant.BLOCK_BYTES[QuantType.Q6_K]), np.uint8)
    out[:, :192] = blocks[:, :192]
    # GPU scale slot 4*(2n+s)+m holds GGUF scale 8n+2m+s
    for n in range(2):
        for s in range(2):
            for m in range(4):
                out[:, 192 + 8 * n + 2 * m + s] = blocks[:, 192 + 4 * (2 * n + s) + m]
    out[:, 208:210] = np.ascontiguousarray(d, dtype=np.float16).reshape(-1, 1).view(np.uint8)
    return out.reshape(lead + (-1,))


@pytest.mark.parametrize("source", ["random", "libgguf"])
def test_q6_k_gpu_layout_round_trips(source):
    rng = np.random.default_rng(7)
    experts, rows, in_dim = 3, quant.WEIGHT_TILE_ROWS, 2 * QK_K
    if source == "random":
        data = quant.random_matrix_bytes(QuantType.Q6_K, experts * rows, in_dim, rng)
    else:
        libgguf = pytest.importorskip("libgguf")
        x = _realistic_rows(rng, experts * rows, in_dim)
        data = np.asarray(libgguf.quantize_rows(x, quant.GGML_TYPE_ID[QuantType.Q6_K]))
    data = data.reshape(experts, rows, -1)
    packed, d = quant.to_gpu_layout(QuantType.Q6_K, data)
    nb = in_dim // QK_K
    assert packed.shape == (experts, rows, nb * quant.layout(QuantType.Q6_K).gpu_block_bytes)
    assert packed.dtype == np.uint8
    assert d.shape == (experts, rows, nb) and d.dtype == np.float16
    assert quant.layout(QuantType.Q6_K).gpu_block_bytes % 16 == 0
    np.testing.assert_array_equal(_unpack_q6_k_gpu(packed, d), data)


@pytest.mark.parametrize("qt", QTYPES, ids=lambda q: q.value)
def test_gpu_layout_refuses_rows_that_are_not_whole_tiles(qt):
    data = quant.random_matrix_bytes(qt, quant.WEIGHT_TILE_ROWS + 8, QK_K, np.random.default_rng(8))
    with pytest.raises(ValueError, match=f"multiple of {quant.WEIGHT_TILE_ROWS}"):
        quant.to_gpu_layout(qt, data)


@pytest.mark.parametrize("spec_name", shipped_spec_names())
def test_the_gpu_layout_of_each_projection_is_no_larger_than_its_gguf_bytes(spec_name):
    spec = load_spec(spec_name)
    for qt, out_dim, in_dim in ((spec.quant.gate, spec.intermediate_size, spec.hidden_size),
                                (spec.quant.up, spec.intermediate_size, spec.hidden_size),
                                (spec.quant.down, spec.hidden_size, spec.intermediate_size)):
        data = np.zeros((1, out_dim, quant.row_bytes(qt, in_dim)), np.uint8)  # one expert of the spec's shape
        packed, d = quant.to_gpu_layout(qt, data)
        assert packed.nbytes + (0 if d is None else d.nbytes) == data.nbytes


@pytest.mark.parametrize("spec_name", shipped_spec_names())
def test_kernels_read_the_tile_height_the_layout_uses(spec_name):
    weight_readers = ("gemv", "grouped", "gemm", "stream")
    sources = [r.source for r in render_spec(load_spec(spec_name)) if r.kernel.family.startswith(weight_readers)]
    assert sources and all(f"constexpr int WEIGHT_TILE_ROWS = {quant.WEIGHT_TILE_ROWS};" in src for src in sources)


def test_q6_k_scale_order_is_a_permutation():
    assert sorted(quant._Q6_K_SCALE_ORDER.tolist()) == list(range(16))


@pytest.mark.parametrize("qt", QTYPES, ids=lambda q: q.value)
def test_row_bytes(qt):
    assert quant.row_bytes(qt, QK_K) == quant.BLOCK_BYTES[qt]
    assert quant.row_bytes(qt, 2048) == 8 * quant.BLOCK_BYTES[qt]
    for bad in (1, 100, 255, 257, 768 + 128, 14336 + 64):
        with pytest.raises(ValueError, match="multiple of 256"):
            quant.row_bytes(qt, bad)


# --- the registry -----------------------------------------------------------------------------

@pytest.mark.parametrize("qt", QTYPES, ids=lambda q: q.value)
def test_registry_entry_agrees_with_gguf_and_the_kernels(qt):
    lay = quant.layout(qt)
    assert lay.qtype is qt and lay.weights_per_block == QK_K == gguf.GGML_QUANT_SIZES[GGML[qt]][0]
    assert lay.ggml_id == int(GGML[qt]) and quant.by_ggml_id(lay.ggml_id) is qt
    assert lay.gguf_block_bytes == gguf.GGML_QUANT_SIZES[GGML[qt]][1]
    assert lay.gpu_block_bytes % 16 == 0, "the kernels read blocks with 16-byte loads"
    packed, d = quant.to_gpu_layout(qt, quant.random_matrix_bytes(qt, quant.WEIGHT_TILE_ROWS, 2 * QK_K,
                                                                  np.random.default_rng(0)))
    assert packed.shape[-1] == 2 * lay.gpu_block_bytes
    assert (d is not None) == lay.separate_scale
    template = (Path(quant.__file__).parent / "templates" / "dequant.cuh.j2").read_text()
    struct = lay.cuda_struct.split("::")[-1]
    assert re.search(rf"struct {struct}\b", template), f"{lay.cuda_struct} is not defined in dequant.cuh.j2"


def test_every_quant_type_has_a_layout():
    assert set(quant.LAYOUTS) == set(QuantType)


@pytest.mark.parametrize(
    "call",
    [
        lambda qt: quant.layout(qt),
        lambda qt: quant.random_blocks(qt, 1, np.random.default_rng(0)),
        lambda qt: quant.to_gpu_layout(qt, np.zeros((1, 144), np.uint8)),
        lambda qt: quant.dequantize(qt, np.zeros((1, 144), np.uint8)),
    ],
    ids=["layout", "random_blocks", "to_gpu_layout", "dequantize"],
)
def test_code_that_branches_on_the_type_refuses_an_unknown_one(call):
    with pytest.raises(ValueError, match="q5_k"):
        call("q5_k")


def test_unknown_ggml_id_is_not_a_quant_type():
    assert quant.by_ggml_id(8) is None  # Q8_0
