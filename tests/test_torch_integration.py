"""torch in a real engine: CUDA-graph capture under torch, the custom op, MoeBlock, torch.compile,
and agreement with transformers' Qwen3MoeSparseMoeBlock. GPU only (`make gpu-test`).

Every check is against the float64 reference (ferrum_gen.reference) on weights read from a
small two-mix GGUF file, the way an engine loads them. Skipped, with the reason shown, where
torch, CuPy or a GPU is missing.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch integration tests need it")
cp = pytest.importorskip("cupy", reason="CuPy is not installed: install ferrum-gen[cuda12] or [cuda13]")

from ferrum_gen import reference  # noqa: E402
from ferrum_gen.quant import dequantize  # noqa: E402
from ferrum_gen.spec import QuantType  # noqa: E402
from ferrum_gen.testing import write_moe_gguf  # noqa: E402

try:
    _GPUS = cp.cuda.runtime.getDeviceCount() if torch.cuda.is_available() else 0
    _WHY = "" if _GPUS else "no CUDA GPU visible to torch and CuPy"
except Exception as err:  # noqa: BLE001 - any failure means: no usable GPU here
    _GPUS, _WHY = 0, f"CUDA unavailable: {type(err).__name__}: {err}"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_GPUS == 0, reason=f"torch GPU tests skipped: {_WHY}")]

# hidden != 2 * intermediate and hidden != intermediate, so that a fused or transposed expert
# layout in transformers can be told apart by shape alone
H, I, E, K = 512, 768, 8, 2
Q4, Q6 = QuantType.Q4_K, QuantType.Q6_K
MIXES = [(Q4, Q4, Q6), (Q4, Q4, Q4)]
MAX_TOKENS = 64
TOL = 1e-2
"""||out - ref|| / ||ref|| for bf16 activations, as in the GPU suite."""


# --- the model file, its specs and bundles, built once ------------------------------


class Model:
    def __init__(self, tmp_path):
        from ferrum_gen.bundle import KernelBundle
        from ferrum_gen.gguf_io import open_gguf
        from ferrum_gen.model import plan_model

        self.path = tmp_path / "small-qwen3moe.gguf"
        self.written = write_moe_gguf(self.path, arch="qwen3moe", hidden_size=H, intermediate_size=I,
                                      num_experts=E, top_k=K, quant_by_layer=MIXES,
                                      rng=np.random.default_rng(9))
        self.reader = open_gguf(self.path)
        self.plan = plan_model(self.reader)
        assert len(self.plan.specs) == 2
        self.bundles = {s.name: KernelBundle.load(s) for s in self.plan.specs}
        self._dense: dict[int, reference.DenseExperts] = {}

    def bundle(self, layer: int):
        return self.bundles[self.plan.spec_of(layer).name]

    def weights(self, layer: int) -> dict[str, np.ndarray]:
        """float32 dequantised expert weights, (E, rows, in_dim), and the router [E, H]."""
        w = self.written[layer]
        qg, qu, qd = MIXES[layer]
        return {"gate": dequantize(qg, w["gate"], (E, I, H)), "up": dequantize(qu, w["up"], (E, I, H)),
                "down": dequantize(qd, w["down"], (E, H, I)), "router": np.asarray(w["router"], np.float32)}

    def dense(self, layer: int) -> reference.DenseExperts:
        if layer not in self._dense:
            w = self.written[layer]
            self._dense[layer] = reference.DenseExperts.from_quantized(self.plan.spec_of(layer), w["gate"], w["up"],
                                                                       w["down"])
        return self._dense[layer]

    def reference(self, layer: int, x: torch.Tensor, logits: np.ndarray | None = None) -> np.ndarray:
        """float64 output for hidden states x [T, H]; logits default to x @ router.T in float64."""
        spec = self.plan.spec_of(layer)
        x64 = x.detach().float().cpu().numpy().astype(np.float64)
        if logits is None:
            logits = x64 @ np.asarray(self.written[layer]["router"], dtype=np.float64).T
        return reference.moe_layer(x64, logits, self.dense(layer), spec.top_k, spec.norm_topk_prob)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    return Model(tmp_path_factory.mktemp("torch"))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(1234)


def hidden(T: int, gen: torch.Generator, batch: tuple[int, ...] = ()) -> torch.Tensor:
    return torch.randn(*batch, T, H, device="cuda", generator=gen).to(torch.bfloat16)


def rel_err(out: torch.Tensor, ref: np.ndarray) -> float:
    got = out.detach().float().cpu().numpy().astype(np.float64).reshape(ref.shape)
    assert not np.isnan(got).any(), "NaN in the output: an element was not written"
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


# --- CUDA graphs under torch -----------------------------------------------------------


@pytest.mark.parametrize("capture_error_mode", ["global", "thread_local"])
@pytest.mark.parametrize("path,tokens", [("decode", 4), ("prefill", 48)])
def test_torch_cuda_graph_capture_replays_on_new_inputs(model: Model, gen, path: str, tokens: int,
                                                        capture_error_mode: str) -> None:
    from ferrum_gen.runtime import MoeLayer

    layer = MoeLayer.from_gguf(model.bundle(0), model.reader, 0, max_tokens=MAX_TOKENS)
    x = hidden(tokens, gen)
    logits = torch.randn(tokens, E, device="cuda", generator=gen) * 2
    out = torch.empty_like(x)
    # warm up on a side stream, as torch asks before a capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer.forward(x, logits, out=out, path=path)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=capture_error_mode):
        layer.forward(x, logits, out=out, path=path)  # on torch's current (capturing) stream
    torch.randn(4, device="cuda")  # a failed capture leaves torch's RNG unusable; this one must not

    for _ in range(2):
        x.copy_(hidden(tokens, gen))
        logits.copy_(torch.randn(tokens, E, device="cuda", generator=gen) * 2)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = model.reference(0, x, logits.cpu().numpy().astype(np.float64))
        assert rel_err(out, ref) <= TOL


def test_cupy_stream_capture_of_the_prefill_path(model: Model) -> None:
    from ferrum_gen.runtime import MoeLayer

    rng = np.random.default_rng(3)
    T = 40
    layer = MoeLayer.from_gguf(model.bundle(1), model.reader, 1, max_tokens=MAX_TOKENS)

    def inputs():
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
        bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return bits, (2.0 * rng.standard_normal((T, E))).astype(np.float32)

    bits, logits = inputs()
    x_gpu, logits_gpu = cp.asarray(bits), cp.asarray(logits)
    out = cp.empty((T, H), dtype=cp.uint16)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        layer.forward(x_gpu, logits_gpu, out=out, path="prefill")
        stream.begin_capture()
        layer.forward(x_gpu, logits_gpu, out=out, path="prefill")
        graph = stream.end_capture()
    for _ in range(2):
        bits, logits = inputs()
        x_gpu.set(bits)
        logits_gpu.set(logits)
        out.fill(0x7FC0)  # bf16 NaN
        graph.launch(stream)
        stream.synchronize()
        x = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
        got = torch.from_numpy(cp.asnumpy(out).view(np.int16)).view(torch.bfloat16)
        assert rel_err(got, model.reference(1, x, logits.astype(np.float64))) <= TOL


# --- the custom op and MoeBlock -------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1])
def test_moe_block_matches_the_float64_reference(model: Model, gen, layer: int) -> None:
    from ferrum_gen.torch import MoeBlock

    block = MoeBlock.from_gguf(model.reader, layer, MAX_TOKENS, bundle=model.bundle(layer))
    assert block.spec.name == model.plan.spec_of(layer).name
    for T in (1, 5, 16, 17, MAX_TOKENS):  # both sides of decode_max_tokens
        x = hidden(T, gen)
        out = block(x)
        assert out.shape == x.shape and out.dtype == torch.bfloat16
        assert rel_err(out, model.reference(layer, x)) <= TOL, f"T={T}"


def test_moe_block_keeps_leading_dimensions(model: Model, gen) -> None:
    from ferrum_gen.torch import MoeBlock

    block = MoeBlock.from_gguf(model.reader, 0, MAX_TOKENS, bundle=model.bundle(0))
    x = hidden(6, gen, batch=(3,))
    out = block(x)
    assert out.shape == (3, 6, H)
    assert rel_err(out.reshape(-1, H), model.reference(0, x.reshape(-1, H))) <= TOL


def test_moe_block_from_a_path_derives_its_spec(model: Model, gen) -> None:
    from ferrum_gen.torch import MoeBlock

    block = MoeBlock.from_gguf(str(model.path), 1, MAX_TOKENS)
    assert block.spec == model.plan.spec_of(1)
    x = hidden(9, gen)
    assert rel_err(block(x), model.reference(1, x)) <= TOL


def test_moe_block_from_a_layer_and_a_router_tensor(model: Model, gen) -> None:
    from ferrum_gen.runtime import MoeLayer
    from ferrum_gen.torch import MoeBlock

    layer = MoeLayer.from_gguf(model.bundle(0), model.reader, 0, max_tokens=MAX_TOKENS)
    block = MoeBlock(layer, torch.from_numpy(np.asarray(model.written[0]["router"])).cuda())
    x = hidden(7, gen)
    assert rel_err(block(x), model.reference(0, x)) <= TOL
    with pytest.raises(ValueError, match=r"router_weight has shape"):
        MoeBlock(layer, torch.zeros(E, H + 1))


def test_custom_op_schema_and_fake_implementation(model: Model, gen) -> None:
    from ferrum_gen.torch import MoeBlock

    block = MoeBlock.from_gguf(model.reader, 0, MAX_TOKENS, bundle=model.bundle(0))
    x = hidden(8, gen)
    torch.library.opcheck(torch.ops.ferrum_gen.moe_forward.default, (x, block.router_logits(x), block.handle),
                          test_utils=("test_schema", "test_faketensor"))


def test_a_collected_block_unregisters_its_layer(model: Model, gen) -> None:
    import gc

    from ferrum_gen.torch import MoeBlock

    block = MoeBlock.from_gguf(model.reader, 0, MAX_TOKENS, bundle=model.bundle(0))
    x = hidden(2, gen)
    logits = block.router_logits(x)
    handle = block.handle
    del block
    gc.collect()
    with pytest.raises(ValueError, match=f"no MoeLayer is registered under handle {handle}"):
        torch.ops.ferrum_gen.moe_forward(x, logits, handle)


def test_torch_compile_fullgraph_matches_eager(model: Model, gen) -> None:
    from ferrum_gen.torch import MoeBlock

    class DecoderMlp(torch.nn.Module):
        """What an engine's decoder layer does around the MoE block: a residual around it.

        No norm in front: inductor computes a LayerNorm in another order than eager, and a
        bf16 rounding difference in the router's input can flip a near-tie in the top-k,
        which would make the compiled and eager outputs differ for reasons outside the op."""

        def __init__(self, block: MoeBlock):
            super().__init__()
            self.block = block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.block(x)

    net = DecoderMlp(MoeBlock.from_gguf(model.reader, 0, MAX_TOKENS, bundle=model.bundle(0)))
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)  # fullgraph: any graph break is an error
    with torch.no_grad():
        for T in (4, 32):
            x = hidden(T, gen)
            eager = net(x)
            got = compiled(x)
            torch.cuda.synchronize()
            ref = eager.float().cpu().numpy().astype(np.float64)
            assert rel_err(got, ref) <= TOL, f"T={T}"
    explanation = torch._dynamo.explain(net)(hidden(4, gen))
    assert explanation.graph_break_count == 0, explanation.break_reasons


# --- transformers' block on the same dequantised weights ---------------------------------


def _copy_into_transformers_block(block, w: dict[str, np.ndarray]) -> None:
    """Copies float32 weights into Qwen3MoeSparseMoeBlock, whatever its (known) parameter layout."""
    params = dict(block.named_parameters())
    shapes = {name: tuple(p.shape) for name, p in params.items()}

    def put(name: str, value: np.ndarray) -> None:
        with torch.no_grad():
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))

    if "gate.weight" not in params:
        pytest.skip(f"unknown transformers router layout (no gate.weight): {shapes}")
    put("gate.weight", w["router"])
    if "experts.0.gate_proj.weight" in params:  # one module per expert (transformers 4)
        for e in range(E):
            put(f"experts.{e}.gate_proj.weight", w["gate"][e])
            put(f"experts.{e}.up_proj.weight", w["up"][e])
            put(f"experts.{e}.down_proj.weight", w["down"][e])
        return
    if "experts.gate_up_proj" in params and "experts.down_proj" in params:  # fused stacks (transformers 5)
        gate_up = np.concatenate([w["gate"], w["up"]], axis=1)  # (E, 2I, H): gate rows, then up rows
        if shapes["experts.gate_up_proj"] == (E, 2 * I, H):
            put("experts.gate_up_proj", gate_up)
        elif shapes["experts.gate_up_proj"] == (E, H, 2 * I):
            put("experts.gate_up_proj", gate_up.transpose(0, 2, 1))
        else:
            pytest.skip(f"unknown transformers gate_up_proj shape {shapes['experts.gate_up_proj']}")
        if shapes["experts.down_proj"] == (E, H, I):
            put("experts.down_proj", w["down"])
        elif shapes["experts.down_proj"] == (E, I, H):
            put("experts.down_proj", w["down"].transpose(0, 2, 1))
        else:
            pytest.skip(f"unknown transformers down_proj shape {shapes['experts.down_proj']}")
        return
    pytest.skip(f"unknown transformers expert layout: {shapes}")


@pytest.mark.parametrize("layer", [0, 1])
def test_moe_block_matches_transformers_qwen3_moe_block(model: Model, gen, layer: int) -> None:
    pytest.importorskip("transformers", reason="transformers is not installed")
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from ferrum_gen.torch import MoeBlock

    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                            norm_topk_prob=True, hidden_act="silu")
    theirs = Qwen3MoeSparseMoeBlock(config).to(device="cuda", dtype=torch.float32).eval()
    _copy_into_transformers_block(theirs, model.weights(layer))
    ours = MoeBlock.from_gguf(model.reader, layer, MAX_TOKENS, bundle=model.bundle(layer))
    with torch.no_grad():
        for T in (3, 40):
            x = hidden(T, gen, batch=(1,))
            result = theirs(x.float())
            want = result[0] if isinstance(result, tuple) else result
            got = ours(x)
            ref = want.double().cpu().numpy().reshape(T, H)
            assert rel_err(got.reshape(T, H), ref) <= TOL, f"T={T}"
            # and transformers agrees with the float64 reference on these weights
            assert rel_err(want.reshape(T, H), model.reference(layer, x.reshape(T, H))) <= 1e-3
