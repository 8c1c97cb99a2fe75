"""T = 2048 and 2560: w128 against w160, graph times of every phase cut (gather_x is no phase: nan), three rounds."""
import numpy as np, cupy as cp
from ferrum_gen import bench
from ferrum_gen.spec import load_spec

spec = load_spec("qwen3moe")
layer = bench.build_layer(spec, 4096)
stream = cp.cuda.Stream(non_blocking=True)
print(layer.phases("stream") if hasattr(layer, "phases") else "")
for T in (2048, 2560):
    rng = np.random.default_rng(T)
    sets = bench.make_input_sets(spec, T, rng, "uniform", 8)
    out = cp.empty((T, spec.hidden_size), dtype=sets[0][0].dtype)
    for r in range(3):
        for var in ("w128", "w160"):
            v = {"stream_gate_up_silu": var, "stream_down": var}
            cum = {}
            for stop in ("route", "align", "gather_x", "gate_up_silu", "down", "combine", None):
                try:
                    f = lambda stop=stop: [layer.forward(x, lg, out=out, path="stream", stop_after=stop, variants=v) for x, lg in sets]
                    cum[stop] = float(np.median(bench.time_graph(f, len(sets), stream, bench.MAX_REPLAYS, budget_s=bench.GRAPH_BUDGET_S)))
                except Exception as e:
                    cum[stop] = float("nan")
            print(T, var, " ".join(f"{k}:{c:.1f}" for k, c in cum.items()), flush=True)
