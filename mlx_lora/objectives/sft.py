"""Supervised fine-tuning: cross-entropy summed over target tokens, normalized by their count.

The loss takes a batch as the inputs, the segment ids of packed rows (or None), and the flat
positions that carry loss with their targets and weights, so the output head runs only where
there is something to learn.
"""

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.data.batching import Batch, loss_positions
from mlx_lora.data.stream import eval_batches, training_batches
from mlx_lora.data.tokenize import to_examples
from mlx_lora.model.head import Split
from mlx_lora.model.packed_mask import segment_caches
from mlx_lora.model.prefix_cache import prefix_cache
from mlx_lora.objectives.chunked_ce import chunked_ce
from mlx_lora.objectives.protocol import LossFn, Objective


def loss_sums(model: nn.Module, inputs: mx.array, targets: mx.array, loss_mask: mx.array):
    """Sum of per-token cross-entropy over tokens that carry loss, and their count.

    The plain definition, from the model's full logits: the reference the fast loss is
    tested against.
    """
    logits = model(inputs)  # (B, L, V)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets)  # (B, L)
    return (ce * loss_mask).sum(), loss_mask.sum()


def token_ce(model: nn.Module, split: Split | None, with_grad: bool, inputs, segments,
             positions, targets, weights, per_position: bool = False) -> mx.array:
    """Sum over loss positions of weight * cross-entropy (per position (P,) with per_position),
    chunked through the head when the model splits."""
    # Packed rows' block-diagonal mask, or virtual tokens (prompt, prefix) before every row.
    cache = prefix_cache(model) if segments is None else segment_caches(model, segments)
    if split is None:
        logits = model(inputs, cache=cache)  # (B, L, V)
        picked = logits.reshape(-1, logits.shape[-1])[positions]  # (P, V)
        terms = nn.losses.cross_entropy(picked.astype(mx.float32), targets) * weights
        return terms if per_position else terms.sum()
    hidden = split.backbone(inputs, cache)  # (B, L, H)
    hidden = hidden.reshape(-1, hidden.shape[-1])[positions]  # (P, H)
    return chunked_ce(split, hidden, targets, weights, with_grad, per_position)


def make_loss(model: nn.Module, split: Split | None, with_grad: bool) -> LossFn:
    """(inputs, segments, positions, targets, weights) -> (sum_ce, {}).

    inputs (B, L) int32; segments (B, L) int32 or None; positions (P,) int32 flat indices
    into (B, L); targets (P,) int32; weights (P,) float32, 0 for positions that only pad P.
    """

    def loss(inputs, segments, positions, targets, weights):
        return token_ce(model, split, with_grad, inputs, segments, positions, targets,
                        weights), {}

    return loss


def batch_arrays(batch: Batch) -> tuple[mx.array, mx.array | None, mx.array, mx.array, mx.array]:
    """A batch as the loss takes it: (inputs, segments or None, positions, targets, weights).

    Only positions that carry loss reach the output head; their count is rounded up
    (batching.POSITION_MULTIPLE) so the compiled step sees few shapes.
    """
    positions, weights = loss_positions(batch.loss_mask)
    targets = batch.targets.reshape(-1)[positions]
    segments = None if batch.segments is None else mx.array(batch.segments)
    return (mx.array(batch.inputs), segments, mx.array(positions), mx.array(targets),
            mx.array(weights))


SFT = Objective(
    name="sft",
    unit="tokens",
    examples=lambda records, tokenizer, config, name: to_examples(
        records, tokenizer, config.max_seq_length, config.mask_prompt, name),
    train_batches=training_batches,
    eval_batches=eval_batches,
    arrays=batch_arrays,
    count=lambda batch: batch.n_target_tokens,
    make_loss=make_loss,
)
