"""Kernel launches with programmatic dependent launch (PDL), and the stream kernels' weight tensor
maps, through cuda.bindings.

A kernel launched with the programmatic-serialization attribute may start while the kernel ahead
of it in the stream is still running, once every CTA of that kernel has executed
`griddepcontrol.launch_dependents` (fg::launch_dependents in the templates); it must then call
`griddepcontrol.wait` (fg::grid_wait) before it touches anything that kernel writes. The grouped
path uses it so that the down kernel's expert search and weight loads overlap the end of gate+up,
and gate+up's CTAs are resident when the router finishes; the stream path for align, gate+up, down
(whose first weight copies overlap the end of gate+up) and combine (MoeLayer.uses_pdl). CuPy cannot
set launch attributes; cuda.bindings (cuda-python's driver API) can.

Needs sm_90 or newer (older archs run the same kernels with plain launches: the PTX is guarded)
and the cuda-bindings package (in the cuda12/cuda13 extras). FERRUM_MOE_PDL=0 turns it off.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

PDL_MIN_ARCH = 90
PDL_MIN_DRIVER = 12030
"""Graphs capture programmatic dependencies from CUDA 12.3 on."""


def pdl_unavailable(arch: str) -> str | None:
    """Why programmatic dependent launch cannot be used on `arch` here, or None when it can."""
    if int(arch.removeprefix("sm_")) < PDL_MIN_ARCH:
        return f"{arch} has no programmatic dependent launch (sm_90 and newer)"
    try:
        from cuda.bindings import driver
    except ImportError as err:
        return f"cuda.bindings cannot be imported ({err}): pip install 'ferrum-gen[cuda13]' (or [cuda12])"
    try:
        err, version = driver.cuDriverGetVersion()
    except Exception as exc:  # noqa: BLE001 - e.g. no libcuda the bindings can load
        return f"cuda.bindings cannot reach the CUDA driver ({type(exc).__name__}: {exc})"
    if err != driver.CUresult.CUDA_SUCCESS:
        return f"cuda.bindings cannot query the CUDA driver ({err.name})"
    if version < PDL_MIN_DRIVER:
        return (f"the CUDA driver is {version // 1000}.{version % 1000 // 10}; programmatic dependent launch in "
                "CUDA graphs needs 12.3 or newer")
    return None


def kernel_params(values: Sequence[tuple[int, bool]]) -> tuple[ctypes.Array, list[Any]]:
    """The kernelParams array of a launch: one pointer per argument, to a copy of its value
    (a 32-bit int where the flag says so, else a device pointer). The second item keeps those
    copies alive until the launch call returns (the driver copies them at the call)."""
    holders: list[Any] = [ctypes.c_int32(v) if is_int else ctypes.c_void_p(v) for v, is_int in values]
    array = (ctypes.c_void_p * max(1, len(holders)))(*[ctypes.addressof(h) for h in holders])
    return array, holders


class DependentLauncher:
    """Launches kernels with the programmatic-serialization attribute (cuLaunchKernelEx)."""

    def __init__(self) -> None:
        from cuda.bindings import driver

        self._driver = driver
        attr = driver.CUlaunchAttribute()
        attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        self._attrs = [attr]

    def launch(self, function_ptr: int, grid: Sequence[int], threads: int, smem: int, stream_ptr: int,
               values: Sequence[tuple[int, bool]]) -> None:
        d = self._driver
        config = d.CUlaunchConfig()
        gx, gy, gz = (*grid, 1, 1)[:3]
        config.gridDimX, config.gridDimY, config.gridDimZ = gx, gy, gz
        config.blockDimX, config.blockDimY, config.blockDimZ = threads, 1, 1
        config.sharedMemBytes = smem
        config.hStream = d.CUstream(stream_ptr)
        config.attrs = self._attrs
        config.numAttrs = len(self._attrs)
        params, _keep = kernel_params(values)
        (err,) = d.cuLaunchKernelEx(config, d.CUfunction(function_ptr), ctypes.addressof(params), 0)
        if err != d.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuLaunchKernelEx failed: {_error_name(d, err)} "
                               f"(grid {tuple(grid)}, {threads} threads, {smem} bytes of shared memory)")


def _error_name(d: Any, err: Any) -> str:
    """The driver's name of a CUresult (cuda.bindings.driver as d), e.g. CUDA_ERROR_INVALID_VALUE."""
    _, name = d.cuGetErrorName(err)
    return name.decode() if isinstance(name, bytes) else str(name)


TENSOR_MAP_BYTES = 128
"""A CUtensorMap, as the kernels read it from global memory (64-byte aligned)."""


SWIZZLED_BOX_VALUES = 64
"""Columns of a 16-bit matrix in one 128-byte swizzled box row (swizzled_rows_tensor_map)."""


def swizzled_rows_tensor_map(address: int, rows: int, row_values: int, box_rows: int) -> bytes:
    """The tensor map of a 16-bit matrix of `rows` rows of row_values (the stream path's a, or x_sorted) for the
    wgmma kernels' token copies: boxes of box_rows rows by SWIZZLED_BOX_VALUES columns, 128 bytes a row,
    in the 128-byte swizzle that wgmma reads (stream.cuh's TOKEN_TMA). 16-byte box rows (the core-matrix
    layout, before) moved the same bytes at half the rate (docs/perf-notes.md)."""
    return _encode_tiled("CU_TENSOR_MAP_DATA_TYPE_UINT16", address, (row_values, rows), (2 * row_values,),
                         (SWIZZLED_BOX_VALUES, box_rows), f"{rows} rows of {row_values} values, boxes of {box_rows} rows",
                         swizzle="CU_TENSOR_MAP_SWIZZLE_128B")


def _encode_tiled(data_type: str, address: int, dims: Sequence[int], strides: Sequence[int], box: Sequence[int],
                  what: str, swizzle: str = "CU_TENSOR_MAP_SWIZZLE_NONE") -> bytes:
    """A CUtensorMap as the kernels read it: dims innermost first, strides in bytes of each dim after the
    first, every box element copied, with L2 promotion of 256 bytes; unswizzled unless told."""
    try:
        from cuda.bindings import driver as d
    except ImportError as err:
        raise RuntimeError(f"the wgmma stream kernels copy their tokens by tensor maps, which need cuda.bindings "
                           f"({err}): pip install 'ferrum-gen[cuda13]' (or [cuda12])") from err

    u32, u64 = d.cuuint32_t, d.cuuint64_t
    err, tensor_map = d.cuTensorMapEncodeTiled(
        getattr(d.CUtensorMapDataType, data_type), u32(len(dims)), address, [u64(v) for v in dims],
        [u64(v) for v in strides], [u32(v) for v in box], [u32(1) for _ in dims],
        d.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        getattr(d.CUtensorMapSwizzle, swizzle), d.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        d.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    if err != d.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed: {_error_name(d, err)} ({what})")
    out = b"".join(int(v).to_bytes(8, "little") for v in tensor_map.opaque)
    assert len(out) == TENSOR_MAP_BYTES
    return out
