"""Stream down family: an aligned block's expert's 128 down rows (256 in the tall wgmma tiles) times the
block's rows of a."""

from __future__ import annotations

from ..spec import MoeSpec
from .base import KernelSpec
from .stream import down_kernels


def kernels(spec: MoeSpec) -> list[KernelSpec]:
    return down_kernels(spec)
