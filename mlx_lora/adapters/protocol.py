"""The adapter contract, written once: hyper-parameters, the layer, and a method's table entry."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

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
    virtual_tokens: int = 0  # prompt, prefix: the virtual tokens put before every sequence
    init_ids: tuple[int, ...] = ()  # prompt, prefix: the tokens they start as (empty: random)
    adapter_variant: str = "pfeiffer"  # adapter: AdapterHub's pfeiffer or houlsby
    adapter_size: int = 0  # adapter: the bottleneck's width; 0 = hidden_size // 16
    hidden_size: int = 0  # adapter: the width it reads and writes (the model's, when placed)

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

    linear: nn.Module  # the frozen base layer (mlx-lm's attribute name); see wrapped()

    @classmethod
    def from_base(cls, base: nn.Module, hyper: Hyper, path: str = "") -> "AdapterLayer":
        """Wrap `base`, the module at `path`, so that the result initially equals it."""

    def __call__(self, x: mx.array) -> mx.array:
        """The base's output with the adapter's effect."""

    def fused_weight(self) -> mx.array:
        """The (output, input) float32 weight of one plain layer equal to base + adapter (a
        method that is not `fusable` has none)."""

    def fused_bias(self) -> mx.array | None:
        """That plain layer's bias (None where the base has none)."""


class VirtualTokens(Protocol):
    """A module that puts N virtual tokens before every sequence (prompt and prefix tuning): the
    keys and values each layer attends to before the input's own. It wraps nothing; it sits at
    the model's top level (model.prefix_cache.KEY) and reaches the model through its cache."""

    prompt_embeddings: mx.array  # the trained tensor, under PEFT's name
    input_embeddings: ClassVar[bool]  # whether it runs the model on input embeddings (prompt)

    @classmethod
    def from_model(cls, model: nn.Module, ids: list[int]) -> "VirtualTokens":
        """Virtual tokens for `model` that start as the tokens `ids` (one per virtual token)."""

    def keys_values(self, model: nn.Module) -> list[tuple[mx.array, mx.array]]:
        """Each layer's (1, kv_heads, N, head_dim) keys and values, as a KV cache holds them."""


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
    # A method that adds virtual tokens (prompt, prefix) wraps nothing: its VirtualTokens class.
    virtual: type | None = None
    # A method that wraps blocks or sublayers, not linears (adapter), places itself:
    # (model, hyper, num_layers) -> their paths, and hyper with the model's widths filled in.
    place: Callable[[nn.Module, Hyper, int], tuple[list[str], Hyper]] | None = None
    # False where base + adapter is no linear layer (adapter's nonlinearity): fuse refuses it.
    fusable: bool = True


def wrapped(layer: nn.Module) -> nn.Module:
    """The frozen module an adapter layer wraps: `linear` (a linear layer), or `base` (a whole
    block or sublayer, which no linear's name fits)."""
    return layer["base"] if "base" in layer else layer["linear"]
