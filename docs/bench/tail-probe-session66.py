"""Session 66 probe: what the experts' tail blocks cost. qwen3moe, path auto, uniform random routing against a
balanced routing (token t's 8 experts are 8t .. 8t+7 mod 128: every expert gets exactly T/16 pairs, so at
T = 2048 and 4096 no expert has a partly filled block of 128). Same x; cumulative graph times by phase."""
import numpy as np, cupy as cp
from ferrum_gen import bench
from ferrum_gen.spec import load_spec

spec = load_spec("qwen3moe")
layer = bench.build_layer(spec, 4096)
stream = cp.cuda.Stream(non_blocking=True)
rng = np.random.default_rng(1)
E, K = spec.num_experts, spec.top_k
print(f"{'T':>5} {'routing':9} {'layer':>8} {'gate_up':>8} {'down':>8} {'blocks':>6}  real pairs in partial blocks")
for T in (1024, 2048, 4096):
    sets_u = bench.make_input_sets(spec, T, rng, "uniform", 8)
    sets_b = []
    for x, _ in sets_u:
        lg = np.full((T, E), -4.0, dtype=np.float32)
        for t in range(T):
            lg[t, (K * t + np.arange(K)) % E] = 4.0 + 0.01 * np.arange(K)
        sets_b.append((x, cp.asarray(lg)))
    out = cp.empty((T, spec.hidden_size), dtype=sets_u[0][0].dtype)
    for name, sets in (("uniform", sets_u), ("balanced", sets_b)):
        cum = {}
        for stop in ("align", "gate_up_silu", "down", None):
            f = lambda stop=stop, sets=sets: [layer.forward(x, lg, out=out, path="auto", stop_after=stop) for x, lg in sets]
            cum[stop] = float(np.median(bench.time_graph(f, len(sets), stream, bench.MAX_REPLAYS, budget_s=bench.GRAPH_BUDGET_S)))
        layer.forward(sets[0][0], sets[0][1], out=out, path="auto")
        cp.cuda.Device().synchronize()
        bs = int(layer.plan[1]); nb = int(layer.plan[0]) // bs
        starts = cp.asnumpy(layer.block_a_row[:nb]); real = np.diff(np.append(starts, T * K))
        part = real[real < bs]
        print(f"{T:5d} {name:9} {cum[None]:8.1f} {cum['gate_up_silu'] - cum['align']:8.1f} {cum['down'] - cum['gate_up_silu']:8.1f} "
              f"{nb:6d}  bs {bs}: {len(part)} partial, {int(part.sum())} pairs ({np.percentile(part, 50) if len(part) else 0:.0f} median)")
