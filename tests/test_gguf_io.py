"""GGUF reading: expert stacks as memory-mapped views, specs from metadata, clear errors for bad files."""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml
from gguf import GGMLQuantizationType

from ferrum_gen import quant
from ferrum_gen.gguf_io import (
    ExpertStack,
    GgufError,
    LayerExperts,
    MixedQuantWarning,
    _fmt_layers,
    _sanitize_name,
    describe_quant_layers,
    open_gguf,
    quant_types_by_layer,
    read_layer_experts,
    spec_from_gguf,
)
from ferrum_gen.spec import MoeSpec, QuantType, shipped_specs, spec_from_dict, spec_to_yaml
from ferrum_gen.testing import write_moe_gguf

Q4, Q6 = QuantType.Q4_K, QuantType.Q6_K
H, I, E, K = 512, 256, 4, 2
MIXED = [(Q4, Q4, Q6), (Q4, Q4, Q4)]  # layer 0 like Q4_K_M's Q6_K-down layers, layer 1 all Q4_K


def _spec(**over) -> MoeSpec:
    data = dict(
        name="t",
        hidden_size=H,
        intermediate_size=I,
        num_experts=E,
        top_k=K,
        norm_topk_prob=True,
        quant={"gate": "q4_k", "up": "q4_k", "down": "q6_k"},
        activation_dtype="f32",
    )
    data.update(over)
    return spec_from_dict(data)


def _write(path: Path, arch: str = "qwen3moe", quant_by_layer=MIXED, seed: int = 0, **kw):
    params = dict(hidden_size=H, intermediate_size=I, num_experts=E, top_k=K)
    params.update({k: kw.pop(k) for k in list(kw) if k in params})
    return write_moe_gguf(
        path, arch=arch, quant_by_layer=quant_by_layer, rng=np.random.default_rng(seed), **params, **kw
    )


def _reaches_memmap(a: np.ndarray) -> bool:
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = a.base  # type: ignore[assignment]
    return False


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    written = _write(path, quantizer="random")
    return path, written


# --- reading back ---------------------------------------------------------


def test_two_layers_read_back_bytes_identical_as_mmap_views(mixed_file):
    path, written = mixed_file
    reader = open_gguf(path)
    for layer, (qg, qu, qd) in enumerate(MIXED):
        spec = _spec(quant={"gate": qg.value, "up": qu.value, "down": qd.value})
        experts = read_layer_experts(reader, layer, spec)
        assert isinstance(experts, LayerExperts)
        assert experts.quant_types == (qg, qu, qd)
        for proj, stack, rows, in_dim in (
            ("gate", experts.gate, I, H),
            ("up", experts.up, I, H),
            ("down", experts.down, H, I),
        ):
            assert isinstance(stack, ExpertStack)
            assert stack.tensor == f"blk.{layer}.ffn_{proj}_exps.weight"
            assert (stack.rows, stack.in_dim, stack.num_experts) == (rows, in_dim, E)
            assert stack.data.dtype == np.uint8
            assert stack.data.shape == (E, rows, quant.row_bytes(stack.quant, in_dim))
            assert np.array_equal(stack.data, written[layer][proj])
            # a view into the reader's memory map, not a copy
            assert np.shares_memory(stack.data, reader.data)
            assert _reaches_memmap(stack.data)
            assert not stack.data.flags.writeable


def test_read_by_path_gives_same_bytes(mixed_file):
    path, written = mixed_file
    experts = read_layer_experts(str(path), 1, _spec(quant={"gate": "q4_k", "up": "q4_k", "down": "q4_k"}))
    assert np.array_equal(experts.down.data, written[1]["down"])
    assert _reaches_memmap(experts.down.data)


