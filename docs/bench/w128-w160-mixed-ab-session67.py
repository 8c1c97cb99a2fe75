"""w128, w160 and the mixed w128+w160 forced on the stream path, same inputs, layer graph µs and the block size align chose."""
import sys
import numpy as np, cupy as cp
from ferrum_gen import bench
from ferrum_gen.spec import load_spec

spec = load_spec(sys.argv[1] if len(sys.argv) > 1 else "qwen3moe")
Ts = [int(t) for t in sys.argv[2].split(",")]
layer = bench.build_layer(spec, max(Ts))
stream = cp.cuda.Stream(non_blocking=True)
for T in Ts:
    for routing in ("uniform", "skewed"):
        sets = bench.make_input_sets(spec, T, np.random.default_rng(T), routing, 8)
        out = cp.empty((T, spec.hidden_size), dtype=sets[0][0].dtype)
        row = {}
        for r in range(2):
            for var in ("w128", "w160", "w128+w160"):
                v = {"stream_gate_up_silu": var, "stream_down": var}
                f = lambda: [layer.forward(x, lg, out=out, path="stream", variants=v) for x, lg in sets]
                us = float(np.median(bench.time_graph(f, len(sets), stream, bench.MAX_REPLAYS, budget_s=bench.GRAPH_BUDGET_S)))
                row.setdefault(var, []).append(us)
        bs = []
        for x, lg in sets:
            layer.forward(x, lg, out=out, path="stream", variants={"stream_gate_up_silu": "w128+w160", "stream_down": "w128+w160"})
            cp.cuda.Device().synchronize()
            bs.append(int(layer.plan[1]))
        print(spec.name, T, routing, " ".join(f"{k}: {' '.join(f'{u:.1f}' for u in v)}" for k, v in row.items()),
              "mixed picked", bs, flush=True)
