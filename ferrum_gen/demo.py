"""`ferrum-gen demo` (`make demo`): a small qwen3moe-shaped model, end to end, in well under a minute.

1. Writes a GGUF file shaped like qwen3moe but SMALL (hidden 512, expert size 256, 8
   experts, top-2, 4 layers; the real Qwen3-30B-A3B is hidden 2048, 768, 128 experts,
   top-8) with the two quant mixes of a Q4_K_M file: down in Q6_K in layers 0 and 2, in
   Q4_K in layers 1 and 3. The weights are normal (std 0.02) quantized by libgguf (the
   llama.cpp quantizer) when it is installed, else random valid k-quant blocks.
2. Groups the layers by mix (one spec per mix, named by shape and mix) and writes each
   mix's bundle.
3. With a usable GPU: loads every layer (`ferrum_gen.load_model`), runs every path the layer
   has (decode and grouped at 4 tokens, prefill and stream at 256) on hidden states routed by
   the file's router weights, checks each against the float64 reference, and prints the time
   per layer and path.
   Without one: runs the float64 reference on every layer (checked against a dense
   per-token formula) and compiles every generated kernel with nvcc, and says what it
   skipped and why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import reference, tuning
from .gguf_io import open_gguf, read_layer_experts
from .model import ModelPlan, plan_model, read_router_weight
from .render import write_bundle
from .spec import MoeSpec, QuantType

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 512, 256, 8, 2
MIXES = [
    (QuantType.Q4_K, QuantType.Q4_K, QuantType.Q6_K),
    (QuantType.Q4_K, QuantType.Q4_K, QuantType.Q4_K),
] * 2
DECODE_TOKENS, PREFILL_TOKENS = 4, 256
TOLERANCE = 1e-2
"""||out - ref|| / ||ref|| for bf16 activations, as in the GPU suite."""
NVCC_ARCH = "sm_90"
TIMED_CALLS = 20


def _say(text: str = "") -> None:
    print(text, flush=True)


def _bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bf16 (nearest even), returned as float32."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def write_demo_gguf(path: Path, seed: int = 0) -> str:
    """Writes the demo model; returns how its weights were made."""
    from .testing import write_moe_gguf

    try:
        import libgguf  # noqa: F401 - a dev dependency; realistic blocks when present
        quantizer, how = "libgguf", "normal weights (std 0.02) quantized by libgguf"
    except ImportError:
        quantizer, how = "random", "random valid k-quant blocks (libgguf is not installed)"
    write_moe_gguf(path, arch="qwen3moe", hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                   num_experts=EXPERTS, top_k=TOP_K, quant_by_layer=MIXES, rng=np.random.default_rng(seed),
                   quantizer=quantizer, model_name="ferrum-gen demo (small qwen3moe shape)")
    return how


def _inputs(spec: MoeSpec, router: np.ndarray, tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """bf16-exact hidden states [T, H] (float32) and their float32 router logits [T, E]."""
    x = _bf16_round(rng.standard_normal((tokens, spec.hidden_size)).astype(np.float32))
    return x, (x @ router.T).astype(np.float32)


def _dense_check(x: np.ndarray, logits: np.ndarray, dense: reference.DenseExperts, spec: MoeSpec) -> np.ndarray:
    """The layer token by token, straight from the definition (no align, no gather): checks the reference."""
    ids, w = reference.route(logits, spec.top_k, spec.norm_topk_prob)
    out = np.zeros((x.shape[0], spec.hidden_size))
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t]):
            g, u = dense.gate[e] @ x[t], dense.up[e] @ x[t]
            out[t] += w[t, j] * (dense.down[e] @ (g / (1.0 + np.exp(-g)) * u))
    return out


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - b) / np.linalg.norm(b))


def _gpu_unusable() -> str:
    """'' when a supported GPU and CuPy are usable here, else why not."""
    from .compile import CupyMissingError, compiler_version, require_cupy
    from .doctor import SUPPORTED_ARCHS

    try:
        cupy = require_cupy("the demo's GPU part")
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "no CUDA GPU is visible to CuPy"
        compiler_version()
        cc = cupy.cuda.Device().compute_capability
    except CupyMissingError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - any CUDA failure means: no usable GPU here
        return f"CUDA is not usable: {type(err).__name__}: {err}"
    if f"sm_{cc}" not in SUPPORTED_ARCHS:
        return f"this GPU is sm_{cc}, which ferrum-gen does not support (sm_80-sm_90)"
    return ""


def _run_gpu(path: Path, plan: ModelPlan) -> bool:
    import cupy as cp

    from .model import load_model

    rng = np.random.default_rng(1)
    model = load_model(path, max_tokens=PREFILL_TOKENS)
    _say(f"{'layer':>5}  {'spec':<44} {'path':<8} {'T':>4} {'rel err':>9} {'us/call':>9}")
    ok = True
    for layer in plan.layers:
        spec = plan.spec_of(layer)
        moe = model[layer]
        router = model.router_weight(layer)
        experts = read_layer_experts(model.reader, layer, spec)
        dense = reference.DenseExperts.from_quantized(spec, experts.gate.data, experts.up.data, experts.down.data)
        runs = [(p, DECODE_TOKENS if p in ("decode", "grouped") else PREFILL_TOKENS) for p in tuning.PATHS
                if tuning.path_available(p, moe.variants)]
        for path_name, tokens in runs:
            x, logits = _inputs(spec, router, tokens, rng)
            x_bits = cp.asarray((x.view(np.uint32) >> 16).astype(np.uint16))
            logits_gpu = cp.asarray(logits)
            out = cp.empty((tokens, spec.hidden_size), dtype=cp.uint16)
            moe.forward(x_bits, logits_gpu, out=out, path=path_name)
            got = (cp.asnumpy(out).astype(np.uint32) << 16).view(np.float32)
            err = _rel(got, reference.moe_layer(x, logits, dense, spec.top_k, spec.norm_topk_prob))
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for _ in range(TIMED_CALLS):
                moe.forward(x_bits, logits_gpu, out=out, path=path_name)
            stop.record()
            stop.synchronize()
            us = cp.cuda.get_elapsed_time(start, stop) * 1000.0 / TIMED_CALLS
            good = err <= TOLERANCE
            ok &= good
            _say(f"{layer:>5}  {spec.name:<44} {path_name:<8} {tokens:>4} {err:>9.2e} {us:>9.1f}"
                 + ("" if good else f"  FAILED (tolerance {TOLERANCE:g})"))
    return ok


def _run_cpu(path: Path, plan: ModelPlan) -> bool:
    rng = np.random.default_rng(1)
    reader = open_gguf(path)
    ok = True
    for layer in plan.layers:
        spec = plan.spec_of(layer)
        experts = read_layer_experts(reader, layer, spec)
        dense = reference.DenseExperts.from_quantized(spec, experts.gate.data, experts.up.data, experts.down.data)
        x, logits = _inputs(spec, read_router_weight(reader, layer, spec), DECODE_TOKENS, rng)
        start = time.perf_counter()
        out = reference.moe_layer(x, logits, dense, spec.top_k, spec.norm_topk_prob)
        ms = (time.perf_counter() - start) * 1000.0
        err = _rel(out, _dense_check(x, logits, dense, spec))
        good = bool(np.isfinite(out).all()) and err < 1e-12
        ok &= good
        _say(f"layer {layer} ({spec.name}): float64 reference, T={DECODE_TOKENS}, {ms:.1f} ms, "
             f"against the per-token formula {err:.1e}" + ("" if good else "  FAILED"))
    return ok


def _nvcc() -> str | None:
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def _compile_with_nvcc(nvcc: str, bundles: list[Path], out_dir: Path) -> bool:
    sources = [src for b in bundles for src in sorted(b.glob("*.cu"))]

    def one(src: Path) -> tuple[Path, subprocess.CompletedProcess]:
        cmd = [nvcc, f"-arch={NVCC_ARCH}", "-cubin", "--Werror", "all-warnings",
               "-o", str(out_dir / f"{src.parent.name}-{src.stem}.cubin"), str(src)]
        return src, subprocess.run(cmd, capture_output=True, text=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(one, sources))
    failed = [(src, proc) for src, proc in results if proc.returncode != 0]
    for src, proc in failed:
        _say(f"nvcc FAILED on {src}:\n{proc.stdout}{proc.stderr}")
    _say(f"nvcc {NVCC_ARCH}: {len(sources) - len(failed)}/{len(sources)} kernels compiled "
         f"({time.perf_counter() - start:.1f} s)")
    return not failed


def run_demo(workdir: Path | None = None, gpu: str = "auto") -> int:
    """Runs the demo; returns the exit status (0: every check passed)."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="ferrum-demo-") as tmp:
            return run_demo(Path(tmp), gpu)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "demo-qwen3moe-small.gguf"
    _say(f"ferrum-gen demo: a SMALL qwen3moe-shaped model (hidden {HIDDEN}, expert size {INTERMEDIATE}, "
         f"{EXPERTS} experts, top-{TOP_K}, {len(MIXES)} layers), not the real one, so that it runs in seconds")
    how = write_demo_gguf(path)
    _say(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {how}")

    plan = plan_model(path)
    bundles = [write_bundle(spec, workdir / "generated") for spec in plan.specs]
    _say(f"{len(plan.specs)} quant mixes, one bundle each:")
    for spec, bundle in zip(plan.specs, bundles):
        _say(f"  {spec.name}: layers {', '.join(map(str, plan.layers_of(spec)))} -> {bundle}")

    why = "--gpu skip was given" if gpu == "skip" else _gpu_unusable()
    skipped: list[str] = []
    if not why:
        _say("GPU: every layer and every path it has, against the float64 reference")
        ok = _run_gpu(path, plan)
    else:
        if gpu == "require":
            _say(f"no GPU run: {why}")
            return 1
        _say("CPU: the float64 reference on every layer")
        ok = _run_cpu(path, plan)
        skipped.append(f"GPU run of every layer and its timings: {why}")
        nvcc = _nvcc()
        if nvcc is None:
            skipped.append("nvcc compile check: nvcc is not on PATH (install the CUDA toolkit to run it)")
        else:
            with tempfile.TemporaryDirectory(prefix="ferrum-demo-nvcc-") as tmp:
                ok &= _compile_with_nvcc(nvcc, bundles, Path(tmp))
    for item in skipped:
        _say(f"skipped: {item}")
    _say("demo passed" if ok else "demo FAILED")
    return 0 if ok else 1
