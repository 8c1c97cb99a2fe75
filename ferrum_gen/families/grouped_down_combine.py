"""Grouped down family with the weighted combine fused in (the last CTA of a row tile adds it up)."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import KernelSpec
from .grouped import down_kernels


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    return down_kernels(spec)
