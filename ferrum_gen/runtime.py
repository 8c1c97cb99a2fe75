"""The MoE forward pass on the GPU with a spec's generated kernels.

    bundle = KernelBundle.load(load_spec("qwen3moe"))
    layer = MoeLayer.from_gguf(bundle, "model.gguf", layer=0, max_tokens=4096)
    out = layer.forward(x, router_logits)   # CuPy arrays or torch CUDA tensors (DLPack, no copies)

Paths (which one serves T, and which kernel variants, is `MoeLayer.choose(T)`: the card's
tuning table when there is one, else the default rule in ferrum_gen/tuning.py):
- grouped (by default T <= spec.decode_max_tokens, where the spec has its kernels): router ->
  gate+up+SiLU -> down with the weighted combine fused, each CTA one distinct expert's 16-row
  tile times all of that expert's tokens on tensor cores, so each expert is read once. Its
  gate+up variant r8 (up to 8 tokens, where the tuning table picks it) is also the router:
  two launches. Otherwise, on sm_90+ with cuda-bindings, gate+up and down are launched as
  programmatic dependents (ferrum_gen/launch.py; FERRUM_MOE_PDL=0 turns it off): each starts
  while the kernel before it ends.
- fused (one or two tokens, sm_90, where the tuning table picks it): one launch for the whole
  layer, a kernel per token count. A grid of every resident CTA; each routes the tokens (and is a
  programmatic dependent of the kernel before it), copies its share of the gate+up and down
  weights into shared memory at once, multiplies by integer dot products, and the CTAs meet once
  between gate+up and down (templates/fused_moe.cu.j2). All CTAs must be resident together: another
  kernel holding SMs at the same time delays it until it can be.
- decode (the GEMVs, one (token, expert) pair per grid row: the default where grouped is
  missing): router -> fused gate+up+SiLU GEMV -> down GEMV with the weighted combine fused.
  Both decode-sized paths run with no host synchronisation and no allocation when `out` is
  given, so a CUDA graph can capture them.
- prefill (larger T where the spec has no stream kernels): router -> align (device; one CTA, or
  above 4096 pairs align_count's per-chunk counts then a CTA per chunk) -> grouped gate+up+SiLU
  GEMM -> grouped down GEMM -> combine. Up to route_align's max_tokens (16) one CTA routes and
  aligns in one launch (routes_and_aligns). Also free of host synchronisation.
- stream (by default T > spec.decode_max_tokens, where the spec has its kernels): prefill's
  launches with the stream kernels: weights as the tensor-core A operand, dequantised in
  registers once per aligned block, streamed through a ring in shared memory (on sm_90 the
  mma.sync variants' weights by tensor copies, through tensor maps the layer builds once); align
  uses the variant's block size.
- host routing (FERRUM_MOE_HOST_ROUTE=1): routing and the align plan computed in numpy
  and uploaded, for debugging; it synchronises, and the routing gate+up variant gives way to
  its family's default.

Input rules: x is [T, H] in the spec's activation dtype (bf16: a torch.bfloat16 tensor, or
a CuPy uint16/int16 array holding bf16 bits); router_logits is [T, E] in float32, float16
or bf16; both C-contiguous on the layer's device, T <= max_tokens. A token whose logits
hold NaN or +inf (or are all -inf) gets a NaN output row; other tokens are unaffected.
`check_finite=True` raises instead (that synchronises).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from . import reference, tuning
from .bundle import Kernel, KernelBundle
from .families import align as align_family
from .families import fused_moe as fused_family
from .families import grouped as grouped_family
from .families import stream as stream_family
from .launch import DependentLauncher, pdl_unavailable, swizzled_rows_tensor_map
from .quant import QuantType, row_bytes, to_gpu_layout
from .settings import Settings, get_settings
from .spec import ActivationDtype, MoeSpec

CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
FUSED = fused_family.FAMILY

PHASES = {
    "decode": ("route", "gate_up_silu", "down_combine"),
    "grouped": ("route", "gate_up_silu", "down_combine"),
    "fused": ("moe",),
    "prefill": ("route", "align", "gate_up_silu", "down", "combine"),
    "stream": ("route", "align", "gate_up_silu", "down", "combine"),
}
"""The phases of each path, in launch order; forward(stop_after=...) cuts after one of them."""

PDL_PATHS = ("grouped", "stream", "fused")
"""The paths whose kernels, the first of a call included, wait for the kernel before them
(fg::grid_wait), so that they may be launched as programmatic dependents (MoeLayer.uses_pdl)."""
COMBINE_PLAIN_FROM = 128
"""From this many tokens the stream path launches the combine plainly, once the down kernel has
ended, rather than as its programmatic dependent (the next call's first kernel still is the combine's): on
an H200 that made qwen3moe and olmoe 1-2 % faster at T = 128-512 under both routings, and it made no difference
measurable at T <= 64 (docs/perf-notes.md, forty-ninth session). Why the early launch cost time there was not
established."""

REPO_GENERATED = Path(__file__).resolve().parent.parent / "generated"
"""The repository's generated/ directory (a source checkout or editable install): its tuning tables."""


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


def decode_token_cap(spec: MoeSpec, table: tuning.TuningTable | None, max_tokens: int) -> int:
    """The most tokens the decode-sized paths (decode, grouped) serve by default: the rule's bound
    or the table's largest bucket on one of them, at most max_tokens. Their scratch is sized for it
    and grows if a path is forced beyond."""
    tuned = [e.bucket for e in table.entries if e.path not in tuning.ALIGNED_PATHS] if table else []
    return min(max_tokens, max([spec.decode_max_tokens, *tuned]))


def block_size_cap(spec: MoeSpec, table: tuning.TuningTable | None, max_tokens: int) -> int:
    """The largest block size align is told to use up to max_tokens by default: the spec's largest,
    or a tuned stream variant's (w64 to w160) in a bucket that starts at or below max_tokens, or without a
    table the default rule's stream variant at max_tokens (its block grows with T). The aligned scratch is
    padded for it and grows if a larger one is forced."""
    sizes = list(spec.prefill.block_sizes)
    variant_sizes = stream_family.variant_block_sizes(spec)
    if table is not None:
        buckets = [e.bucket for e in table.entries]
        for e in table.entries:
            if e.path in tuning.LOCKSTEP_PATHS and tuning.bucket_edges(e.bucket, buckets)[0] <= max_tokens:
                sizes.append(variant_sizes[e.variants[tuning.PATH_FAMILIES[e.path][0]]])
    elif max_tokens > spec.decode_max_tokens:
        sizes.append(variant_sizes.get(stream_family.rule_variant(spec, max_tokens), 0))
    return max(sizes)


