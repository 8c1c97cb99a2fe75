"""Stream gate+up+SiLU family: an aligned block's expert's 128 gate and up rows times the block's tokens."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import KernelSpec
from .stream import gate_up_kernels


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    return gate_up_kernels(spec)
