"""Cross-entropy through the output head one chunk of positions at a time.

The (positions, vocab) logits of a chunk are made, reduced and dropped before the next chunk,
so with a 150k vocabulary the head costs a few hundred MB instead of the (B, L, V) logits and
their gradient. For training, each chunk's forward pass also computes the loss's gradient
with respect to its hidden states (a custom vjp), so the backward pass neither keeps nor
recomputes logits: one head matmul forward, one back, and a single exp over the logits.
"""

import math
import sys

import mlx.core as mx

from mlx_lora.model.head import Split

LOGITS_CHUNK_BYTES = 128 * 2**20  # float32 logits of one chunk; 128 positions at vocab 152k
MAX_CHUNK = 4096
LOG2E = 1.4426950408889634


def chunk_size(vocab_size: int) -> int:
    """Positions per chunk: a power of two whose float32 logits fit LOGITS_CHUNK_BYTES."""
    fit = LOGITS_CHUNK_BYTES // (4 * vocab_size)
    return min(MAX_CHUNK, 2 ** max(5, int(math.log2(max(fit, 1)))))


def _exp_cpu(x: mx.array) -> mx.array:
    # MLX's CPU exp is a scalar polynomial; on x86 libm's pow is ~2-3x faster per element
    # (measured: 14 vs 6 ns on 152k-wide rows) and as accurate (both ~4e-6 relative on
    # [-87, 0], from the float32 input). Even so, exp and sum are 40% of the head's time.
    return mx.power(2.0, x * LOG2E)


# Apple's builds vectorize exp (Accelerate / Metal); elsewhere use pow.
_exp = mx.exp if sys.platform == "darwin" else _exp_cpu


def chunked_ce(split: Split, hidden: mx.array, targets: mx.array, weights: mx.array,
               with_grad: bool, per_position: bool = False) -> mx.array:
    """Sum over positions of weight * cross-entropy of head(hidden) against targets.

    hidden (P, H), targets (P,) int32, weights (P,) float32. per_position=True returns the
    (P,) terms instead (summed per sequence: a sequence's negative log-probability, as
    preference losses need). SFT takes the sum, whose graph keeps the least alive (measured:
    one chunk's logits less at peak than summing the per-position terms afterwards).
    with_grad picks the chunk function whose vjp is cheapest: the fused one when the head is
    frozen.
    """
    n = hidden.shape[0]
    size = chunk_size(split.vocab_size)
    # Made once for all chunks: a dequantized head (qmatmul.py) is dequantized once per loss.
    weight = split.weight() if split.weight is not None else None
    if not with_grad:
        chunk = _chunk_ce(split, weight, per_position)
    elif split.frozen:
        chunk = _fused_chunk_ce(split, weight, per_position)
    else:  # a trained head needs its own gradients: recompute each chunk's logits instead
        chunk = _checkpointed_chunk_ce(split, per_position)
    values, total = [], mx.array(0.0)
    for start in range(0, n, size):  # static bounds: P is fixed per shape
        h = hidden[start:start + size]
        if start:
            # Left alone, MLX schedules the chunks side by side and every chunk's logits are
            # alive at once; this orders them, so each chunk's logits die before the next.
            h = mx.depends(h, values[-1] if per_position else total)
        value = chunk(h, targets[start:start + size], weights[start:start + size])
        if per_position:
            values.append(value)
        else:
            total = total + value
    if not per_position:
        return total
    return values[0] if len(values) == 1 else mx.concatenate(values)


def _log_sum_exp(logits: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(lse (C,), exp(logits - max) (C, V), their row sums (C, 1)) with one exp pass."""
    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    e = _exp(logits - top)
    s = e.sum(axis=-1, keepdims=True)
    return (top + mx.log(s))[:, 0], e, s


def _logits(split: Split, weight: mx.array | None, h: mx.array) -> mx.array:
    """head(h) as float32 (C, V); h @ weight.T is the same operation when there is a weight."""
    return (split.head(h) if weight is None else h @ weight.T).astype(mx.float32)


def _chunk_ce(split: Split, weight: mx.array | None, per_position: bool):
    def chunk(h, t, w):
        logits = _logits(split, weight, h)  # (C, V)
        lse, _, _ = _log_sum_exp(logits)
        picked = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        terms = (lse - picked) * w  # (C,)
        return terms if per_position else terms.sum()

    return chunk


def _checkpointed_chunk_ce(split: Split, per_position: bool):
    plain = _chunk_ce(split, None, per_position)  # the head's own call, for its gradients

    def chunk(h, t, w):
        # The head's parameters go in as arguments so their gradients flow through the
        # checkpoint; t and w are captured, as no gradient is taken with respect to them.
        def run(params, h):
            split.module.update(params)
            return plain(h, t, w)

        return mx.checkpoint(run)(split.module.trainable_parameters(), h)

    return chunk


def _fused_chunk_ce(split: Split, weight: mx.array | None, per_position: bool):
    """A chunk's loss whose forward pass also makes d loss / d h, so backward is a multiply."""

    @mx.custom_function
    def chunk(h, t, w):
        logits = _logits(split, weight, h)  # (C, V)
        picked = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        lse, e, s = _log_sum_exp(logits)
        terms = (lse - picked) * w  # (C,)
        ce = terms if per_position else terms.sum()
        # d ce_i / d logits_i = w_i * (softmax_i - onehot_i); through the head, d ce_i / d h_i.
        scale = (w / s[:, 0])[:, None]
        if weight is not None:  # head(h) = h @ W.T: the onehot part is a row gather
            grad_h = (e.astype(weight.dtype) @ weight) * scale - weight[t] * w[:, None]
        else:
            onehot = mx.arange(logits.shape[-1])[None] == t[:, None]
            grad_logits = e * scale - onehot * w[:, None]
            _, (grad_h,) = mx.vjp(split.head, [h], [grad_logits.astype(h.dtype)])
        return ce, grad_h.astype(h.dtype)

    @chunk.vjp
    def chunk_vjp(primals, cotangents, outputs):
        _, t, w = primals
        # Each position's term depends on its own hidden state only: a row-wise scale.
        scale = cotangents[0][:, None] if per_position else cotangents[0]
        return scale * outputs[1], mx.zeros_like(t), mx.zeros_like(w)

    def ce_only(h, t, w):
        ce, grad_h = chunk(h, t, w)
        # Make grad_h now, while this chunk's logits exist, not in the backward pass.
        return mx.depends(ce, grad_h)

    return ce_only
