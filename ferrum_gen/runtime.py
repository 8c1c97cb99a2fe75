"""The MoE forward pass on the GPU with a spec's generated kernels.

    bundle = KernelBundle.load(load_spec("qwen3moe"))
    layer = MoeLayer.from_gguf(bundle, "model.gguf", layer=0, max_tokens=4096)
    out = layer.forward(x, router_logits)   # CuPy arrays or torch CUDA tensors (DLPack, no copies)

Paths:
- decode (T <= spec.decode_max_tokens): router -> fused gate+up+SiLU GEMV -> down GEMV with
  the weighted combine fused. No host synchronisation and no allocation when `out` is
  given, so a CUDA graph can capture it.
- prefill (larger T): router -> align (device) -> grouped gate+up+SiLU GEMM -> grouped
  down GEMM -> combine. Also free of host synchronisation.
- host routing (FERRUM_MOE_HOST_ROUTE=1): routing and the align plan computed in numpy
  and uploaded, for debugging; it synchronises.

Input rules: x is [T, H] in the spec's activation dtype (bf16: a torch.bfloat16 tensor, or
a CuPy uint16/int16 array holding bf16 bits); router_logits is [T, E] in float32, float16
or bf16; both C-contiguous on the layer's device, T <= max_tokens. A token whose logits
hold NaN or +inf (or are all -inf) gets a NaN output row; other tokens are unaffected.
`check_finite=True` raises instead (that synchronises).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import reference
from .bundle import Kernel, KernelBundle
from .quant import row_bytes, to_gpu_layout
from .settings import Settings, get_settings
from .spec import ActivationDtype, MoeSpec, QuantType

MAX_GRID_Y = 65535
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


def _cupy():
    import cupy

    return cupy


@dataclass
class DeviceProjection:
    """One projection's expert stack on the GPU: the GGUF bytes in the kernels' layout."""

    quant: QuantType
    data: Any  # cupy uint8
    d: Any  # cupy float16 (Q6_K block scales) or a 1-element placeholder (Q4_K)

    @classmethod
    def upload(cls, quant: QuantType, stack: np.ndarray, placeholder: Any) -> "DeviceProjection":
        cp = _cupy()
        packed, d = to_gpu_layout(quant, stack)
        return cls(quant, cp.asarray(packed.reshape(-1)), cp.asarray(d.reshape(-1)) if d is not None else placeholder)


@functools.lru_cache(maxsize=1)
def _bf16_bits_to_f32():
    # bf16 bits are the top half of the float32 of the same value
    return _cupy().ElementwiseKernel("uint16 x", "float32 y", "y = __uint_as_float(((unsigned int)x) << 16)",
                                     "ferrum_bf16_bits_to_f32")


class _Inputs:
    """Validates and wraps user tensors; remembers whether to hand back torch tensors."""

    def __init__(self, device_id: int):
        self.device_id = device_id

    def as_cupy(self, t: Any, name: str) -> tuple[Any, bool]:
        cp = _cupy()
        mod = type(t).__module__
        if mod.startswith("torch"):
            import torch

            if not t.is_cuda:
                raise ValueError(f"{name} is a torch tensor on {t.device}: move it to cuda:{self.device_id} first")
            if t.device.index != self.device_id:
                raise ValueError(f"{name} is on {t.device} but this layer's weights are on cuda:{self.device_id}")
            if not t.is_contiguous():
                raise ValueError(f"{name} is not contiguous: pass {name}.contiguous()")
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            return cp.from_dlpack(t), True
        if isinstance(t, cp.ndarray):
            if t.device.id != self.device_id:
                raise ValueError(f"{name} is on GPU {t.device.id} but this layer's weights are on GPU {self.device_id}")
            if not t.flags.c_contiguous:
                raise ValueError(f"{name} is not C-contiguous: pass cupy.ascontiguousarray({name})")
            return t, False
        raise TypeError(
            f"{name} must be a CuPy array or a torch CUDA tensor, got {mod}.{type(t).__name__}"
            + (" (host memory: copy it to the GPU first)" if mod.startswith("numpy") else "")
        )


_ACT_CUPY = {ActivationDtype.F32: "float32", ActivationDtype.F16: "float16", ActivationDtype.BF16: "uint16"}
_MMA_CUPY = {ActivationDtype.F32: "float16", ActivationDtype.F16: "float16", ActivationDtype.BF16: "uint16"}


class MoeLayer:
    """One MoE layer: weights on the GPU, scratch sized once for max_tokens, two forward paths."""

    def __init__(self, bundle: KernelBundle, gate: np.ndarray, up: np.ndarray, down: np.ndarray, max_tokens: int,
                 settings: Settings | None = None):
        cp = _cupy()
        spec = bundle.spec
        self.spec: MoeSpec = spec
        self.bundle = bundle
        self.settings = settings or get_settings()
        self.settings.check_block_size(spec.prefill.block_sizes)
        if max_tokens <= 0:
            raise ValueError(f"max_tokens is {max_tokens}: give the largest token count forward() will see")
        self.max_tokens = max_tokens
        self.device_id = cp.cuda.Device().id
        self._inputs = _Inputs(self.device_id)
        H, I, E, k = spec.hidden_size, spec.intermediate_size, spec.num_experts, spec.top_k
        for name, stack, qt, rows, in_dim in (
            ("gate", gate, spec.quant.gate, I, H),
            ("up", up, spec.quant.up, I, H),
            ("down", down, spec.quant.down, H, I),
        ):
            want = (E, rows, row_bytes(qt, in_dim))
            if stack.dtype != np.uint8 or tuple(stack.shape) != want:
                raise ValueError(
                    f"{name} stack has shape {tuple(stack.shape)} {stack.dtype}; spec {spec.name} needs uint8 {want} "
                    f"({qt.value} rows of {in_dim} weights)"
                )
        self._placeholder = cp.zeros(1, dtype=cp.float16)
        self.gate = DeviceProjection.upload(spec.quant.gate, gate, self._placeholder)
        self.up = DeviceProjection.upload(spec.quant.up, up, self._placeholder)
        self.down = DeviceProjection.upload(spec.quant.down, down, self._placeholder)

        self.k_router = bundle.one("router")
        self.k_align = bundle.one("align")
        self.k_gemv_gate_up = bundle.one("gemv_gate_up_silu")
        self.k_gemv_down = bundle.one("gemv_down_combine")
        self.k_gemm_gate_up = {k_.launch["block_size"]: k_ for k_ in bundle.family("gemm_gate_up_silu")}
        self.k_gemm_down = {k_.launch["block_size"]: k_ for k_ in bundle.family("gemm_down")}
        self.k_combine = bundle.one("combine")
        dev = cp.cuda.Device(self.device_id)
        self._sm_count = dev.attributes["MultiProcessorCount"]
        self._smem_per_sm = dev.attributes["MaxSharedMemoryPerMultiprocessor"]
        self._resident: dict[str, int] = {}
        for kern in list(self.k_gemm_gate_up.values()) + list(self.k_gemm_down.values()):
            self._set_smem(kern)
            self._resident[kern.uri] = self._resident_ctas(kern, kern.launch["smem_bytes"][bundle.arch])

        P = max_tokens * k
        max_bs = max(spec.prefill.block_sizes)
        self._cap = P + E * (max_bs - 1)
        act, mma = _ACT_CUPY[spec.activation_dtype], _MMA_CUPY[spec.activation_dtype]
        self.ids = cp.empty(P, dtype=cp.int32)
        self.weights = cp.empty(P, dtype=cp.float32)
        self.logits32 = cp.empty((max_tokens, E), dtype=cp.float32)
        self.sorted_ids = cp.empty(self._cap, dtype=cp.int32)
        self.block_expert = cp.empty(self._cap // min(spec.prefill.block_sizes) + 1, dtype=cp.int32)
        self.plan = cp.zeros(2, dtype=cp.int32)
        self.pairs_by_token = cp.empty(P, dtype=cp.int32)
        self.a_sorted = cp.empty((self._cap, I), dtype=mma)
        self.y_sorted = cp.empty((self._cap, H), dtype=act)
        self.x_mma = cp.empty((max_tokens, H), dtype=cp.float16) if spec.activation_dtype is ActivationDtype.F32 else None
        self.a_decode = cp.empty((min(max_tokens, spec.decode_max_tokens) * k, I), dtype=cp.float32)
        self.profile: dict[str, list[float]] = {}

    # --- construction ---------------------------------------------------------

    @classmethod
    def from_gguf(cls, bundle: KernelBundle, path: Any, layer: int, max_tokens: int,
                  settings: Settings | None = None) -> "MoeLayer":
        from .gguf_io import read_layer_experts

        experts = read_layer_experts(path, layer, bundle.spec)
        return cls(bundle, experts.gate.data, experts.up.data, experts.down.data, max_tokens, settings)

    # --- launching --------------------------------------------------------------

    def _set_smem(self, kern: Kernel) -> None:
        cp = _cupy()
        smem = kern.launch["smem_bytes"][self.bundle.arch]
        cp.cuda.driver.funcSetAttribute(kern.function.ptr, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)

    def _resident_ctas(self, kern: Kernel, smem: int) -> int:
        cp = _cupy()
        try:
            per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kern.function.ptr, kern.launch["threads"], smem)
        except Exception:  # noqa: BLE001 - older CuPy: estimate from shared memory alone
            per_sm = max(1, min(8, self._smem_per_sm // max(smem + 1024, 1)))
        return max(1, per_sm) * self._sm_count

    def _persistent_grid(self, kern: Kernel, num_pairs: int) -> tuple[int, int]:
        """(CTAs, dynamic shared memory) for a GEMM: no more CTAs than the largest plan has tiles."""
        bs = kern.launch["block_size"]
        tiles = math.ceil((num_pairs + self.spec.num_experts * (bs - 1)) / bs) * kern.launch["n_tiles"]
        return min(tiles, self._resident[kern.uri]), kern.launch["smem_bytes"][self.bundle.arch]

    @staticmethod
    def _launch(kern: Kernel, grid: tuple[int, ...], args: tuple, stream: Any, smem: int = 0) -> None:
        kern.function(grid, (kern.launch["threads"],), args, shared_mem=smem, stream=stream)

    def _phase(self, name: str, stream: Any, events: list | None) -> None:
        if events is not None:
            ev = _cupy().cuda.Event()
            ev.record(stream)
            events.append((name, ev))

    # --- the forward pass -------------------------------------------------------

    def forward(self, x: Any, router_logits: Any, *, out: Any = None, path: str = "auto",
                check_finite: bool = False) -> Any:
        cp = _cupy()
        spec = self.spec
        H, E, k = spec.hidden_size, spec.num_experts, spec.top_k
        xc, torch_io = self._inputs.as_cupy(x, "x")
        lc, _ = self._inputs.as_cupy(router_logits, "router_logits")
        if xc.ndim != 2 or xc.shape[1] != H:
            raise ValueError(f"x has shape {tuple(xc.shape)}; spec {spec.name} needs [T, {H}]")
        T = xc.shape[0]
        self._check_act_dtype(xc, x, "x")
        if lc.ndim != 2 or lc.shape != (T, E):
            raise ValueError(f"router_logits has shape {tuple(lc.shape)}; it must be [T, E] = [{T}, {E}]")
        if T > self.max_tokens:
            raise ValueError(f"x has {T} tokens, more than this layer's max_tokens={self.max_tokens}: build the layer "
                             "with a larger max_tokens or split the batch")
        if path not in ("auto", "decode", "prefill"):
            raise ValueError(f"path={path!r}: use 'auto', 'decode' or 'prefill'")
        use_decode = path == "decode" or (path == "auto" and T <= spec.decode_max_tokens)
        if use_decode and T * k > MAX_GRID_Y:
            raise ValueError(f"the decode path takes at most {MAX_GRID_Y // k} tokens; use path='prefill'")

        stream = self._stream_for(x, torch_io)
        out_c, out_user = self._output(out, T, x, torch_io)
        if T == 0:
            return out_user
        capturing = stream.is_capturing() if hasattr(stream, "is_capturing") else False
        events: list | None = [] if (self.settings.profile and not capturing) else None
        with cp.cuda.Device(self.device_id), stream:
            self._phase("start", stream, events)
            logits = self._logits_f32(lc, router_logits, T)
            if check_finite:
                self._raise_on_non_finite(logits)
            host = self.settings.host_route
            if host:
                self._route_on_host(logits, T, plan=not use_decode)
            else:
                self._launch(self.k_router, (math.ceil(T / self.k_router.launch["tokens_per_cta"]),),
                             (logits, self.ids, self.weights, np.int32(T)), stream)
            self._phase("route", stream, events)
            if use_decode:
                self._decode(xc, out_c, T, stream, events)
            else:
                self._prefill(xc, out_c, T, stream, events, plan_ready=host)
        if events is not None:
            self._record_profile("decode" if use_decode else "prefill", events)
        return out_user

    def _decode(self, xc: Any, out_c: Any, T: int, stream: Any, events: list | None) -> None:
        cp = _cupy()
        spec = self.spec
        P = T * spec.top_k
        if self.a_decode.shape[0] < P:  # decode at a large T (tests, comparisons): grow once
            self.a_decode = cp.empty((P, spec.intermediate_size), dtype=cp.float32)
        kg = self.k_gemv_gate_up
        self._launch(kg, (math.ceil(spec.intermediate_size / kg.launch["rows_per_cta"]), P),
                     (xc, self.ids, self.gate.data, self.gate.d, self.up.data, self.up.d, self.a_decode), stream)
        self._phase("gate_up_silu", stream, events)
        kd = self.k_gemv_down
        self._launch(kd, (math.ceil(spec.hidden_size / kd.launch["rows_per_cta"]), T),
                     (self.a_decode, self.ids, self.weights, self.down.data, self.down.d, out_c), stream)
        self._phase("down_combine", stream, events)

    def _prefill(self, xc: Any, out_c: Any, T: int, stream: Any, events: list | None, plan_ready: bool) -> None:
        cp = _cupy()
        spec = self.spec
        P = T * spec.top_k
        override = self.settings.block_size_override
        if not plan_ready:
            self._launch(self.k_align, (1,), (self.ids, np.int32(P), np.int32(override or 0), self.sorted_ids,
                                              self.block_expert, self.plan, self.pairs_by_token), stream)
        self._phase("align", stream, events)
        if self.x_mma is not None:
            x_in = self.x_mma[:T]
            cp.copyto(x_in, xc)
        else:
            x_in = xc
        sizes = [override] if override else list(spec.prefill.block_sizes)
        for bs in sizes:
            kern = self.k_gemm_gate_up[bs]
            grid, smem = self._persistent_grid(kern, P)
            self._launch(kern, (grid,), (x_in, self.sorted_ids, self.block_expert, self.plan, np.int32(P),
                                         self.gate.data, self.gate.d, self.up.data, self.up.d, self.a_sorted),
                         stream, smem)
        self._phase("gate_up_silu", stream, events)
        for bs in sizes:
            kern = self.k_gemm_down[bs]
            grid, smem = self._persistent_grid(kern, P)
            self._launch(kern, (grid,), (self.a_sorted, self.block_expert, self.plan, self.down.data, self.down.d,
                                         self.y_sorted), stream, smem)
        self._phase("down", stream, events)
        self._launch(self.k_combine, (T,), (self.y_sorted, self.pairs_by_token, self.weights, out_c), stream)
        self._phase("combine", stream, events)

    # --- helpers ------------------------------------------------------------------

    def _check_act_dtype(self, xc: Any, original: Any, name: str) -> None:
        want = self.spec.activation_dtype
        ok = {ActivationDtype.F32: ("float32",), ActivationDtype.F16: ("float16",),
              ActivationDtype.BF16: ("uint16", "int16")}[want]
        if str(xc.dtype) not in ok:
            shown = getattr(original, "dtype", xc.dtype)
            raise TypeError(f"{name} has dtype {shown}; spec {self.spec.name} was generated for {want.value} activations"
                            + (" (a torch.bfloat16 tensor or a CuPy uint16 array of bf16 bits)"
                               if want is ActivationDtype.BF16 else ""))

    def _logits_f32(self, lc: Any, original: Any, T: int) -> Any:
        cp = _cupy()
        if lc.dtype == cp.float32:
            return lc
        dst = self.logits32[:T]
        torch_bf16 = type(original).__module__.startswith("torch") and str(original.dtype) == "torch.bfloat16"
        if torch_bf16 or lc.dtype in (cp.uint16, cp.int16):
            _bf16_bits_to_f32()(lc.view(cp.uint16), dst)
        elif lc.dtype == cp.float16 or lc.dtype == cp.float64:
            cp.copyto(dst, lc, casting="same_kind")
        else:
            raise TypeError(f"router_logits has dtype {lc.dtype}: use float32, float16 or bfloat16")
        return dst

    @staticmethod
    def _raise_on_non_finite(logits: Any) -> None:
        """The tokens that would get a NaN row: NaN or +inf in their logits, or all -inf."""
        cp = _cupy()
        bad = cp.isnan(logits).any(axis=1) | cp.isposinf(logits).any(axis=1) | cp.isneginf(logits).all(axis=1)
        if bool(bad.any()):
            tokens = cp.asnumpy(cp.nonzero(bad)[0])
            shown = ", ".join(map(str, tokens[:8])) + (", ..." if len(tokens) > 8 else "")
            raise ValueError(f"router_logits hold NaN or inf (or are all -inf) for {len(tokens)} token(s): {shown}")

    def _stream_for(self, x: Any, torch_io: bool) -> Any:
        cp = _cupy()
        if torch_io:
            import torch

            with warnings.catch_warnings():  # the replacement, Stream.from_external, is newer than CuPy 13
                warnings.simplefilter("ignore", DeprecationWarning)
                return cp.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream, self.device_id)
        return cp.cuda.get_current_stream()

    def _output(self, out: Any, T: int, x: Any, torch_io: bool) -> tuple[Any, Any]:
        cp = _cupy()
        H = self.spec.hidden_size
        if out is None:
            if torch_io:
                import torch

                out = torch.empty((T, H), dtype=x.dtype, device=x.device)
            else:
                out = cp.empty((T, H), dtype=_ACT_CUPY[self.spec.activation_dtype])
        out_c, _ = self._inputs.as_cupy(out, "out")
        if out_c.shape != (T, H):
            raise ValueError(f"out has shape {tuple(out_c.shape)}; it must be [{T}, {H}]")
        self._check_act_dtype(out_c, out, "out")
        return out_c, out

    def _route_on_host(self, logits: Any, T: int, plan: bool) -> None:
        cp = _cupy()
        spec = self.spec
        ids, w = reference.route_f32(cp.asnumpy(logits), spec.top_k, spec.norm_topk_prob)
        self.ids[: T * spec.top_k].set(np.ascontiguousarray(ids.reshape(-1), dtype=np.int32))
        self.weights[: T * spec.top_k].set(np.ascontiguousarray(w.reshape(-1), dtype=np.float32))
        if plan:
            counts = reference.expert_counts(ids, spec.num_experts)
            bs = reference.pick_block_size(counts, spec.prefill.block_sizes, spec.prefill.padding_budget,
                                           self.settings.block_size_override)
            p = reference.align(ids, spec.num_experts, bs)
            self.sorted_ids[: p.num_padded].set(p.sorted_ids.astype(np.int32))
            self.block_expert[: len(p.block_expert)].set(p.block_expert.astype(np.int32))
            self.plan.set(np.array([p.num_padded, bs], dtype=np.int32))
            self.pairs_by_token[: T * spec.top_k].set(p.pairs_by_token.astype(np.int32))

    # --- profiling ------------------------------------------------------------------

    def _record_profile(self, path: str, events: list) -> None:
        cp = _cupy()
        events[-1][1].synchronize()
        for (_, a), (name, b) in zip(events, events[1:]):
            self.profile.setdefault(f"{path}/{name}", []).append(cp.cuda.get_elapsed_time(a, b) * 1000.0)
        total = cp.cuda.get_elapsed_time(events[0][1], events[-1][1]) * 1000.0
        self.profile.setdefault(f"{path}/total", []).append(total)

    def profile_table(self) -> str:
        """Per-phase GPU time (CUDA events, microseconds) over the profiled forward calls."""
        if not self.profile:
            return "no profile recorded (set FERRUM_MOE_PROFILE=1)"
        rows = [f"{'phase':<28} {'calls':>6} {'median us':>10} {'mean us':>10}"]
        for name, vals in self.profile.items():
            rows.append(f"{name:<28} {len(vals):>6} {float(np.median(vals)):>10.1f} {float(np.mean(vals)):>10.1f}")
        return "\n".join(rows)
