"""Whole GGUF models on the CPU: one reader, layers grouped by quant mix, one spec per mix with a
name that says its shape and mix, router weights, and a clear message where CuPy is missing."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
from gguf import GGUFReader

from ferrum_gen import gguf_io, model as model_mod
from ferrum_gen.gguf_io import GgufError, read_layer_experts, spec_from_gguf
from ferrum_gen.model import plan_model, read_router_weight
from ferrum_gen.spec import QuantType, SpecError
from ferrum_gen.testing import write_moe_gguf

Q4, Q6 = QuantType.Q4_K, QuantType.Q6_K
H, I, E, K = 512, 256, 8, 2
# like a Q4_K_M file: Q6_K down in some layers, Q4_K in the others, not in blocks
MIXES = [(Q4, Q4, Q6), (Q4, Q4, Q4), (Q4, Q4, Q4), (Q4, Q4, Q6), (Q4, Q4, Q6)]
HAVE_CUPY = importlib.util.find_spec("cupy") is not None


def _write(path, quant_by_layer=MIXES, **kw):
    return write_moe_gguf(path, arch="qwen3moe", hidden_size=H, intermediate_size=I, num_experts=E, top_k=K,
                          quant_by_layer=quant_by_layer, rng=np.random.default_rng(5), **kw)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "mixed.gguf"
    return path, _write(path)


def test_layers_are_grouped_by_quant_mix_with_one_spec_each(mixed) -> None:
    path, _ = mixed
    plan = plan_model(path)
    assert [s.name for s in plan.specs] == [f"qwen3moe_h{H}_i{I}_e{E}_k{K}_q4_k_q4_k_q6_k",
                                            f"qwen3moe_h{H}_i{I}_e{E}_k{K}_q4_k_q4_k_q4_k"]
    assert plan.layers_of(plan.specs[0]) == [0, 3, 4]
    assert plan.layers_of(plan.specs[1]) == [1, 2]
    assert plan.layers == [0, 1, 2, 3, 4]
    for layer, mix in enumerate(MIXES):
        spec = plan.spec_of(layer)
        assert (spec.quant.gate, spec.quant.up, spec.quant.down) == mix
        read_layer_experts(path, layer, spec)  # each layer reads with its mix's spec
    assert "layers 0, 3-4" in plan.describe() and "layers 1-2" in plan.describe()


def test_the_file_is_parsed_once(mixed, monkeypatch) -> None:
    path, _ = mixed
    opened = []
    real = gguf_io.GGUFReader

    class Counting(real):
        def __init__(self, *args, **kwargs):
            opened.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf_io, "GGUFReader", Counting)
    reader = gguf_io.open_gguf(path)
    plan = plan_model(reader)
    for layer in plan.layers:
        read_layer_experts(reader, layer, plan.spec_of(layer))
        read_router_weight(reader, layer, plan.spec_of(layer))
    assert len(opened) == 1


def test_plan_of_chosen_layers_and_of_missing_ones(mixed) -> None:
    path, _ = mixed
    plan = plan_model(path, layers=[1, 2])
    assert [s.quant.down for s in plan.specs] == [Q4] and plan.layers == [1, 2]
    with pytest.raises(GgufError, match=r"no MoE expert tensors for layer\(s\) \[7\].*0-4"):
        plan_model(path, layers=[0, 7])
    with pytest.raises(KeyError, match="layer 9 is not a MoE layer"):
        plan.spec_of(9)


def test_plan_adds_the_gpu_arch_to_the_specs(mixed) -> None:
    path, _ = mixed
    plan = plan_model(path, arch="sm_80")
    assert all({a.value for a in s.target_archs} == {"sm_80", "sm_90"} for s in plan.specs)
    assert all(s.name.endswith(("q6_k", "q4_k")) for s in plan.specs)


def test_router_weight_reads_back_exactly(tmp_path, mixed) -> None:
    path, written = mixed
    plan = plan_model(path)
    for layer in plan.layers:
        w = read_router_weight(path, layer, plan.spec_of(layer))
        assert w.dtype == np.float32 and w.shape == (E, H) and w.flags.c_contiguous
        assert np.array_equal(w, written[layer]["router"])
    f16 = tmp_path / "f16-router.gguf"
    written16 = _write(f16, quant_by_layer=MIXES[:1], router_dtype="f16")
    w = read_router_weight(f16, 0, plan.specs[0])
    assert np.array_equal(w, written16[0]["router"].astype(np.float32))


def test_router_weight_errors_name_the_tensor(tmp_path, mixed) -> None:
    path, _ = mixed
    plan = plan_model(path)
    no_router = tmp_path / "no-router.gguf"
    _write(no_router, quant_by_layer=MIXES[:1], with_router=False)
    with pytest.raises(GgufError, match=r"no router tensor blk\.0\.ffn_gate_inp\.weight"):
        read_router_weight(no_router, 0, plan.specs[0])
    other = plan.specs[0].model_copy(update={"num_experts": 16})
    with pytest.raises(GgufError, match=r"ne=\[512, 8\] but spec .* needs \[512, 16\]"):
        read_router_weight(path, 0, other)


def test_spec_names_are_valid_and_distinct_for_every_mix_and_dtype(mixed) -> None:
    path, _ = mixed
    names = set()
    for dtype in ("bf16", "f16", "f32"):
        for layer in (0, 1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", gguf_io.MixedQuantWarning)
                names.add(spec_from_gguf(path, layer=layer, activation_dtype=dtype).name)
    assert len(names) == 6
    long = gguf_io.default_spec_name("a" * 80, "h99999_i99999_e1024_k32", (Q6, Q6, Q6), gguf_io.ActivationDtype.F32)
    assert len(long) <= 64 and long.endswith("_h99999_i99999_e1024_k32_q6_k_q6_k_q6_k_f32")


def test_mixed_quant_note_points_at_the_cli_flags(mixed) -> None:
    path, _ = mixed
    with pytest.warns(gguf_io.MixedQuantWarning) as rec:
        spec_from_gguf(path)
    msg = str(rec[0].message)
    assert "--layer" in msg and "--name" in msg and "spec_from_gguf(" not in msg


def test_a_bad_name_blames_the_name_not_the_file(mixed) -> None:
    path, _ = mixed
    with pytest.raises(SpecError) as err:
        spec_from_gguf(path, name="Bad-Name")
    assert str(err.value).startswith("name:") and str(path) not in str(err.value)


@pytest.mark.skipif(HAVE_CUPY, reason="CuPy is installed: the missing-CuPy message cannot be seen here")
def test_load_model_without_cupy_says_what_to_install(mixed) -> None:
    from ferrum_gen import load_model

    with pytest.raises(Exception, match=r"install ferrum-gen\[cuda12\] or \[cuda13\]"):
        load_model(mixed[0], max_tokens=16)


def test_importing_ferrum_gen_needs_neither_torch_nor_cupy() -> None:
    import subprocess
    import sys

    code = ("import sys, ferrum_gen, ferrum_gen.model, ferrum_gen.cli; "
            "assert 'torch' not in sys.modules and 'cupy' not in sys.modules; print(ferrum_gen.load_model.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "load_model"


def test_plan_reads_through_a_given_reader(mixed) -> None:
    reader = GGUFReader(mixed[0], "r")
    assert model_mod.plan_model(reader).file == str(mixed[0])
