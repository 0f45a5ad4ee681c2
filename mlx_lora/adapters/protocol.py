"""The adapter contract, written once: hyper-parameters, the layer, and a method's table entry."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.errors import UserError


@dataclass(frozen=True)
class Hyper:
    """A method's hyper-parameters as configs and adapter files state them."""

    rank: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"  # how lora_a, lora_b start: "default" (lora_b zero) or "pissa"
    feedforward: tuple[str, ...] = ()  # ia3: the paths of the layers that scale their input

    @property
    def scale(self) -> float:
        """alpha / rank, or alpha / sqrt(rank) for rank-stabilized LoRA."""
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    def checked(self, source: str) -> "Hyper":
        """Itself, if an adapter file's numbers make sense; else a UserError naming `source`."""
        if self.rank <= 0:
            raise UserError(f"{source}: rank is {self.rank}; it must be a positive count")
        if not math.isfinite(self.alpha) or not math.isfinite(self.scale):
            raise UserError(f"{source}: the scale (alpha {self.alpha}) is not a finite number")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"{source}: dropout is {self.dropout}; it must be in [0, 1)")
        return self


class AdapterLayer(Protocol):
    """A module around a frozen base layer; what training, saving and fusing call on it."""

    linear: nn.Module  # the frozen base layer (mlx-lm's attribute name)

    @classmethod
    def from_base(cls, base: nn.Module, hyper: Hyper, path: str = "") -> "AdapterLayer":
        """Wrap `base`, the module at `path`, so that the result initially equals it."""

    def __call__(self, x: mx.array) -> mx.array:
        """The base's output with the adapter's effect."""

    def fused_weight(self) -> mx.array:
        """The (output, input) float32 weight of one plain layer equal to base + adapter."""

    def fused_bias(self) -> mx.array | None:
        """That plain layer's bias (None where the base has none)."""


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: its layer, what trains, and how its tensors are named in files.

    Trainable parameters are named in memory as mlx-lm names them in its adapter files, so
    mlx-lm's format needs no table; other formats translate through the names given here.
    """

    name: str  # fine_tune_type in configs and adapter_config.json
    layer: type | None  # an AdapterLayer; None for a method that wraps nothing (own_weights)
    wraps: tuple[type, ...]  # the base layer types it can wrap
    trainable: tuple[str, ...]  # the layer's parameters that train
    peft_type: str | None  # PEFT's peft_type for this method; None: PEFT has no format for it
    peft_names: dict[str, str]  # our parameter name -> PEFT's (2-D tensors stored transposed)
    peft_config: dict = field(default_factory=dict)  # PEFT config keys that mark the method
    # A method that wraps nothing trains modules' own weights in place (full fine-tuning):
    # (model, num_layers, train_embeddings) -> the paths of the modules whose weights train.
    own_weights: Callable[[nn.Module, int, bool], list[str]] | None = None
    # True where Hyper's rank, alpha, rslora, dropout and init apply (LoRA's family).
    low_rank: bool = True
    # The targets when none are given, by mlx-lm model_type ("*": any other type).
    default_targets: dict[str, str] = field(default_factory=lambda: {"*": "all-linear"})
    # The target names whose layers scale their input, not their output (ia3), by model_type.
    feedforward: dict[str, tuple[str, ...]] = field(default_factory=dict)
