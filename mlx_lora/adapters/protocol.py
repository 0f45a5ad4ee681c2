"""The contract every adapter method keeps, written once."""

from typing import Protocol

import mlx.core as mx
import mlx.nn as nn


class Adapter(Protocol):
    """A module wrapping a frozen base layer; its parameters are named as mlx-lm names them."""

    @staticmethod
    def from_base(base: nn.Module, rank: int, scale: float, dropout: float = 0.0) -> "Adapter":
        """Wrap `base` so that the result initially equals it."""

    def __call__(self, x: mx.array) -> mx.array:
        """Base output plus the adapter's update."""

    def fuse(self) -> nn.Module:
        """A plain layer equal to base + adapter."""
