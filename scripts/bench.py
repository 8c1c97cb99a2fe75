"""Time the MoE layer on the GPU at several token counts against the memory floor.

    python3 scripts/bench.py --spec qwen3moe --tokens 1 8 64 512 4096

Each measurement replays a CUDA graph of ROTATIONS forward calls, each on its own inputs
(so that different experts are read and the weights do not sit in L2), and reports the
median per call over several replays (CUDA events); the min column is the best of three
such medians. The floor is the bytes of the
experts each call must read, over the device-to-device copy bandwidth measured here,
or the FLOPs over MATMUL_FLOPS, whichever is larger.
"""

from __future__ import annotations

import argparse

import numpy as np
import yaml

ROTATIONS = 8
REPLAYS = 15
MATMUL_FLOPS = 690e12
"""bf16 tensor-core rate torch reached on an H200 (design brief): the arithmetic floor."""


def copy_bandwidth(cp) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = 2 << 30
    a = cp.empty(n, dtype=cp.uint8)
    b = cp.empty_like(a)
    b[...] = a
    times = []
    for _ in range(5):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        b[...] = a
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2 * n / float(np.median(times))


def graph_time_us(cp, stream, calls, per: int) -> float:
    """Median time of one replay of the captured `calls`, divided by `per`."""
    with stream:
        calls()
        stream.begin_capture()
        calls()
        graph = stream.end_capture()
        graph.launch(stream)
        times = []
        for _ in range(REPLAYS):
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            stop.record(stream)
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) * 1e3 / per)
    return float(np.median(times))


def decode_split(cp, layer, sets, out, stream) -> list[tuple[str, float]]:
    """Decode time with the launches cut after each stage: the differences are the stages' shares."""
    import math

    spec = layer.spec
    k_r, k_g, k_d = layer.k_router, layer.k_gemv_gate_up, layer.k_gemv_down

    def run(upto: int):
        def calls():
            for x, logits in sets:
                T = x.shape[0]
                P = T * spec.top_k
                layer._launch(k_r, (math.ceil(T / k_r.launch["tokens_per_cta"]),),
                              (logits, layer.ids, layer.weights, np.int32(T)), stream)
                if upto >= 2:
                    layer._launch(k_g, (math.ceil(spec.intermediate_size / k_g.launch["rows_per_cta"]), P),
                                  (x, layer.ids, layer.gate.data, layer.gate.d, layer.up.data, layer.up.d,
                                   layer.a_decode), stream)
                if upto >= 3:
                    layer._launch(k_d, (math.ceil(spec.hidden_size / k_d.launch["rows_per_cta"]), T),
                                  (layer.a_decode, layer.ids, layer.weights, layer.down.data, layer.down.d, out),
                                  stream)
        return calls

    cumulative = [graph_time_us(cp, stream, run(n), len(sets)) for n in (1, 2, 3)]
    return [("router", cumulative[0]), ("gate_up_silu", cumulative[1] - cumulative[0]),
            ("down_combine", cumulative[2] - cumulative[1]), ("total", cumulative[2])]


def main() -> None:
    import cupy as cp

    from ferrum_gen.bundle import KernelBundle
    from ferrum_gen.quant import random_matrix_bytes, row_bytes
    from ferrum_gen.runtime import MoeLayer
    from ferrum_gen.settings import Settings
    from ferrum_gen.spec import ActivationDtype, load_spec, spec_from_dict

    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", default="qwen3moe")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    parser.add_argument("--decode-split", action="store_true",
                        help="also time the decode path cut after each kernel (router, gate+up, down)")
    parser.add_argument("--paths", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec key for a tuning experiment, e.g. prefill.gate_up_tile_n=64")
    args = parser.parse_args()

    spec = load_spec(args.spec)
    if args.set:
        data = spec.model_dump(mode="json")
        for item in args.set:
            key, value = item.split("=", 1)
            *parents, leaf = key.split(".")
            node = data
            for p in parents:
                node = node[p]
            node[leaf] = yaml.safe_load(value)
        spec = spec_from_dict(data, "--set " + " ".join(args.set))
        print("spec overrides:", ", ".join(args.set))
    E, H, I, k = spec.num_experts, spec.hidden_size, spec.intermediate_size, spec.top_k
    q = spec.quant
    rng = np.random.default_rng(0)
    layer = MoeLayer(
        KernelBundle.load(spec),
        random_matrix_bytes(q.gate, E * I, H, rng).reshape(E, I, -1),
        random_matrix_bytes(q.up, E * I, H, rng).reshape(E, I, -1),
        random_matrix_bytes(q.down, E * H, I, rng).reshape(E, H, -1),
        max(args.tokens),
        settings=Settings.from_env({}),
    )
    expert_bytes = I * (row_bytes(q.gate, H) + row_bytes(q.up, H)) + H * row_bytes(q.down, I)
    bw = copy_bandwidth(cp)
    act = {ActivationDtype.F32: cp.float32, ActivationDtype.F16: cp.float16, ActivationDtype.BF16: cp.uint16}[
        spec.activation_dtype]
    print(f"device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    splits = []
    stream = cp.cuda.Stream(non_blocking=True)
    for T in args.tokens:
        sets = []
        for _ in range(ROTATIONS):
            x = cp.asarray(rng.standard_normal((T, H)).astype(np.float32))
            x = (x.view(cp.uint32) >> 16).astype(cp.uint16) if act is cp.uint16 else x.astype(act)  # bf16: truncate
            logits = cp.asarray(rng.standard_normal((T, E)).astype(np.float32))
            sets.append((x, logits))
        distinct = [len(np.unique(cp.asnumpy(cp.argsort(-l, axis=1)[:, :k]))) for _, l in sets]
        bytes_us = float(np.mean(distinct)) * expert_bytes / bw * 1e6
        flops_us = 2 * 3 * T * k * H * I / MATMUL_FLOPS * 1e6
        floor_us = max(bytes_us, flops_us)
        out = cp.empty((T, H), dtype=act)
        for path in args.paths:
            if path == "decode" and T * k > 65535:
                continue
            times = [graph_time_us(cp, stream, lambda: [layer.forward(x, l, out=out, path=path) for x, l in sets],
                                   ROTATIONS) for _ in range(3)]
            med = float(np.median(times))
            rows.append((T, path, med, float(np.min(times)), floor_us, med / floor_us))
        if args.decode_split and T * k <= 65535:
            for name, us in decode_split(cp, layer, sets, out, stream):
                splits.append((T, name, us))
    print(f"{'T':>6} {'path':<8} {'median us':>10} {'min us':>8} {'floor us':>9} {'x floor':>8}")
    for T, path, med, mn, floor, ratio in rows:
        print(f"{T:>6} {path:<8} {med:>10.1f} {mn:>8.1f} {floor:>9.1f} {ratio:>8.2f}")
    if splits:
        print(f"{'T':>6} {'decode stage':<14} {'us':>8}")
        for T, name, us in splits:
            print(f"{T:>6} {name:<14} {us:>8.1f}")


if __name__ == "__main__":
    main()
