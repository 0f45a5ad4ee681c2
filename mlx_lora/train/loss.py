"""Cross-entropy summed over target tokens: (sum_ce, n_target_tokens), normalized by the caller."""

import mlx.core as mx
import mlx.nn as nn


def loss_sums(model: nn.Module, inputs: mx.array, targets: mx.array, loss_mask: mx.array):
    """Sum of per-token cross-entropy over tokens that carry loss, and their count."""
    logits = model(inputs)  # (B, L, V)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets)  # (B, L)
    return (ce * loss_mask).sum(), loss_mask.sum()
