"""Test-wide switches.

FERRUM_TEST_NO_MEMPOOL=1 makes CuPy allocate every array with cudaMalloc directly, so
that compute-sanitizer sees each buffer's true bounds (a pooled buffer sits inside a
larger allocation, where an overrun would go unnoticed). `make gpu-memcheck` sets it.
"""

import os

if os.environ.get("FERRUM_TEST_NO_MEMPOOL") == "1":
    try:
        import cupy

        cupy.cuda.set_allocator(None)
        cupy.cuda.set_pinned_memory_allocator(None)
    except ImportError:
        pass
