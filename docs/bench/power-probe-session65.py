"""Is the layer at large T held by the card's power limit? Times the stream path's forwards on normal x
against x scaled down 1e3 (same routing: the logits are the same) and x = 0, sampling nvidia-smi
(SM clock, power, throttle reasons) while each graph replays."""
import subprocess, threading, time
import numpy as np
import cupy as cp
from ferrum_gen import bench
from ferrum_gen.spec import load_spec

spec = load_spec("qwen3moe")
layer = bench.build_layer(spec, 4096)
stream = cp.cuda.Stream(non_blocking=True)


def sample(stop, rows):
    q = "clocks.sm,power.draw,clocks_throttle_reasons.active"
    while not stop.is_set():
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout.strip()
        rows.append(out)
        time.sleep(0.05)


print(f"{'T':>5} {'x':>8} {'us':>8} {'SM MHz med/min':>15} {'W med/max':>12} throttle")
for T in (64, 512, 1024, 4096):  # two calls: (1024, 4096), then (64, 512)
    rng = bench.case_rng(0, T, "uniform")
    sets = bench.make_input_sets(spec, T, rng, "uniform", 8)
    out = cp.empty((T, spec.hidden_size), dtype=sets[0][0].dtype)
    for label, f in (("normal", None), ("x/1000", 1e-3), ("zero", 0.0), ("normal", None)):
        if f is None:
            use = sets
        else:
            use = [(bench.to_activation(bench.activation_to_f64(x, spec.activation_dtype).astype(cp.float32) * f,
                                        spec.activation_dtype), lg) for x, lg in sets]
        calls = lambda: [layer.forward(x, lg, out=out) for x, lg in use]
        stop, rows = threading.Event(), []
        th = threading.Thread(target=sample, args=(stop, rows)); th.start()
        us = bench.time_graph(calls, len(use), stream, replays=int(1.2 / ((100 + 0.18 * T) * 8e-6)))
        stop.set(); th.join()
        parsed = []
        for r in rows:
            try:
                c, p_, t_ = r.split(",")
                parsed.append((float(c), float(p_), t_.strip()))
            except ValueError:
                pass
        clk = [c for c, _, _ in parsed] or [float("nan")]
        pw = [p_ for _, p_, _ in parsed] or [float("nan")]
        thr = sorted({t_ for _, _, t_ in parsed}) or [rows[0][:80] if rows else "none"]
        print(f"{T:>5} {label:>8} {np.median(us):8.1f} {np.median(clk):8.0f}/{min(clk):5.0f} {np.median(pw):6.0f}/{max(pw):5.0f} {' '.join(thr)}  ({len(rows)} samples)")