def aligned_rows(spec: MoeSpec, max_tokens: int, block_size: int) -> int:
    """Rows of the expert-sorted buffers: the most align can fill in a call of up to max_tokens tokens
    at any block size b up to block_size that the spec's GEMMs or stream variants use. With b, an
    expert of n pairs takes ceil(n / b) blocks, so the m = min(E, pairs) experts that can have pairs
    take at most m + (pairs - m) // b blocks; that count grows with the pairs, so the largest call
    bounds every smaller one."""
    pairs = max_tokens * spec.top_k
    used = min(spec.num_experts, pairs)
    return max(b * (used + (pairs - used) // b) for b in {*aligned_block_sizes(spec), block_size} if b <= block_size)


@functools.lru_cache(maxsize=16)
def aligned_block_sizes(spec: MoeSpec) -> frozenset[int]:
    """Every block size align can be told to use for the spec: its prefill GEMMs' and its stream variants'.
    Cached: enumerating the stream kernels takes ~0.3 ms, and every aligned forward checks its rows."""
    return frozenset({*spec.prefill.block_sizes, *stream_family.variant_block_sizes(spec).values()})


@functools.lru_cache(maxsize=16)
def block_pairs(spec: MoeSpec) -> Mapping[str, int]:
    """align's block_pair (families/align.py pair_arg) of each of the spec's mixed stream variants. Cached, as
    aligned_block_sizes: every stream call passes one to align."""
    sizes = stream_family.variant_block_sizes(spec)
    return MappingProxyType({name: align_family.pair_arg(sizes[small], sizes[large], cost)
                             for name, (small, large, cost) in stream_family.mixed_variants(spec).items()})


def aligned_shapes(spec: MoeSpec, max_tokens: int, block_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """align's outputs and a for calls of up to max_tokens at block sizes up to block_size: the sorted
    slots (aligned_rows), a block's expert, count of rows of a (the stream kernels') and first row of
    a each, and a, which has a row per real slot plus block_size - 1 rows past the last, which the
    last block's padding slots read (the prefill GEMM copies whole blocks) and nothing writes."""
    rows = aligned_rows(spec, max_tokens, block_size)
    blocks = (rows // min(spec.prefill.block_sizes) + 1,)
    return {
        "sorted_ids": ((rows,), "int32"),
        "block_expert": (blocks, "int32"),
        "block_ready": (blocks, "int32"),
        "block_a_row": (blocks, "int32"),
        "a_sorted": ((max_tokens * spec.top_k + block_size - 1, spec.intermediate_size),
                     _MMA_CUPY[spec.activation_dtype]),
    }


def scratch_shapes(spec: MoeSpec, max_tokens: int, decode_tokens: int,
                   block_size: int | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every scratch buffer a MoeLayer holds for max_tokens, name -> (shape, dtype): the routing,
    the aligned paths' expert-sorted rows for align's block_size (default: the spec's largest; see
    block_size_cap), the decode-sized paths' rows for decode_tokens tokens (their largest default
    or tuned token count: decode_token_cap), and the grouped down's counters."""
    H, I, E, k = spec.hidden_size, spec.intermediate_size, spec.num_experts, spec.top_k
    pairs = max_tokens * k
    shapes = {
        "ids": ((pairs,), "int32"),
        "weights": ((pairs,), "float32"),
        "logits32": ((max_tokens, E), "float32"),
        **aligned_shapes(spec, max_tokens, block_size or max(spec.prefill.block_sizes)),
        # the down kernels' rows by pair (t * k + j), not by sorted slot: no padding rows, and a token's k
        # rows side by side for the combine. With prefill.sorted_x it is also x_sorted (x's rows in align's
        # order, the gather_x kernel's), which the wgmma gate+up kernels read before their down overwrites
        # it by a's row (stream.y_by_row); pair_row then says where each pair's row is. The tensor copies
        # of a block's rows past the last read zeros, so x_sorted needs no padding rows either.
        "y_pairs": ((pairs, H), _ACT_CUPY[spec.activation_dtype]),
        **({"pair_row": ((pairs,), "int32")} if stream_family.sorted_x(spec) else {}),
        # each token's x summed over each 32-element sub-block (a high and a low bf16 part), the router's, for
        # the mma.sync stream gate+up kernels that add Q4_K's min terms apart (stream.x_sums)
        **({"x_sums": ((max_tokens, H // 32), "uint32")} if stream_family.x_sums(spec) else {}),
        "plan": ((2,), "int32"),
        "a_decode": ((decode_tokens * k, I), "float32"),
        "y_grouped": ((decode_tokens * k, H), "float32"),
        "tile_counters": ((math.ceil(H / 16),), "int32"),  # grouped down: zero between calls
        # o1i: per pair, gate+up's CTAs that stored its rows of a (the router zeroes a call's)
        "pair_ready": ((grouped_family.INT_DOT_MAX_PAIRS, grouped_family.PAIR_READY_STRIDE), "int32"),
        "fused_sync": ((2,), "int32"),  # the fused kernel's arrivals: zero between calls
        "tile_claims": ((2,), "int32"),  # the wgmma stream kernels' claimed tiles (gate+up, down): zero between calls
        "align_counts": ((align_family.cta_count(pairs), E), "int32"),  # align_count's per-chunk histograms
    }
    if spec.activation_dtype is ActivationDtype.F32:  # the prefill GEMMs' f16 copy of x
        shapes["x_mma"] = ((max_tokens, H), "float16")
    return shapes


ZEROED_SCRATCH = ("plan", "tile_counters", "fused_sync", "tile_claims")
"""Scratch that must start at zero (the align plan's counts, the grouped down's tile counters, the
fused kernel's arrivals and the wgmma stream kernels' tile claims, which each call leaves at zero); the
rest is written before it is read."""


def shapes_bytes(shapes: Mapping[str, tuple[tuple[int, ...], str]]) -> int:
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in shapes.values())


class MoeLayer:
    """One MoE layer: weights on the GPU, scratch sized once for max_tokens, two forward paths."""

    def __init__(self, bundle: KernelBundle, gate: np.ndarray, up: np.ndarray, down: np.ndarray, max_tokens: int,
                 settings: Settings | None = None, tuning_table: Any = "auto"):
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
        H, I, E = spec.hidden_size, spec.intermediate_size, spec.num_experts
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
        self.k_align_count = bundle.one("align_count")
        self.k_route_align = bundle.one("route_align")
        self.k_combine = bundle.one("combine")
        self.k_gather_x = bundle.one("gather_x") if stream_family.sorted_x(spec) else None
        dev = cp.cuda.Device(self.device_id)
        self._sm_count = dev.attributes["MultiProcessorCount"]
        self._smem_per_sm = dev.attributes["MaxSharedMemoryPerMultiprocessor"]
        self.gpu_name = cp.cuda.runtime.getDeviceProperties(self.device_id)["name"].decode()
        self._args = {e["uri"]: tuple((a["name"], a["type"]) for a in e["args"]) for e in bundle.manifest["kernels"]}
        self.variants, self._default_variants = self._usable_variants()
        self._resident: dict[str, int] = {}
        for family in tuning.TUNED_FAMILIES:
            for kernels in self.variants.get(family, {}).values():
                for kern in kernels:
                    if isinstance(kern.launch["smem_bytes"], dict):  # per-arch dynamic shared memory
                        self._set_smem(kern)
        for family in (f for p in (*tuning.ALIGNED_PATHS, "fused") for f in tuning.PATH_FAMILIES[p]):
            # the persistent grids of the aligned paths and the fused kernel are sized by occupancy
            for kernels in self.variants.get(family, {}).values():
                for kern in kernels:
                    self._resident[kern.uri] = self._resident_ctas(kern, kern.launch["smem_bytes"][bundle.arch])
        self._stream_uris = {k.uri for family in ("stream_gate_up_silu", "stream_down")
                             for ks in self.variants.get(family, {}).values() for k in ks}
        self.tuning = self._find_tuning(tuning_table)
        self.pdl_off_reason = "FERRUM_MOE_PDL=0" if not self.settings.pdl else pdl_unavailable(bundle.arch)
        """None when the grouped and stream paths launch their kernels as programmatic dependents; else why not."""
        self._dependent = DependentLauncher() if self.pdl_off_reason is None else None

        self._scratch = scratch_shapes(spec, max_tokens, decode_token_cap(spec, self.tuning, max_tokens),
                                       block_size_cap(spec, self.tuning, max_tokens))
        for name, (shape, dtype) in self._scratch.items():
            setattr(self, name, (cp.zeros if name in ZEROED_SCRATCH else cp.empty)(shape, dtype=dtype))
        if "x_mma" not in self._scratch:
            self.x_mma = None
        if "pair_row" not in self._scratch:
            self.pair_row = cp.zeros(1, dtype=cp.int32)  # the combine's argument, unread
        if "x_sums" not in self._scratch:
            self.x_sums = None
        self.x_sorted = self.y_pairs.view(_MMA_CUPY[spec.activation_dtype]) if stream_family.sorted_x(spec) else None
        self._act_maps = self._make_act_maps()
        self.profile: dict[str, list[float]] = {}

    @property
    def weight_bytes(self) -> int:
        """GPU bytes of the three expert stacks (the GGUF blocks in the kernels' layout)."""
        return sum(p.data.nbytes + (p.d.nbytes if p.d is not self._placeholder else 0)
                   for p in (self.gate, self.up, self.down))

    @property
    def scratch_bytes(self) -> int:
        """GPU bytes of the scratch buffers now (scratch_shapes; the decode-sized paths' rows grow
        if one is forced beyond the tokens they were sized for, the aligned paths' if a stream
        variant of a larger block size is)."""
        return sum(getattr(self, name).nbytes for name in self._scratch)

    def __repr__(self) -> str:
        mib = 1 << 20
        return (f"MoeLayer(spec={self.spec.name}, arch={self.bundle.arch}, max_tokens={self.max_tokens}, "
                f"weights={self.weight_bytes / mib:.1f} MiB, scratch={self.scratch_bytes / mib:.1f} MiB, "
                f"tuning={self.tuning.source if self.tuning else tuning.DEFAULT_RULE}, pdl={self.pdl_status})")

    # --- construction ---------------------------------------------------------

    @classmethod
    def from_gguf(cls, bundle: KernelBundle, path: Any, layer: int, max_tokens: int,
                  settings: Settings | None = None, tuning_table: Any = "auto") -> "MoeLayer":
        from .gguf_io import read_layer_experts

        experts = read_layer_experts(path, layer, bundle.spec)
        return cls(bundle, experts.gate.data, experts.up.data, experts.down.data, max_tokens, settings,
                   tuning_table=tuning_table)

    def _usable_variants(self) -> tuple[dict[str, dict[str, list[Kernel]]], dict[str, str]]:
        """family -> variant -> its kernels (one per block size for the GEMMs), for the variants this
        card's arch can run (a variant runs only where all of its kernels fit), and each family's default."""
        arch = self.bundle.arch
        variants: dict[str, dict[str, list[Kernel]]] = {}
        defaults: dict[str, str] = {}
        unusable: set[tuple[str, str]] = set()
        for e in self.bundle.manifest["kernels"]:
            fam, var = e["family"], e["variant"]
            if fam not in tuning.TUNED_FAMILIES:
                continue
            if e["default"]:
                defaults[fam] = var
            if e["archs"] is not None and arch not in e["archs"]:
                unusable.add((fam, var))
            variants.setdefault(fam, {}).setdefault(var, []).append(self.bundle.kernels[e["uri"]])
        for fam, var in unusable:
            del variants[fam][var]
        return variants, defaults

    def _find_tuning(self, tuning_table: Any) -> tuning.TuningTable | None:
        if tuning_table is None:
            return None
        if isinstance(tuning_table, tuning.TuningTable):
            table = tuning_table
        elif tuning_table == "auto":
            search = [d for d in (self.bundle.bundle_dir, REPO_GENERATED / self.spec.name) if d]
            return tuning.find_table(self.spec, self.gpu_name, search)
        else:
            table = tuning.TuningTable.load(Path(tuning_table))
        table.check_matches(self.spec, self.gpu_name)
        return table

    # --- choosing ---------------------------------------------------------------

    def choose(self, tokens: int, path: str = "auto", variants: Mapping[str, str] | None = None) -> tuning.Choice:
        """The path and kernel variants that serve `tokens` (the tuning table's, else the default rule).

        variants: family -> variant to force some of the path's families (the tuner and the tests).
        """
        if path not in ("auto", *tuning.PATHS):
            raise ValueError(f"path={path!r}: use 'auto' or one of {tuning.PATHS}")
        choice = tuning.choose(self.spec, tokens, self.variants, self._default_variants, self.tuning, path)
        # A fused kernel serves one token count: the call takes the kernel of the chosen one's copy form
        # for its count. Where none serves the call (too many tokens, routing on the host), 'auto' takes
        # the default rule's path and a forced path fails.
        refusal = None
        if choice.path == "fused":
            served = self._fused_variant(choice.variants[FUSED], tokens)
            if served is None:
                refusal = self._fused_refusal(tokens)
            elif served != choice.variants[FUSED]:
                choice = dataclasses.replace(choice, variants={FUSED: served})
        if refusal is not None and path == "auto":
            choice = tuning.choose(self.spec, tokens, self.variants, self._default_variants, None, path)
        elif refusal is not None and not variants:
            raise ValueError(f"the fused path: {refusal}; use path='grouped', or 'auto'")
        # a variant that cannot serve this call (r8 beyond its tokens, or with routing on the host)
        # gives way to its family's default
        fitting = {f: v if self.variant_refusal(f, v, tokens) is None else self._default_variants[f]
                   for f, v in choice.variants.items()}
        if fitting != dict(choice.variants):
            choice = dataclasses.replace(choice, variants=fitting)
        if not variants:
            return choice
        for family, variant in variants.items():
            if family not in tuning.PATH_FAMILIES[choice.path]:
                raise ValueError(f"variants names {family!r}, which is not a tuned family of the {choice.path} "
                                 f"path {tuning.PATH_FAMILIES[choice.path]}")
            if variant not in self.variants[family]:
                raise ValueError(f"{family} has no variant {variant!r} usable on {self.bundle.arch}; it has "
                                 f"{sorted(self.variants[family])}")
            refusal = self.variant_refusal(family, variant, tokens)
            if refusal is not None:
                raise ValueError(f"{family} variant {variant!r} {refusal}")
        merged = {**choice.variants, **variants}
        if choice.path in tuning.LOCKSTEP_PATHS and len(set(merged.values())) > 1:
            raise ValueError(f"variants {merged}: the {choice.path} path's families take one variant together "
                             f"(the block size); name the same one for each")
        return dataclasses.replace(choice, variants=merged, source="forced")

    def variant_refusal(self, family: str, variant: str, tokens: int) -> str | None:
        """Why a variant cannot serve `tokens` tokens here, or None when it can."""
        launch = self.variants[family][variant][0].launch
        if tokens > launch.get("max_tokens", math.inf):
            return f"serves at most {launch['max_tokens']} tokens, not {tokens}"
        if tokens != launch.get("tokens", tokens):
            return f"serves exactly {launch['tokens']} token{'s' if launch['tokens'] > 1 else ''}, not {tokens}"
        if launch.get("routes") and self.settings.host_route:
            return "routes on the device, and FERRUM_MOE_HOST_ROUTE=1 asks for routing on the host"
        return None

    def _fused_variant(self, variant: str, tokens: int) -> str | None:
        """The fused kernel for a call of `tokens` tokens: `variant` where it serves them, else the one
        that fills its rings the same way for that count, else the first that serves it; None where
        none does."""
        serving = [v for v in self.variants[FUSED] if self.variant_refusal(FUSED, v, tokens) is None]
        if variant in serving:
            return variant
        form = self.variants[FUSED][variant][0].launch["bulk_copies"]
        same = [v for v in serving if self.variants[FUSED][v][0].launch["bulk_copies"] == form]
        return (same or serving or [None])[0]

    def _fused_refusal(self, tokens: int) -> str:
        """Why no fused kernel serves a call of `tokens` tokens."""
        counts = {v: kerns[0].launch["tokens"] for v, kerns in self.variants[FUSED].items()}
        if tokens not in counts.values():
            return f"its kernels serve {' or '.join(map(str, sorted(set(counts.values()))))} tokens, not {tokens}"
        for_count = next(v for v, n in counts.items() if n == tokens)
        return f"its kernel {self.variant_refusal(FUSED, for_count, tokens)}"

    def routes_in_gate_up(self, choice: tuning.Choice) -> bool:
        """Whether the chosen gate+up kernel is also the router (no router launch)."""
        if choice.path != "grouped":
            return False
        (kern,) = self.variants["grouped_gate_up_silu"][choice.variants["grouped_gate_up_silu"]]
        return bool(kern.launch.get("routes"))

    def choose_path(self, tokens: int) -> str:
        """The path path='auto' takes for `tokens`: the one rule the runtime, tests and bench share."""
        return self.choose(tokens).path

    def phases(self, path: str) -> tuple[str, ...]:
        return PHASES[path]

    def selected_kernels(self, tokens: int, path: str = "auto") -> dict[str, str]:
        """family -> kernel uri(s) (comma-separated for one-per-block-size families) for `tokens`."""
        choice = self.choose(tokens, path)
        if self.routes_and_aligns(tokens, choice):
            out = {"route_align": self.k_route_align.uri}
        else:
            out = {} if self.routes_in_gate_up(choice) or choice.path == "fused" else {"router": self.k_router.uri}
            if choice.path in tuning.ALIGNED_PATHS:
                if self._align_chunks(tokens) > 1:
                    out["align_count"] = self.k_align_count.uri
                out["align"] = self.k_align.uri
        for family, variant in choice.variants.items():
            out[family] = ",".join(k.uri for k in self.variants[family][variant])
        if choice.path in tuning.ALIGNED_PATHS:
            out["combine"] = self.k_combine.uri
        return out

    def launch_count(self, tokens: int, path: str = "auto") -> int:
        """Kernel launches of one forward call with float32 router logits."""
        choice = self.choose(tokens, path)
        if choice.path == "fused":
            return 1
        if choice.path in ("decode", "grouped"):
            return 2 if self.routes_in_gate_up(choice) else 3
        if choice.path in tuning.LOCKSTEP_PATHS:  # a mixed variant's two kernels a family
            family = tuning.PATH_FAMILIES[choice.path][0]
            per_gemm = len(self.variants[family][choice.variants[family]])
        else:
            per_gemm = 1 if self._block_size(choice) else len(self.spec.prefill.block_sizes)
        convert_x = 1 if self.x_mma is not None else 0
        aligned_in_routing = self.settings.host_route or self.routes_and_aligns(tokens, choice)
        align = 0 if aligned_in_routing else 1 + (self._align_chunks(tokens) > 1)
        gather_x = 1 if choice.path in tuning.LOCKSTEP_PATHS and any(
            kern.launch.get("y_by_row") for kern in self.variants["stream_down"][choice.variants["stream_down"]]) else 0
        return 1 + align + convert_x + gather_x + 2 * per_gemm + 1

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

    def _launch(self, kern: Kernel, grid: tuple[int, ...], stream: Any, smem: int = 0, dependent: bool = False,
                **args: Any) -> None:
        """Launch with arguments by name, passed in the order of the kernel's manifest entry.

        dependent: as a programmatic dependent of the kernel before it in the stream (the kernel
        must call fg::grid_wait before touching that kernel's results); only where PDL is in use.
        """
        declared = self._args[kern.uri]
        names = {n for n, _ in declared}
        if set(args) != names:
            raise TypeError(f"{kern.uri}: missing arguments {sorted(names - set(args))}, "
                            f"unexpected {sorted(set(args) - names)}")
        if dependent and self._dependent is not None:
            self._dependent.launch(kern.function.ptr, grid, kern.launch["threads"], smem, stream.ptr, [
                (int(args[n]), True) if t == "int" else (args[n].data.ptr, False) for n, t in declared])
            return
        values = tuple(np.int32(args[n]) if t == "int" else args[n] for n, t in declared)
        kern.function(grid, (kern.launch["threads"],), values, shared_mem=smem, stream=stream)

    @property
    def pdl_status(self) -> str:
        """What the bench and the tuner record: "on", or why programmatic dependent launch is off."""
        return "on" if self.pdl_off_reason is None else self.pdl_off_reason

    def uses_pdl(self, choice: tuning.Choice) -> bool:
        """Whether this call's kernels are launched as programmatic dependents, where PDL is usable
        (pdl_off_reason). The first (the router, or the fused kernel) is then a dependent of whatever
        precedes the layer in the stream: it waits for that kernel's end before it reads anything,
        so only its launch overlaps that kernel (and the layer's last kernel lets the next launch
        start early: grouped down, the combine, the fused kernel). After the router (whose ids the
        grouped down reads before it waits for gate+up; the stream path's align reads them):
        - grouped path: gate+up and down (o1i after o1i: down waits for its pair's rows of a, which o1i
          gate+up counts on pair_ready, rather than for the gate+up grid);
        - stream path: align (and align_count; or route_align, which routes too), gate+up, down and
          combine; down copies its first weights before it waits (stream.cuh's EARLY_WEIGHTS).
        Not the prefill path, whose GEMM kernels do not wait, nor a grouped gate+up that routes
        (down would read ids before they are written), nor host routing (ids come by copies)."""
        return (self._dependent is not None and choice.path in PDL_PATHS and not self.settings.host_route
                and not self.routes_in_gate_up(choice))

    def _phase(self, name: str, stream: Any, events: list | None) -> None:
        if events is not None:
            ev = _cupy().cuda.Event()
            ev.record(stream)
            events.append((name, ev))

    # --- the forward pass -------------------------------------------------------

    def forward(self, x: Any, router_logits: Any, *, out: Any = None, path: str = "auto",
                check_finite: bool = False, stop_after: str | None = None,
                variants: Mapping[str, str] | None = None) -> Any:
        """out [T, H] = the MoE layer applied to x [T, H] with router_logits [T, E].

        path: "auto" (the tuning table, else the default rule; see choose()), "decode",
        "grouped", "prefill" or "stream". stop_after: a phase name (phases(path)): launch only up to and including it
        (benchmarks cut the graph there; the output is then not written). variants: force some
        families' kernel variants (see choose()).
        """
        cp = _cupy()
        spec = self.spec
        H, E, k = spec.hidden_size, spec.num_experts, spec.top_k
        stream = self._stream_for(x)
        # Converting torch tensors inside their own stream's context keeps DLPack's stream
        # handshake on that stream: on another (the legacy one) it would break graph capture.
        with cp.cuda.Device(self.device_id), stream:
            xc, torch_io = self._inputs.as_cupy(x, "x")
            lc, _ = self._inputs.as_cupy(router_logits, "router_logits")
            if xc.ndim != 2 or xc.shape[1] != H:
                raise ValueError(f"x has shape {tuple(xc.shape)}; spec {spec.name} needs [T, {H}]")
            T = xc.shape[0]
            self._check_act_dtype(xc, x, "x")
            if lc.ndim != 2 or lc.shape != (T, E):
                raise ValueError(f"router_logits has shape {tuple(lc.shape)}; it must be [T, E] = [{T}, {E}]")
            if T > self.max_tokens:
                raise ValueError(f"x has {T} tokens, more than this layer's max_tokens={self.max_tokens}: build the "
                                 "layer with a larger max_tokens or split the batch")
            choice = self.choose(T, path, variants)
            if choice.path == "decode" and not tuning.decode_possible(spec, T):
                raise ValueError(f"the decode path takes at most {tuning.MAX_DECODE_PAIRS // k} tokens; "
                                 "use path='prefill'")
            if stop_after is not None and stop_after not in PHASES[choice.path]:
                raise ValueError(f"stop_after={stop_after!r}: the {choice.path} path's phases are "
                                 f"{PHASES[choice.path]}")
            out_c, out_user = self._output(out, T, x, torch_io)
            if T == 0:
                return out_user
            capturing = stream.is_capturing() if hasattr(stream, "is_capturing") else False
            events: list | None = [] if (self.settings.profile and not capturing) else None
            self._phase("start", stream, events)
            logits = self._logits_f32(lc, router_logits, T)
            if check_finite:
                self._raise_on_non_finite(logits)
            if choice.path == "fused":  # one launch, which routes too
                self._fused(xc, out_c, T, choice, stream, events, stop_after, logits=logits)
            else:
                host = self.settings.host_route
                block_size = self._block_size(choice)
                if choice.path in tuning.ALIGNED_PATHS:
                    self._fit_aligned_scratch(block_size)
                sums = self._router_sum_args(xc, T, choice)
                routes_and_aligns = self.routes_and_aligns(T, choice)
                if self.routes_in_gate_up(choice):
                    pass  # the gate+up kernel routes (its launch is the route phase's too)
                elif routes_and_aligns:  # align's plan too: the align phase then launches nothing
                    self._launch(self.k_route_align, self._routing_grid(self.k_route_align, 1, sums), stream,
                                 dependent=self.uses_pdl(choice), logits=logits, ids=self.ids, weights=self.weights,
                                 num_tokens=T, **sums, **self._align_outputs(choice))
                elif host:
                    self._route_on_host(logits, T, choice.path in tuning.ALIGNED_PATHS, block_size, self._block_pair(choice))
                    if sums.get("num_sum_tokens"):  # the router for the sums alone
                        self._launch(self.k_router, self._routing_grid(self.k_router, 0, sums), stream,
                                     logits=logits, ids=self.ids, weights=self.weights, num_tokens=0,
                                     pair_ready=self.pair_ready, **sums)
                else:
                    routing_ctas = math.ceil(T / self.k_router.launch["tokens_per_cta"])
                    self._launch(self.k_router, self._routing_grid(self.k_router, routing_ctas, sums), stream,
                                 dependent=self.uses_pdl(choice), logits=logits, ids=self.ids, weights=self.weights,
                                 num_tokens=T, pair_ready=self.pair_ready, **sums)
                self._phase("route", stream, events)
                if stop_after != "route":
                    if choice.path in tuning.ALIGNED_PATHS:
                        run = functools.partial(self._prefill, plan_ready=host or routes_and_aligns)
                    else:
                        run = {"decode": self._decode,
                               "grouped": functools.partial(self._grouped, logits=logits)}[choice.path]
                    run(xc, out_c, T, choice, stream, events, stop_after)
        if events is not None and stop_after is None:
            self._record_profile(choice.path, events)
        return out_user

    def _steps(self, stream: Any, events: list | None, stop_after: str | None,
               steps: list[tuple[str, Callable[[], None]]]) -> None:
        """Run the phases in order, each followed by its profiling event, up to `stop_after`."""
        for name, launch in steps:
            launch()
            self._phase(name, stream, events)
            if name == stop_after:
                return

    def _decode(self, xc: Any, out_c: Any, T: int, choice: tuning.Choice, stream: Any, events: list | None,
                stop_after: str | None) -> None:
        spec = self.spec
        P = T * spec.top_k
        if self.a_decode.shape[0] < P:  # decode forced at a large T (tests, comparisons): grow once
            self.a_decode = _cupy().empty((P, spec.intermediate_size), dtype=_cupy().float32)
        (kg,) = self.variants["gemv_gate_up_silu"][choice.variants["gemv_gate_up_silu"]]
        (kd,) = self.variants["gemv_down_combine"][choice.variants["gemv_down_combine"]]
        self._steps(stream, events, stop_after, [
            ("gate_up_silu", lambda: self._launch(
                kg, (math.ceil(spec.intermediate_size / kg.launch["rows_per_cta"]), P), stream,
                x=xc, ids=self.ids, w_gate=self.gate.data, w_gate_d=self.gate.d, w_up=self.up.data,
                w_up_d=self.up.d, a=self.a_decode)),
            ("down_combine", lambda: self._launch(
                kd, (math.ceil(spec.hidden_size / kd.launch["rows_per_cta"]), T), stream,
                a=self.a_decode, ids=self.ids, weights=self.weights, w_down=self.down.data, w_down_d=self.down.d,
                out=out_c)),
        ])

    def _grouped(self, xc: Any, out_c: Any, T: int, choice: tuning.Choice, stream: Any, events: list | None,
                 stop_after: str | None, logits: Any) -> None:
        cp = _cupy()
        spec = self.spec
        H, I, E = spec.hidden_size, spec.intermediate_size, spec.num_experts
        P = T * spec.top_k
        if self.y_grouped.shape[0] < P:  # grouped forced at a large T (tests, comparisons): grow once
            self.y_grouped = cp.empty((P, H), dtype=cp.float32)
        (kg,) = self.variants["grouped_gate_up_silu"][choice.variants["grouped_gate_up_silu"]]
        (kd,) = self.variants["grouped_down_combine"][choice.variants["grouped_down_combine"]]

        def slots(kern: Kernel) -> int:
            """CTAs past the call's distinct experts exit at once; a few-pairs variant takes a slot per pair."""
            return P if kern.launch.get("slot_per_pair") else min(P, E)

        arch = self.bundle.arch
        dependent = self.uses_pdl(choice)
        # o1i after o1i, as programmatic dependents: down waits for its own pair's rows of a (grouped.PAIR_READY);
        # launched plainly it starts after gate+up's end anyway
        counted = int(dependent and all(kern.launch.get("integer_dot") for kern in (kg, kd)))
        self._steps(stream, events, stop_after, [
            ("gate_up_silu", lambda: self._launch(
                kg, (I // kg.launch["rows_per_cta"], slots(kg)), stream, kg.launch["smem_bytes"][arch], dependent,
                x=xc, logits=logits, num_tokens=T, ids=self.ids, weights=self.weights, w_gate=self.gate.data,
                w_gate_d=self.gate.d, w_up=self.up.data, w_up_d=self.up.d, a=self.a_sorted,
                pair_ready=self.pair_ready, pairs_counted=counted)),
            ("down_combine", lambda: self._launch(
                kd, (H // kd.launch["rows_per_cta"], slots(kd)), stream, kd.launch["smem_bytes"][arch], dependent,
                a=self.a_sorted, ids=self.ids, weights=self.weights, num_pairs=P, w_down=self.down.data,
                w_down_d=self.down.d, y=self.y_grouped, counters=self.tile_counters, out=out_c,
                pair_ready=self.pair_ready, pairs_counted=counted)),
        ])

    def _fused(self, xc: Any, out_c: Any, T: int, choice: tuning.Choice, stream: Any, events: list | None,
               stop_after: str | None, logits: Any) -> None:
        """One launch for the whole layer (one token): a grid of every resident CTA, which all meet once."""
        (kern,) = self.variants[FUSED][choice.variants[FUSED]]
        self._steps(stream, events, stop_after, [
            ("moe", lambda: self._launch(
                kern, (self._resident[kern.uri],), stream, kern.launch["smem_bytes"][self.bundle.arch],
                self.uses_pdl(choice), x=xc, logits=logits, ids=self.ids, weights=self.weights, w_gate=self.gate.data,
                w_gate_d=self.gate.d, w_up=self.up.data, w_up_d=self.up.d, w_down=self.down.data,
                w_down_d=self.down.d, a=self.a_sorted, sync=self.fused_sync, out=out_c)),
        ])

    def _prefill(self, xc: Any, out_c: Any, T: int, choice: tuning.Choice, stream: Any, events: list | None,
                 stop_after: str | None, plan_ready: bool) -> None:
        cp = _cupy()
        spec = self.spec
        P = T * spec.top_k
        override = self._block_size(choice)
        gate_up_family, down_family = tuning.PATH_FAMILIES[choice.path]
        gate_up = self.variants[gate_up_family][choice.variants[gate_up_family]]
        down = self.variants[down_family][choice.variants[down_family]]
        if override:
            gate_up = [kern for kern in gate_up if kern.launch["block_size"] == override]
            down = [kern for kern in down if kern.launch["block_size"] == override]
        dependent = self.uses_pdl(choice)
        # a mixed stream variant (stream.MIXED_PAIRS): both block sizes' kernels, align picking one a call, launched
        # small gate+up, small down, large gate+up, large down, so that the chosen gate+up is always followed by its
        # down (which starts on the SMs its last tiles leave) and the other size's kernels return at once
        # (stream.cuh): the small down runs in the gate+up phase
        mixed = len(gate_up) > 1 and choice.path in tuning.LOCKSTEP_PATHS
        # the block sizes whose gate+up reads x_sorted, which is y's buffer, and whose down therefore stores y by a's
        # row (stream.y_by_row): gather_x writes x_sorted and pair_row before the first of those gate+up kernels,
        # and the combine reads y by them; row_block, where a mixed variant has one such size (b32x2+w64), makes
        # both do so only where align chose it, and is 0 where every size does (w128+w160, or one kernel)
        y_row_sizes = [kern.launch["block_size"] for kern in down if kern.launch.get("y_by_row")]
        row_block = y_row_sizes[0] if mixed and len(y_row_sizes) == 1 else 0
        gather_before = row_block or (y_row_sizes[0] if y_row_sizes else 0)  # the gate+up gather_x precedes

        def align() -> None:
            if plan_ready:
                return
            chunks = self._align_chunks(T)
            if chunks > 1:
                self._launch(self.k_align_count, (chunks,), stream, dependent=dependent, ids=self.ids, num_pairs=P,
                             counts=self.align_counts)
            self._launch(self.k_align, (chunks,), stream, dependent=dependent, ids=self.ids, num_pairs=P,
                         counts=self.align_counts, **self._align_outputs(choice))

        def launch_gate_up(kern: Kernel, x_in: Any, second: bool) -> None:
            if kern.launch["block_size"] == gather_before:
                kx = self.k_gather_x
                grid = min(-(-P // kx.launch["warps"]), kx.launch["ctas_per_sm"] * self._sm_count)
                self._launch(kx, (grid,), stream, dependent=dependent, x=x_in, sorted_ids=self.sorted_ids,
                             block_expert=self.block_expert, block_a_row=self.block_a_row, plan=self.plan,
                             num_pairs=P, x_sorted=self.x_sorted, pair_row=self.pair_row,
                             for_block=row_block)
            grid, smem = self._persistent_grid(kern, P)
            self._launch(kern, (grid,), stream, smem, dependent, x=x_in, sorted_ids=self.sorted_ids,
                         block_expert=self.block_expert, block_a_row=self.block_a_row, plan=self.plan,
                         num_pairs=P, w_gate=self.gate.data, w_gate_d=self.gate.d, w_up=self.up.data,
                         w_up_d=self.up.d, a=self.a_sorted, **self._stream_args(kern, claims=0, plan_ready=second))

        def launch_down(kern: Kernel) -> None:
            grid, smem = self._persistent_grid(kern, P)
            self._launch(kern, (grid,), stream, smem, dependent, a=self.a_sorted, block_expert=self.block_expert,
                         block_a_row=self.block_a_row, plan=self.plan, w_down=self.down.data,
                         w_down_d=self.down.d, y=self.y_pairs, sorted_ids=self.sorted_ids, num_pairs=P,
                         **self._stream_args(kern, claims=1))

        def gemm_gate_up() -> None:
            x_in = xc
            if self.x_mma is not None:
                x_in = self.x_mma[:T]
                cp.copyto(x_in, xc)
            if mixed:
                (small_gate_up, large_gate_up), (small_down, _) = gate_up, down
                launch_gate_up(small_gate_up, x_in, second=False)
                launch_down(small_down)
                launch_gate_up(large_gate_up, x_in, second=True)
                return
            for kern in gate_up:
                launch_gate_up(kern, x_in, second=False)

        def gemm_down() -> None:
            for kern in down[1:] if mixed else down:
                launch_down(kern)

        self._steps(stream, events, stop_after, [
            ("align", align),
            ("gate_up_silu", gemm_gate_up),
            ("down", gemm_down),
            ("combine", lambda: self._launch(self.k_combine, (T, self.k_combine.launch["ctas_per_token"]), stream,
                                             dependent=dependent and T < COMBINE_PLAIN_FROM, y=self.y_pairs,
                                             pair_row=self.pair_row, plan=self.plan,
                                             y_by_row=(row_block or 1) if y_row_sizes else 0,
                                             weights=self.weights, out=out_c)),
        ])

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

    def _stream_for(self, x: Any) -> Any:
        """torch's current stream on x's device for torch tensors (so that torch graph capture and
        torch's ordering hold), else CuPy's current stream."""
        cp = _cupy()
        if type(x).__module__.startswith("torch") and getattr(x, "is_cuda", False):
            import torch

            with warnings.catch_warnings():  # the replacement, Stream.from_external, is newer than CuPy 13
                warnings.simplefilter("ignore", DeprecationWarning)
                return cp.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream, x.device.index)
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

    def _align_chunks(self, tokens: int) -> int:
        """CTAs that align (and align_count, when above 1) run with for `tokens`."""
        return align_family.cta_count(tokens * self.spec.top_k)

    def _stream_args(self, kern: Kernel, claims: int, plan_ready: bool = False) -> dict[str, Any]:
        """block_ready and tile_claims (entry `claims` of the scratch: each kernel of a call counts its
        own) for a kernel that takes them (the stream kernels), act_map for the down ones, x_sums for
        the gate+up ones of a spec with stream.x_sums and plan_ready for the gate+up ones; else nothing."""
        if kern.uri not in self._stream_uris:
            return {}
        out = {"block_ready": self.block_ready, "tile_claims": self.tile_claims[claims:claims + 1]}
        if any(name == "plan_ready" for name, _ in self._args[kern.uri]):
            out["plan_ready"] = int(plan_ready)
        act_map = self._act_maps.get(kern.uri)
        if act_map is not None:
            out["act_map"] = act_map
        if any(name == "x_sums" for name, _ in self._args[kern.uri]):
            out["x_sums"] = self.x_sums
        return out

    @staticmethod
    def _routing_grid(kern: Kernel, routing_ctas: int, sums: dict[str, Any]) -> tuple[int]:
        """A routing kernel's CTAs (the router's, route_align's): those that route, then those that sum x's
        sub-blocks (_router_sum_args), tokens_per_cta a CTA."""
        return (routing_ctas + math.ceil(sums.get("num_sum_tokens", 0) / kern.launch["tokens_per_cta"]),)

    def routes_and_aligns(self, tokens: int, choice: tuning.Choice) -> bool:
        """Whether one launch (route_align) routes an aligned path's call and makes align's plan: up to its
        max_tokens, where the routing is on the device."""
        return (choice.path in tuning.ALIGNED_PATHS and not self.settings.host_route
                and tokens <= self.k_route_align.launch["max_tokens"])

    def _align_outputs(self, choice: tuning.Choice) -> dict[str, Any]:
        """align's (and route_align's) block size override (_block_size; 0: its rule), block pair (_block_pair; 0:
        the padding rule) and outputs."""
        return dict(block_size_override=self._block_size(choice) or 0, block_pair=self._block_pair(choice),
                    sorted_ids=self.sorted_ids,
                    block_expert=self.block_expert, block_ready=self.block_ready, block_a_row=self.block_a_row,
                    plan=self.plan)

    def _router_sum_args(self, xc: Any, T: int, choice: tuning.Choice) -> dict[str, Any]:
        """The router's arguments for x's sub-block sums where it makes them (stream.x_sums): the call's T
        tokens where one of its gate+up kernels reads them (an mma.sync stream variant), else none (0)."""
        if not self.k_router.launch.get("x_sums"):
            return {}
        reads = False
        if choice.path in tuning.ALIGNED_PATHS:
            family = tuning.PATH_FAMILIES[choice.path][0]
            reads = any(kern.launch.get("x_sums") for kern in self.variants[family][choice.variants[family]])
        return {"x": xc, "x_sums": self.x_sums, "num_sum_tokens": T if reads else 0}

    def _make_act_maps(self) -> dict[str, Any]:
        """act_map for every stream kernel that takes one, by uri (families/stream.py ACT_MAP): the tensor
        map of its tokens in sorted order (down: a_sorted; gate+up with prefill.sorted_x: x_sorted) with
        boxes of the variant's token_map_rows where it copies its tokens by tensor copies (one map a
        buffer and box size), a placeholder for the variants that do not read one. Made with the
        buffers, here and in _fit_aligned_scratch, not at a launch, which may be inside a graph capture."""
        sources = {"stream_down": self.a_sorted}
        if stream_family.sorted_x(self.spec):
            sources["stream_gate_up_silu"] = self.x_sorted
        out = {}
        for family, tokens in sources.items():
            by_rows = {0: self._placeholder}
            for kernels in self.variants.get(family, {}).values():
                for kern in kernels:
                    rows = kern.launch["token_map_rows"]
                    if rows not in by_rows:
                        raw = swizzled_rows_tensor_map(tokens.data.ptr, tokens.shape[0], tokens.shape[1], rows)
                        by_rows[rows] = _cupy().asarray(np.frombuffer(raw, dtype=np.uint8))
                    out[kern.uri] = by_rows[rows]
        return out

    def _fit_aligned_scratch(self, block_size: int | None) -> None:
        """Grow the expert-sorted buffers once if a stream variant of a larger block size than they
        were sized for is forced (tests, comparisons, tuning): every pair's expert may then pad more."""
        block_size = block_size or max(self.spec.prefill.block_sizes)
        if self.sorted_ids.shape[0] >= aligned_rows(self.spec, self.max_tokens, block_size):
            return
        cp = _cupy()
        for name, (shape, dtype) in aligned_shapes(self.spec, self.max_tokens, block_size).items():
            setattr(self, name, cp.empty(shape, dtype=dtype))
        self._act_maps = self._make_act_maps()

    def _block_size(self, choice: tuning.Choice) -> int | None:
        """The block size align must use for an aligned path's call, or None for its rule (_block_pair's where it
        gives one, else the padding rule): the stream kernels' own (their variant; None for a mixed one), else
        FERRUM_MOE_BLOCK_SIZE where set."""
        if choice.path in tuning.LOCKSTEP_PATHS:
            family = tuning.PATH_FAMILIES[choice.path][0]
            kernels = self.variants[family][choice.variants[family]]
            return kernels[0].launch["block_size"] if len(kernels) == 1 else None
        return self.settings.block_size_override

    def _block_pair(self, choice: tuning.Choice) -> int:
        """align's block_pair for a mixed stream variant (families/align.py pair_arg), else 0."""
        if choice.path not in tuning.LOCKSTEP_PATHS:
            return 0
        return block_pairs(self.spec).get(choice.variants[tuning.PATH_FAMILIES[choice.path][0]], 0)

    def _route_on_host(self, logits: Any, T: int, aligned: bool, block_size: int | None, block_pair: int = 0) -> None:
        """ids and weights from the logits on the host; for an aligned path also align's outputs,
        with block_size (None: block_pair's rule where given, else the padding rule's)."""
        cp = _cupy()
        spec = self.spec
        ids, w = reference.route_f32(cp.asnumpy(logits), spec.top_k, spec.norm_topk_prob)
        self.ids[: T * spec.top_k].set(np.ascontiguousarray(ids.reshape(-1), dtype=np.int32))
        self.weights[: T * spec.top_k].set(np.ascontiguousarray(w.reshape(-1), dtype=np.float32))
        if aligned:
            counts = reference.expert_counts(ids, spec.num_experts)
            bs = reference.pick_block_size(counts, spec.prefill.block_sizes, spec.prefill.padding_budget, block_size,
                                            align_family.unpack_pair_arg(block_pair) if block_pair else None)
            p = reference.align(ids, spec.num_experts, bs)
            self.sorted_ids[: p.num_padded].set(p.sorted_ids.astype(np.int32))
            self.block_expert[: len(p.block_expert)].set(p.block_expert.astype(np.int32))
            self.block_ready[: len(p.block_expert)].fill(0)
            self.block_a_row[: len(p.block_a_row)].set(p.block_a_row.astype(np.int32))
            self.plan.set(np.array([p.num_padded, bs], dtype=np.int32))

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
