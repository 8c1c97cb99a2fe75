"""Grouped gate+up+SiLU family: one distinct expert's 16-row tile times all of its tokens, on tensor cores."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import KernelSpec
from .grouped import gate_up_kernels


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    return gate_up_kernels(spec)
