"""Prints a hash of the layer output for every kernel variant of each named spec, on fixed inputs, with its error
against the float64 reference: run it under two trees (the committed one and a change) on one GPU and diff the
output. A change that should leave the arithmetic as it was (a different schedule, synchronisation, or instruction
selection with the same rounding) must print the same lines.

    python3 scripts/output_hashes.py qwen3moe olmoe > after.txt      # from the repository root (needs tests/)
    ONLY=w python3 scripts/output_hashes.py qwen3moe                 # only the variants whose names start with w

Covers each fused variant (T = 1, 2), each grouped gate+up and down variant (T = 3, 12), each stream variant (gate+up
and down together; T = 40, 300, 1500), and the decode (T = 1, 5) and prefill (T = 40, 300) paths as tuned. A variant
that refuses a token count prints "refused".
"""
import hashlib
import os
import sys

import cupy as cp
import numpy as np

sys.path.insert(0, "tests")
from test_gpu import Case, from_act, rel_err  # noqa: E402

from ferrum_gen.spec import load_spec  # noqa: E402


def runs(variants: dict) -> list:
    out = [("fused", {"fused_moe": v}, T) for v in variants.get("fused_moe", {}) for T in (1, 2)]
    for family in ("grouped_gate_up_silu", "grouped_down_combine"):
        out += [("grouped", {family: v}, T) for v in variants.get(family, {}) for T in (3, 12)]
    out += [("stream", {"stream_gate_up_silu": v, "stream_down": v}, T)
            for v in variants.get("stream_gate_up_silu", {}) for T in (40, 300, 1500)]
    out += [("decode", None, T) for T in (1, 5)] + [("prefill", None, T) for T in (40, 300)]
    only = os.environ.get("ONLY")
    return [r for r in out if r[1] and all(v.startswith(only) for v in r[1].values())] if only else out


def main(names: list) -> None:
    for name in names:
        case = Case(load_spec(name))
        for path, variants, T in runs(case.layer.variants):
            x, logits = case.inputs(T, np.random.default_rng(T))
            label = f"{name} {path} {','.join((variants or {}).values()) or '-'} {T}"
            try:
                out = case.run(x, logits, path, variants)
            except ValueError as e:  # a variant that cannot serve T
                print(label, "refused", str(e).splitlines()[0][:80], flush=True)
                continue
            err = rel_err(from_act(out, case.spec.activation_dtype), case.reference(x, logits)[0])
            print(label, hashlib.sha1(cp.asnumpy(out).tobytes()).hexdigest()[:16], f"err {err:.2e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
