"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) as AdapterHub's `adapters`
library defines them on the pre-norm decoders mlx-lm loads.

A bottleneck f(h) = up(act(down(h))) (down: hidden -> size, up: size -> hidden, each with a
bias) is added to what a module returns: y = h + f(h). Where, per AdapterHub's configs and its
llama code (which hands the adapter no layer norm):
- pfeiffer (SeqBnConfig, relu): once per block, after the feed-forward's residual addition;
  it reads the residual stream s = x + ffn(norm(x)) and gives s + f(s): wrapped around the block.
- houlsby (DoubleSeqBnConfig, swish = silu): after the attention and after the feed-forward,
  each reading its sublayer's output h before the residual addition: wrapped around each one.
Both use reduction_factor 16: size = hidden // 16 unless --adapter-size says otherwise.
AdapterHub's default init ("bert": both projections N(0, 0.02)) moves the model before any
training; this is its "mam_adapter" init: down as a plain linear's uniform(+-1/sqrt(hidden)),
up and both biases zero, so a fresh adapter is the base exactly. The wrapped module stays as
`base`. The nonlinearity makes it unfusable, and neither mlx-lm nor PEFT has a format for it.
"""

import dataclasses
import math

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.adapters.protocol import Hyper, Method
from mlx_lora.errors import UserError

REDUCTION_FACTOR = 16  # AdapterHub's SeqBnConfig and DoubleSeqBnConfig default
NON_LINEARITY = {"pfeiffer": nn.relu, "houlsby": nn.silu}  # AdapterHub: relu, swish
# The attention and feed-forward sublayers of a block, as mlx-lm's models name them.
ATTENTION = ("self_attn", "attention", "attn", "self_attention")
FEEDFORWARD = ("mlp", "feed_forward", "ffn")
WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "model_dim")  # mlx-lm ModelArgs' names


class BottleneckAdapter(nn.Module):
    """A frozen block or sublayer whose output h becomes h + up(act(down(h))), in float32."""

    @classmethod
    def from_base(cls, base: nn.Module, hyper: Hyper, path: str = "") -> "BottleneckAdapter":
        """Wrap `base`; up starts at zero, so the wrapped module equals it."""
        layer = cls(hyper.hidden_size, hyper.adapter_size, hyper.adapter_variant)
        layer.base = base
        return layer

    def __init__(self, hidden_size: int, size: int, variant: str):
        super().__init__()
        self.activation = NON_LINEARITY[variant]
        bound = 1 / math.sqrt(hidden_size)
        self.adapter_down = mx.random.uniform(-bound, bound, (hidden_size, size),
                                              dtype=mx.float32)
        self.adapter_down_bias = mx.zeros((size,), dtype=mx.float32)
        self.adapter_up = mx.zeros((size, hidden_size), dtype=mx.float32)
        self.adapter_up_bias = mx.zeros((hidden_size,), dtype=mx.float32)

    def __call__(self, *args, **kwargs) -> mx.array:
        h = self.base(*args, **kwargs)  # (..., hidden)
        z = self.activation(h.astype(mx.float32) @ self.adapter_down + self.adapter_down_bias)
        return h + (z @ self.adapter_up + self.adapter_up_bias).astype(h.dtype)

    def __getattr__(self, key: str):
        # mlx-lm reads attributes of blocks and sublayers from outside them (llama's
        # make_cache reads layer.use_sliding): this instance answers for the module it wraps.
        try:
            return super().__getattr__(key)
        except AttributeError:
            if key == "base" or "base" not in self:
                raise
            return getattr(self["base"], key)


def hidden_size(model: nn.Module) -> int:
    """The width of the model's residual stream, from its config."""
    args = getattr(model, "args", None)
    for key in WIDTH_KEYS:
        if isinstance(width := getattr(args, key, None), int) and width > 0:
            return width
    raise UserError(f"bottleneck adapters need the model's hidden size, which its config states "
                    f"under none of {', '.join(WIDTH_KEYS)}; use another --fine-tune-type")


def wrapped_modules(model: nn.Module, hyper: Hyper, num_layers: int) -> tuple[list[str], Hyper]:
    """The modules to wrap in the last num_layers blocks (-1: all), and hyper's widths set."""
    width = hidden_size(model)
    if hyper.hidden_size and hyper.hidden_size != width:
        raise UserError(f"the adapters read and write width {hyper.hidden_size} but this model's "
                        f"hidden size is {width}; was the adapter trained on another base model?")
    index = {id(block): i for i, block in enumerate(model.layers)}
    first = 0 if num_layers == -1 else max(len(index) - num_layers, 0)
    chosen = set()
    for path, block in model.named_modules():
        if index.get(id(block), -1) >= first:
            chosen |= ({path} if hyper.adapter_variant == "pfeiffer" else
                       {f"{path}.{name}" for name in sublayers(block)})
    if not chosen:
        raise UserError(f"houlsby adapters go after each block's attention and feed-forward, but "
                        f"no block has a sublayer named {'/'.join(ATTENTION)} or "
                        f"{'/'.join(FEEDFORWARD)}; use --adapter-variant pfeiffer")
    size = hyper.adapter_size or max(width // REDUCTION_FACTOR, 1)
    # In named_modules' order, the order adapter_layers finds them in once wrapped.
    paths = [path for path, _ in model.named_modules() if path in chosen]
    return paths, dataclasses.replace(hyper, adapter_size=size, hidden_size=width)


def sublayers(block: nn.Module) -> list[str]:
    """The block's attention and feed-forward sublayers' names (the first of each it has)."""
    names = []
    for candidates in (ATTENTION, FEEDFORWARD):
        found = [n for n in candidates if isinstance(block.get(n), nn.Module)]
        names += found[:1]
    return names


def config_entries(hyper: Hyper) -> dict:
    """The adapter_config.json keys that say how the layers were built."""
    return {"adapter_variant": hyper.adapter_variant, "adapter_size": hyper.adapter_size,
            "hidden_size": hyper.hidden_size}


def hyper_from_config(config: dict, source: str) -> Hyper:
    """The hyper-parameters config_entries wrote; anything else is an error naming `source`."""
    variant = config.get("adapter_variant")
    if variant not in NON_LINEARITY:
        raise UserError(f"{source}: adapter_variant is {variant!r}; expected one of "
                        f"{', '.join(NON_LINEARITY)}")
    sizes = [config.get(key) for key in ("adapter_size", "hidden_size")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
        raise UserError(f"{source}: adapter_size and hidden_size must be positive counts, got "
                        f"{sizes[0]!r} and {sizes[1]!r}")
    return Hyper(0, 0.0, adapter_variant=variant, adapter_size=sizes[0], hidden_size=sizes[1])


ADAPTER = Method(
    name="adapter",
    layer=BottleneckAdapter,
    wraps=(nn.Module,),  # a block or a sublayer, whatever its class
    trainable=("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias"),
    peft_type=None,  # PEFT has no bottleneck adapters
    peft_names={},
    low_rank=False,
    default_targets={"*": ""},  # --adapter-variant places them, not --targets
    place=wrapped_modules,
    fusable=False,
)
