"""w128 against w160 on the stream path, same inputs, graph times by phase (qwen3moe unless argv[1])."""
import sys
import numpy as np, cupy as cp
from ferrum_gen import bench
from ferrum_gen.spec import load_spec

spec = load_spec(sys.argv[1] if len(sys.argv) > 1 else "qwen3moe")
Ts = [int(t) for t in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1536, 2048, 3072, 4096]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
layer = bench.build_layer(spec, max(Ts))
stream = cp.cuda.Stream(non_blocking=True)
print(f"{spec.name:14} {'T':>5} {'routing':8} {'var':5} {'layer':>8} {'gate_up':>8} {'down':>8} {'blocks':>6}")
for T in Ts:
    for routing in ("uniform", "skewed"):
        rng = np.random.default_rng(T)
        sets = bench.make_input_sets(spec, T, rng, routing, 8)
        out = cp.empty((T, spec.hidden_size), dtype=sets[0][0].dtype)
        for r in range(rounds):
            for var in ("w128", "w160"):
                v = {"stream_gate_up_silu": var, "stream_down": var}
                cum = {}
                for stop in ("align", "gate_up_silu", "down", None):
                    f = lambda stop=stop: [layer.forward(x, lg, out=out, path="stream", stop_after=stop, variants=v) for x, lg in sets]
                    cum[stop] = float(np.median(bench.time_graph(f, len(sets), stream, bench.MAX_REPLAYS, budget_s=bench.GRAPH_BUDGET_S)))
                layer.forward(sets[0][0], sets[0][1], out=out, path="stream", variants=v)
                cp.cuda.Device().synchronize()
                nb = int(layer.plan[0]) // int(layer.plan[1])
                print(f"{spec.name:14} {T:5d} {routing:8} {var:5} {cum[None]:8.1f} {cum['gate_up_silu'] - cum['align']:8.1f} "
                      f"{cum['down'] - cum['gate_up_silu']:8.1f} {nb:6d}", flush=True)