def test_libgguf_blocks_read_back_and_dequantize_like_gguf(tmp_path):
    pytest.importorskip("libgguf")  # a dev dependency (pyproject's dev extra), as in test_quant
    path = tmp_path / "real.gguf"
    written = _write(path, quant_by_layer=[(Q4, Q6, Q6)], quantizer="libgguf")
    experts = read_layer_experts(path, 0, _spec(quant={"gate": "q4_k", "up": "q6_k", "down": "q6_k"}))
    for proj, stack in zip(("gate", "up", "down"), experts):
        assert np.array_equal(stack.data, written[0][proj])
        ggml = GGMLQuantizationType.Q4_K if stack.quant is Q4 else GGMLQuantizationType.Q6_K
        ref = gguf.quants.dequantize(np.asarray(stack.data[1]), ggml)
        ours = quant.dequantize(stack.quant, stack.data[1], (stack.rows, stack.in_dim))
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
        # realistic weights: std ~0.02 after the quantisation round trip
        assert 0.01 < float(ours.std()) < 0.04


def _distinct_triples():
    seen = {}
    for s in shipped_specs():
        seen.setdefault((s.quant.gate, s.quant.up, s.quant.down), s)
    return list(seen.values())


@pytest.mark.parametrize("shipped", shipped_specs(), ids=lambda s: s.name)
def test_every_shipped_spec_quant_combination_reads_back(tmp_path, shipped):
    """Each shipped spec's E, k, quant types and norm, at reduced H/I, written and read back."""
    small = spec_from_dict(
        {**shipped.model_dump(mode="json"), "hidden_size": 512, "intermediate_size": 256}
    )
    triple = (small.quant.gate, small.quant.up, small.quant.down)
    path = tmp_path / f"{small.name}.gguf"
    written = write_moe_gguf(
        path,
        arch="qwen3moe",
        hidden_size=512,
        intermediate_size=256,
        num_experts=small.num_experts,
        top_k=small.top_k,
        quant_by_layer=[triple],
        rng=np.random.default_rng(1),
    )
    experts = read_layer_experts(path, 0, small)
    assert experts.quant_types == triple
    for proj, stack in zip(("gate", "up", "down"), experts):
        assert stack.num_experts == small.num_experts
        assert np.array_equal(stack.data, written[0][proj])
    derived = spec_from_gguf(path)
    assert (derived.num_experts, derived.top_k) == (small.num_experts, small.top_k)
    assert (derived.quant.gate, derived.quant.up, derived.quant.down) == triple


def test_shipped_specs_cover_the_quant_triples_we_expect():
    triples = {(s.quant.gate, s.quant.up, s.quant.down) for s in _distinct_triples()}
    assert (Q4, Q4, Q6) in triples and (Q4, Q4, Q4) in triples


def test_quant_types_by_layer(mixed_file):
    path, _ = mixed_file
    assert quant_types_by_layer(path) == {0: MIXED[0], 1: MIXED[1]}
    text = describe_quant_layers(quant_types_by_layer(path))
    assert "q4_k/q4_k/q6_k (gate/up/down) in layer 0" in text and "q4_k/q4_k/q4_k in layer 1" in text


# --- specs from files -----------------------------------------------------


@pytest.mark.parametrize(
    "arch,norm",
    [("qwen3moe", True), ("olmoe", False), ("llama", True)],
)
def test_spec_from_gguf_per_architecture(tmp_path, arch, norm):
    path = tmp_path / f"{arch}.gguf"
    _write(path, arch=arch, quant_by_layer=[(Q4, Q4, Q4), (Q4, Q4, Q4)], model_name="Some Model-8x1B")
    spec = spec_from_gguf(path)
    assert spec.name == f"{arch}_h{H}_i{I}_e{E}_k{K}_q4_k_q4_k_q4_k"
    assert spec.model == "Some Model-8x1B"
    assert (spec.hidden_size, spec.intermediate_size, spec.num_experts, spec.top_k) == (H, I, E, K)
    assert spec.norm_topk_prob is norm
    assert (spec.quant.gate, spec.quant.up, spec.quant.down) == (Q4, Q4, Q4)
    assert spec.activation_dtype.value == "bf16"
    # round trip through YAML
    again = spec_from_dict(yaml.safe_load(spec_to_yaml(spec)))
    assert again == spec and again.spec_hash() == spec.spec_hash()
    # and it reads the file's layers
    read_layer_experts(path, 1, spec)


