"""Programmatic dependent launch without a GPU: where it is refused and why, and the argument
array cuLaunchKernelEx reads. (Its use on a GPU is tests/test_gpu.py's
test_dependent_launches_are_used_on_hopper_and_give_the_bits_of_plain_launches.)"""

from __future__ import annotations

import ctypes
import sys

import pytest

from ferrum_gen.launch import kernel_params, pdl_unavailable


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89"])
def test_cards_before_hopper_get_plain_launches_and_are_told_why(arch: str) -> None:
    reason = pdl_unavailable(arch)
    assert reason is not None and arch in reason and "sm_90" in reason


def test_hopper_without_cuda_bindings_is_told_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # makes the import fail
    reason = pdl_unavailable("sm_90")
    assert reason is not None and "cuda.bindings" in reason and "ferrum-gen[cuda13]" in reason


def test_kernel_params_point_at_32_bit_ints_and_64_bit_pointers() -> None:
    values = [(0x7F00_0000_1000, False), (-3, True), (2**31 - 1, True), (0x7F00_0000_2000, False)]
    array, keep = kernel_params(values)
    assert len(array) == len(values) == len(keep)
    read = [ctypes.c_int32.from_address(array[i]).value if is_int else ctypes.c_uint64.from_address(array[i]).value
            for i, (_, is_int) in enumerate(values)]
    assert read == [v for v, _ in values]
    assert [ctypes.sizeof(h) for h in keep] == [8, 4, 4, 8]


def test_kernel_params_of_a_kernel_without_arguments_is_a_valid_array() -> None:
    array, keep = kernel_params([])
    assert keep == [] and len(array) == 1
