"""Cross-entropy summed over target tokens: (sum_ce, n_target_tokens), normalized by the caller.

The training loss takes a batch as the inputs, the segment ids of packed rows (or None), and
the flat positions that carry loss with their targets and weights, so the output head runs
only where there is something to learn.
"""

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.train.chunked_ce import chunked_ce_sum
from mlx_lora.train.head import split_model
from mlx_lora.train.packed_mask import segment_caches

LossFn = Callable[..., tuple[mx.array, mx.array]]


def loss_sums(model: nn.Module, inputs: mx.array, targets: mx.array, loss_mask: mx.array):
    """Sum of per-token cross-entropy over tokens that carry loss, and their count.

    The plain definition, from the model's full logits: the reference the fast loss is
    tested against.
    """
    logits = model(inputs)  # (B, L, V)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets)  # (B, L)
    return (ce * loss_mask).sum(), loss_mask.sum()


def make_loss(model: nn.Module, with_grad: bool,
              say: Callable[[str], None] | None = None) -> LossFn:
    """(inputs, segments, positions, targets, weights) -> (sum_ce, n_tokens).

    inputs (B, L) int32; segments (B, L) int32 or None; positions (P,) int32 flat indices
    into (B, L); targets (P,) int32; weights (P,) float32, 0 for positions that only pad P.
    Chunked through the head when the model splits cleanly; otherwise full logits, said once.
    """
    split, problem = split_model(model)
    if split is None and say is not None:
        say(f"the loss uses full logits (more memory): {problem}")

    def loss(inputs, segments, positions, targets, weights):
        cache = None if segments is None else segment_caches(model, segments)
        if split is None:
            logits = model(inputs, cache=cache)  # (B, L, V)
            picked = logits.reshape(-1, logits.shape[-1])[positions]  # (P, V)
            ce = nn.losses.cross_entropy(picked.astype(mx.float32), targets)
            return (ce * weights).sum(), weights.sum()
        hidden = split.backbone(inputs, cache)  # (B, L, H)
        hidden = hidden.reshape(-1, hidden.shape[-1])[positions]  # (P, H)
        return chunked_ce_sum(split, hidden, targets, weights, with_grad), weights.sum()

    return loss
