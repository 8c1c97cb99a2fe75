"""How far the f16 tensor-core kernels' Q4_K arithmetic is from the float64 layer, on the GPU tests' weights,
with the roundings modelled in numpy (no GPU): which rounding makes the error, and how often a draw passes the
design's tolerance. CPU only.

    python3 scripts/f16_dequant_error.py olmoe 200       # spec (gate, up and down Q4_K), number of x draws

The model (it reproduced the GPU's grouped t8 error on the draw that failed, to three digits: docs/perf-notes.md,
fifty-fourth session) follows GroupedQ4K::Dequant, which the stream kernels' Q4_K weights still use: each sub-block's
scale d * sc and min dmin * m are rounded to f16, a weight is one f16 fma of its code with them, x is f16, products
are summed in float32 or better, and a is rounded to f16. (Since the fifty-fifth session the grouped f16 gate+up of
one block a warp applies the scales after the mma, the "scales after" form for gate+up.) Routing "one expert"
(every token on experts 0..k-1 with logits k..1), as test_gpu's routed_inputs.
The forms:
  f16             the kernels' arithmetic;
  scale exact     the min applied apart exactly, each code times its f16 scale rounded to f16;
  weights exact   the f16 weight rounded once from the exact scale and min;
  scales after    the codes exact and both scale and min applied in float32 (a sub-block's mma sum times its scale),
                  leaving a's f16 rounding alone.
"""
import sys
import zlib

import numpy as np

from ferrum_gen import reference
from ferrum_gen.bench import LAYER_TOLERANCE
from ferrum_gen.quant import QuantType, q4_k_fields, random_matrix_bytes
from ferrum_gen.spec import load_spec

FORMS = ("f16", "scale exact", "weights exact", "scales after")


def q4k_parts(blocks: np.ndarray):
    """Q4_K blocks (n, 144) -> per sub-block d * sc and dmin * m (exact in float32), codes (n, 8, 32)."""
    d, dmin, sc, mn, codes = q4_k_fields(blocks)
    return (d * sc).astype(np.float64), (dmin * mn).astype(np.float64), codes.astype(np.float64)


def f16(v):
    return np.asarray(v).astype(np.float16).astype(np.float64)


def weights(matrix_bytes: np.ndarray, rows: int, cols: int, form: str) -> np.ndarray:
    s, m, q = q4k_parts(matrix_bytes.reshape(-1, 144))
    s, m = s[:, :, None], m[:, :, None]
    w = {"f16": lambda: f16(f16(s) * q - f16(m)),
         "scale exact": lambda: f16(f16(s) * q) - m,
         "weights exact": lambda: f16(s * q - m),
         "exact": lambda: s * q - m}[form]()
    return w.reshape(rows, cols)


def main(name: str, draws: int) -> None:
    spec = load_spec(name)
    E, H, I, k = spec.num_experts, spec.hidden_size, spec.intermediate_size, spec.top_k
    if {spec.quant.gate, spec.quant.up, spec.quant.down} != {QuantType.Q4_K}:
        raise SystemExit(f"{name}: the model covers Q4_K gate, up and down only")
    rng = np.random.default_rng(zlib.crc32(spec.name.encode()))  # test_gpu.Case's weights
    raw = {"gate": random_matrix_bytes(spec.quant.gate, E * I, H, rng).reshape(E, I, -1),
           "up": random_matrix_bytes(spec.quant.up, E * I, H, rng).reshape(E, I, -1),
           "down": random_matrix_bytes(spec.quant.down, E * H, I, rng).reshape(E, H, -1)}
    logits = np.zeros((1, E), np.float32)
    logits[0, :k] = np.arange(k, 0, -1)
    ids, w = reference.route(logits, k, spec.norm_topk_prob)
    mats = {form: [(weights(raw["gate"][e], I, H, form), weights(raw["up"][e], I, H, form),
                    weights(raw["down"][e], H, I, form)) for e in ids[0]] for form in ("exact", *FORMS) if form != "scales after"}
    mats["scales after"] = mats["exact"]  # exact codes times float32 scales: the exact weights, only a in f16
    tol = LAYER_TOLERANCE[spec.activation_dtype]
    errs = {form: [] for form in FORMS}
    draw_rng = np.random.default_rng(0)
    for _ in range(draws):
        x = f16(draw_rng.standard_normal((1, H)))
        ref = sum(w[0, j] * (reference.silu(x @ g.T) * (x @ u.T)) @ d.T for j, (g, u, d) in enumerate(mats["exact"]))
        for form in FORMS:
            out = sum(w[0, j] * f16(reference.silu(x @ g.T) * (x @ u.T)) @ d.T for j, (g, u, d) in enumerate(mats[form]))
            errs[form].append(float(np.linalg.norm(f16(out) - ref) / np.linalg.norm(ref)))
    print(f"{name}, routing 'one expert', {draws} draws of x: relative error of the f16 output (tolerance {tol:g})")
    for form in FORMS:
        e = np.array(errs[form])
        print(f"  {form:14s} median {np.median(e):.2e}  p99 {np.quantile(e, 0.99):.2e}  max {e.max():.2e}  "
              f"over tolerance {np.mean(e > tol):.1%}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "olmoe", int(sys.argv[2]) if len(sys.argv) > 2 else 200)
