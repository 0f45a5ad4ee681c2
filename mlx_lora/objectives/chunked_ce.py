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

# float32 logits of one chunk: 256 positions at vocab 152k. The head's GEMMs run 15% faster per
# position at 256 than at 128 (skinny GEMMs stream the whole head weight per chunk), for 0.45 GB
# more at peak (measured with its gradient, 1,108 positions; 512 was no faster).
LOGITS_CHUNK_BYTES = 256 * 2**20
MAX_CHUNK = 4096


def chunk_size(vocab_size: int) -> int:
    """Positions per chunk: a power of two whose float32 logits fit LOGITS_CHUNK_BYTES."""
    fit = LOGITS_CHUNK_BYTES // (4 * vocab_size)
    return min(MAX_CHUNK, 2 ** max(5, int(math.log2(max(fit, 1)))))


# exp(d) = exp(d / 2^8) ^ (2^8): expm1 of the small d / 2^8 by its Taylor series to degree 5
# (coefficients with the 2^-8 folded in), then 8 squarings, the first 4 of them as
# expm1(2y) = q (2 + q) so that 1 + q is not rounded while it is nearest 1 (rounding there is
# what squaring amplifies). Measured against float64 exp on [-100, 0]: 7.8e-6 relative error
# above -20 (float32 pow's 4.6e-6 comes from rounding d itself), unbiased (mean -1.6e-8).
EXP_HALVINGS = 8
EXP_NEAR_ONE = 4
EXP_FLOOR = -87.0  # float32 exp is denormal below; it also keeps d / 2^8 where the series holds
_EXPM1_TERMS = [1 / (math.factorial(i) * 2.0 ** (EXP_HALVINGS * i)) for i in range(6)]


@mx.compile
def _exp_arithmetic(d: mx.array) -> mx.array:
    """exp(d) for d <= 0 in multiplies and adds only.

    On x86 MLX's CPU exp is a scalar polynomial per element (19-22 ns) and pow a libm call
    (7-10 ns); a chain of multiplies and adds is one fused loop that the compiler vectorizes:
    2.3 ns per element at 128 x 151,936, with no intermediate array (measured; README.md).
    Compiled on its own, so an uncompiled caller gets the fused loop too.
    """
    d = mx.maximum(d, EXP_FLOOR)
    q = d * _EXPM1_TERMS[5]
    for term in reversed(_EXPM1_TERMS[1:5]):
        q = (q + term) * d
    for _ in range(EXP_NEAR_ONE):
        q = q * (2.0 + q)
    p = 1.0 + q
    for _ in range(EXP_HALVINGS - EXP_NEAR_ONE):
        p = p * p
    return p


def _exp(d: mx.array) -> mx.array:
    """exp(d), d <= 0: the backend's own where it is vectorized (Apple's CPU builds, GPUs)."""
    if sys.platform == "darwin" or mx.default_device() != mx.cpu:
        return mx.exp(d)
    return _exp_arithmetic(d)


def _row_reduce(reduce, x: mx.array) -> mx.array:
    """reduce(x, axis=-1, keepdims=True) over (C, V) as (C, g, V/g) then (C, g): MLX's CPU
    reductions run 2x faster across rows than along one (0.59 against 1.34 ns per element for
    max at 128 x 151,936). g = 64, or the largest power of two below it that divides V."""
    rows, width = x.shape
    groups = math.gcd(width, 64)
    if groups == 1:
        return reduce(x, axis=-1, keepdims=True)
    return reduce(reduce(x.reshape(rows, groups, width // groups), axis=1), axis=-1,
                  keepdims=True)


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
    top = mx.stop_gradient(_row_reduce(mx.max, logits))
    e = _exp(logits - top)
    s = _row_reduce(mx.sum, e)
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