def test_spec_from_gguf_name_layer_and_dtype(mixed_file):
    path, _ = mixed_file
    with pytest.warns(MixedQuantWarning, match=r"fits layer 1 only"):
        spec = spec_from_gguf(path, layer=1, name="my_moe", activation_dtype="f16")
    assert spec.name == "my_moe" and spec.activation_dtype.value == "f16"
    assert (spec.quant.gate, spec.quant.up, spec.quant.down) == (Q4, Q4, Q4)


def test_spec_from_gguf_mixed_layers_warns_and_defaults_to_first_layer(mixed_file):
    path, _ = mixed_file
    with pytest.warns(MixedQuantWarning) as rec:
        spec = spec_from_gguf(path)
    assert spec.quant.down is Q6
    msg = str(rec[0].message)
    assert "layer 0" in msg and "q4_k/q4_k/q4_k in layer 1" in msg


def test_spec_from_gguf_uniform_file_does_not_warn(tmp_path):
    path = tmp_path / "uniform.gguf"
    _write(path, quant_by_layer=[(Q4, Q4, Q6)] * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_gguf(path)
    assert spec.quant.down is Q6


def _write_raw(path: Path, arch: str, meta: dict[str, int], layers: dict[int, tuple]) -> None:
    """A hand-made file: `meta` keys under {arch}., expert tensors only for the given layers."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, v in meta.items():
        w.add_uint32(f"{arch}.{key}", v)
    rng = np.random.default_rng(0)
    for layer, triple in layers.items():
        for proj, q in zip(("gate", "up", "down"), triple):
            rows, ind = (H, I) if proj == "down" else (I, H)
            arr = quant.random_matrix_bytes(q, E * rows, ind, rng).reshape(E, rows, -1)
            w.add_tensor(f"blk.{layer}.ffn_{proj}_exps.weight", arr,
                         raw_dtype=GGMLQuantizationType(quant.GGML_TYPE_ID[q]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


QWEN_META = {"block_count": 4, "embedding_length": H, "expert_count": E, "expert_used_count": K,
             "expert_feed_forward_length": I}


def test_spec_from_gguf_skips_leading_dense_layers(tmp_path):
    """The default layer is the first with expert tensors: a file need not have them in blk.0."""
    path = tmp_path / "f.gguf"
    _write_raw(path, "qwen3moe", QWEN_META, {2: (Q4, Q6, Q4), 3: (Q4, Q6, Q4)})
    reader = open_gguf(path)
    spec = spec_from_gguf(reader)
    assert spec.quant.up is Q6
    assert quant_types_by_layer(reader) == {2: (Q4, Q6, Q4), 3: (Q4, Q6, Q4)}
    with pytest.raises(GgufError, match=r"no tensor blk\.0\.ffn_gate_exps\.weight.*layers 2-3 \(block_count 4\)"):
        read_layer_experts(reader, 0, spec)


def test_name_helpers():
    assert _sanitize_name("Qwen3-MoE 30B") == "qwen3_moe_30b"
    assert _sanitize_name("3x") == "m_3x"
    assert _sanitize_name("---") == "model"
    assert _fmt_layers([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_expert_stack_validates_its_shape():
    data = np.zeros((2, 4, 144), np.uint8)
    ExpertStack(Q4, data, in_dim=256, rows=4)
    with pytest.raises(ValueError, match="need"):
        ExpertStack(Q6, data, in_dim=256, rows=4)
    with pytest.raises(ValueError, match="uint8"):
        ExpertStack(Q4, data.astype(np.float32), in_dim=256, rows=4)


# --- bad files ------------------------------------------------------------


def _bad_missing(tmp):
    return tmp / "nope.gguf", "read", {}


def _bad_directory(tmp):
    return tmp, "read", {}


def _bad_empty(tmp):
    p = tmp / "empty.gguf"
    p.write_bytes(b"")
    return p, "read", {}


def _bad_random_bytes(tmp):
    p = tmp / "random.gguf"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return p, "read", {}


def _truncated(tmp, frac):
    p = tmp / "cut.gguf"
    _write(p)
    raw = p.read_bytes()
    p.write_bytes(raw[: int(len(raw) * frac)])
    return p


def _bad_truncated_half(tmp):
    return _truncated(tmp, 0.5), "read", {}


def _bad_truncated_header(tmp):
    p = tmp / "cut.gguf"
    _write(p)
    p.write_bytes(p.read_bytes()[:200])
    return p, "spec", {}


def _bad_truncated_last_byte(tmp):
    p = tmp / "cut.gguf"
    _write(p)
    raw = p.read_bytes()
    p.write_bytes(raw[:-1])
    return p, "read", {}


def _bad_layer_out_of_range(tmp):
    p = tmp / "f.gguf"
    _write(p)
    return p, "read", {"layer": 7}


def _bad_spec_layer_out_of_range(tmp):
    p = tmp / "f.gguf"
    _write(p)
    return p, "spec", {"layer": 7}


def _bad_type_not_in_spec(tmp):
    p = tmp / "f.gguf"
    _write(p, quant_by_layer=[(Q4, Q4, Q4)])
    return p, "read", {}  # the default spec says down is q6_k


def _bad_q8_0(tmp):
    p = tmp / "f.gguf"
    _write(p, quant_by_layer=[(Q4, Q4, GGMLQuantizationType.Q8_0)])
    return p, "read", {}


def _bad_f16_spec(tmp):
    p = tmp / "f.gguf"
    _write(p, quant_by_layer=[(GGMLQuantizationType.F16, Q4, Q6)])
    return p, "spec", {}


def _bad_num_experts(tmp):
    p = tmp / "f.gguf"
    _write(p)
    return p, "read", {"spec": _spec(num_experts=8)}


def _bad_intermediate(tmp):
    p = tmp / "f.gguf"
    _write(p)
    return p, "read", {"spec": _spec(intermediate_size=512)}


def _bad_hidden(tmp):
    p = tmp / "f.gguf"
    _write(p)
    return p, "read", {"spec": _spec(hidden_size=1024)}


def _bad_arch(tmp):
    p = tmp / "f.gguf"
    _write(p, arch="deepseek2")
    return p, "spec", {}


def _bad_missing_key(tmp):
    p = tmp / "f.gguf"
    _write(p, omit_keys=["qwen3moe.expert_used_count"])
    return p, "spec", {}


def _bad_missing_expert_ffn(tmp):
    p = tmp / "f.gguf"
    _write(p, omit_keys=["qwen3moe.expert_feed_forward_length"])
    return p, "spec", {}


def _bad_dense_llama(tmp):
    p = tmp / "f.gguf"
    _write(p, arch="llama", omit_keys=["llama.expert_count"])
    return p, "spec", {}


def _bad_metadata_disagrees_with_tensors(tmp):
    """olmoe's feed_forward_length fallback, but the file's tensors say otherwise."""
    p = tmp / "f.gguf"
    meta = {"embedding_length": H, "expert_count": E, "expert_used_count": K, "feed_forward_length": 2048}
    _write_raw(p, "olmoe", meta, {0: (Q4, Q4, Q4)})
    return p, "spec", {}


def _bad_incomplete_layer(tmp):
    """Layer 0 has gate and up but no down tensor."""
    p = tmp / "f.gguf"
    w = gguf.GGUFWriter(str(p), "qwen3moe")
    for key, v in QWEN_META.items():
        w.add_uint32(f"qwen3moe.{key}", v)
    arr = quant.random_matrix_bytes(Q4, E * I, H, np.random.default_rng(0)).reshape(E, I, -1)
    w.add_tensor("blk.0.ffn_gate_exps.weight", arr, raw_dtype=GGMLQuantizationType.Q4_K)
    w.add_tensor("blk.0.ffn_up_exps.weight", arr.copy(), raw_dtype=GGMLQuantizationType.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p, "read", {"spec": _spec(quant={"gate": "q4_k", "up": "q4_k", "down": "q4_k"})}


BAD_FILES = [
    # (case, builder, texts the error must contain)
    ("missing file", _bad_missing, ["nope.gguf", "does not exist"]),
    ("directory", _bad_directory, ["is a directory"]),
    ("empty file", _bad_empty, ["empty"]),
    ("not gguf", _bad_random_bytes, ["random.gguf", "not a GGUF file"]),
    ("truncated half", _bad_truncated_half, ["cut.gguf", "truncated", "re-download"]),
    ("truncated header", _bad_truncated_header, ["cut.gguf", "truncated"]),
    ("truncated last byte", _bad_truncated_last_byte, ["truncated"]),
    ("missing tensor", _bad_layer_out_of_range, ["blk.7.ffn_gate_exps.weight", "layers 0-1"]),
    ("spec layer missing", _bad_spec_layer_out_of_range, ["layer 7", "layers 0-1"]),
    (
        "type the spec does not name",
        _bad_type_not_in_spec,
        ["blk.0.ffn_down_exps.weight", "Q4_K", "quant.down is q6_k", "quant.down is q4_k", "spec-from-gguf"],
    ),
    ("q8_0 tensor", _bad_q8_0, ["blk.0.ffn_down_exps.weight", "Q8_0", "not a k-quant", "Q4_K_M"]),
    ("f16 tensor", _bad_f16_spec, ["blk.0.ffn_gate_exps.weight", "F16", "not a k-quant"]),
    ("num_experts", _bad_num_experts, ["blk.0.ffn_gate_exps.weight", "4 experts", "num_experts=8"]),
    ("intermediate", _bad_intermediate, ["blk.0.ffn_gate_exps.weight", "256 output rows", "intermediate_size=512"]),
    ("hidden", _bad_hidden, ["blk.0.ffn_gate_exps.weight", "hidden_size=1024", "input size"]),
    ("unsupported arch", _bad_arch, ["'deepseek2'", "does not support", "qwen3moe"]),
    ("missing key", _bad_missing_key, ["qwen3moe.expert_used_count", "lacks metadata"]),
    ("missing expert ffn key", _bad_missing_expert_ffn, ["qwen3moe.expert_feed_forward_length"]),
    ("dense llama", _bad_dense_llama, ["llama.expert_count", "dense llama model", "MoE layers only"]),
    ("metadata vs tensors", _bad_metadata_disagrees_with_tensors, ["blk.0.ffn_gate_exps.weight", "olmoe.feed_forward_length=2048", "inconsistent"]),
    ("incomplete layer", _bad_incomplete_layer, ["no tensor blk.0.ffn_down_exps.weight", "no complete set", "incomplete"]),
]


@pytest.mark.parametrize("case,builder,texts", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_files_give_clear_errors(tmp_path, case, builder, texts):
    path, action, kw = builder(tmp_path)
    with pytest.raises(GgufError) as info:
        if action == "read":
            read_layer_experts(path, kw.get("layer", 0), kw.get("spec", _spec()))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MixedQuantWarning)
                spec_from_gguf(path, layer=kw.get("layer"))
    msg = str(info.value)
    for text in texts:
        assert text in msg, f"{case}: {text!r} not in error: {msg}"
    assert isinstance(info.value, ValueError)


def test_quant_types_by_layer_rejects_non_k_quant(tmp_path):
    p = tmp_path / "f.gguf"
    _write(p, quant_by_layer=[(Q4, Q4, Q4), (Q4, GGMLQuantizationType.Q8_0, Q4)])
    with pytest.raises(GgufError, match=r"blk\.1\.ffn_up_exps\.weight is Q8_0"):
        quant_types_by_layer(p)


def test_per_layer_feed_forward_length_array(tmp_path):
    """Some converters write feed_forward_length as one entry per layer: the spec's layer's entry counts."""
    path = tmp_path / "mixtral.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, v in (("embedding_length", H), ("expert_count", E), ("expert_used_count", K)):
        w.add_uint32(f"llama.{key}", v)
    w.add_array("llama.feed_forward_length", [999, I])
    rng = np.random.default_rng(0)
    for proj, rows, ind in (("gate", I, H), ("up", I, H), ("down", H, I)):
        arr = quant.random_matrix_bytes(Q4, E * rows, ind, rng).reshape(E, rows, -1)
        w.add_tensor(f"blk.1.ffn_{proj}_exps.weight", arr, raw_dtype=GGMLQuantizationType.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    spec = spec_from_gguf(path)
    assert spec.intermediate_size == I and spec.norm_topk_prob is True
