"""Test-wide switches.

FERRUM_TEST_NO_MEMPOOL=1 makes CuPy allocate every array with cudaMalloc directly, so
that compute-sanitizer sees each buffer's true bounds (a pooled buffer sits inside a
larger allocation, where an overrun would go unnoticed). `make gpu-memcheck` sets it.

FERRUM_TEST_SEED=N (a non-negative integer) gives every test's `rng` fixture the seed N instead of
fresh entropy. The GPU tests draw new random inputs each run by design and print their seed
("rng seed N", shown with a failure's captured output), so a failure on rare inputs can be
replayed: FERRUM_TEST_SEED=N pytest -m gpu tests -k <the test>.
"""

import os


def _test_seed() -> int | None:
    raw = os.environ.get("FERRUM_TEST_SEED", "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ValueError(f"FERRUM_TEST_SEED={raw!r}: give a non-negative integer (the seed a failed test printed), "
                         "or unset it for fresh inputs")
    return int(raw)


TEST_SEED = _test_seed()

if os.environ.get("FERRUM_TEST_NO_MEMPOOL") == "1":
    try:
        import cupy

        cupy.cuda.set_allocator(None)
        cupy.cuda.set_pinned_memory_allocator(None)
    except ImportError:
        pass
