"""Split an mlx-lm model at its last hidden state: backbone and output head, checked against it.

mlx-lm models have no common "hidden states" call, but nearly all are
`Model.__call__ = head(self.model(inputs, cache))` with the head `lm_head` or the tied
`model.embed_tokens.as_linear`. Whether that holds is checked on the model itself (a logit
soft-cap or scale would break it); when it does not, the loss uses the model's full logits.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_lora.model.qmatmul import DEQUANTIZING, dequantized


@dataclass(frozen=True)
class Split:
    """A model as backbone(inputs, cache) -> (B, L, H) and head(hidden) -> logits."""

    backbone: Callable[..., mx.array]
    head: Callable[[mx.array], mx.array]
    module: nn.Module  # the module holding the head's parameters
    weight: Callable[[], mx.array] | None  # the (V, H) matrix when head(h) == h @ weight.T
    frozen: bool  # no trainable parameter in the head: only its gradient w.r.t. h is needed
    vocab_size: int


def split_model(model: nn.Module) -> tuple[Split | None, str | None]:
    """(split, None) when head(backbone(x)) reproduces model(x); else (None, why not)."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, nn.Module) or not callable(inner):
        return None, "the model has no `model` backbone"
    module, head = find_head(model)
    if head is None:
        return None, "the model has neither lm_head nor model.embed_tokens.as_linear"
    split = Split(
        backbone=lambda inputs, cache=None: inner(inputs, cache=cache),
        head=head,
        module=module,
        weight=_plain_weight(module),
        frozen=not tree_flatten(module.trainable_parameters()),
        vocab_size=0,
    )
    problem, vocab_size = _mismatch(model, split)
    return (None, problem) if problem else (replace(split, vocab_size=vocab_size), None)


def find_head(model: nn.Module) -> tuple[nn.Module | None, Callable | None]:
    """(the module holding the output head's parameters, the head function), or (None, None)."""
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, nn.Module):
        return lm_head, lm_head
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if isinstance(embed, nn.Module) and hasattr(embed, "as_linear"):
        return embed, embed.as_linear
    return None, None


def _plain_weight(module: nn.Module) -> Callable[[], mx.array] | None:
    # Read at call time, so a compiled step sees the model's current (traced) weight.
    if type(module) is nn.Embedding or (type(module) is nn.Linear and "bias" not in module):
        return lambda: module.weight
    if type(module) in DEQUANTIZING.values() and "bias" not in module:
        return lambda: dequantized(module)  # the dequantize path (qmatmul.py)
    return None  # quantized or biased heads: the head's own function and its vjp


def _mismatch(model: nn.Module, split: Split) -> tuple[str | None, int]:
    inputs = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    was_training = model.training
    model.eval()  # no dropout in the comparison
    try:
        expected = model(inputs)
        got = split.head(split.backbone(inputs))
        same = got.shape == expected.shape and mx.allclose(got, expected, rtol=1e-5,
                                                           atol=1e-6).item()
    except Exception as e:  # an architecture whose backbone takes other arguments
        return f"head(model.model(x)) fails ({type(e).__name__}: {e})", 0
    finally:
        model.train(was_training)
    if not same:
        return "the logits are not lm_head(model.model(x)) (a logit soft-cap or scale?)", 0
    return None, expected.shape[-1]
