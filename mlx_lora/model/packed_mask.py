"""Hand mlx-lm models a block-diagonal causal mask through their `cache` argument.

mlx-lm's attention asks the cache for its mask (`create_attention_mask` calls
`cache.make_mask(...)` when the cache has one), rotates queries and keys from `cache.offset`,
and passes keys and values through `cache.update_and_fetch`. A stand-in cache that keeps
nothing, starts at offset 0 and returns our mask lets packed rows reach any such model
unchanged. Positions run on across the segments of a row: with RoPE attention depends only on
the distance between two tokens, so a segment that sees only itself computes what it would
alone. `packing_problem` checks exactly that on the model at hand.
"""

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.model.load import vocab_rows
from mlx_lora.model.logit_gap import logit_gap


class SegmentCache:
    """One layer's stand-in cache for a packed batch: no state, the block-diagonal mask."""

    offset = 0  # RoPE from position 0 for the whole row; relative distances are all it sees

    def __init__(self, segments: mx.array):
        self.segments = segments  # (B, L) int32: segment id per position, 0 for padding

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        """(B, 1, L, L) bool: a position sees earlier positions of its own segment."""
        return block_causal_mask(self.segments, window_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Nothing is cached during training: attention uses this call's keys and values."""
        return keys, values


def block_causal_mask(segments: mx.array, window_size: int | None = None) -> mx.array:
    """(B, 1, L, L) bool mask: same segment and not later (and within the window, if any)."""
    n = segments.shape[1]
    rows, cols = mx.arange(n)[:, None], mx.arange(n)[None]
    allowed = cols <= rows
    if window_size is not None:  # sliding-window layers keep their window inside a segment
        allowed = allowed & (cols > rows - window_size)
    same = segments[:, :, None] == segments[:, None, :]  # (B, L, L)
    return (same & allowed)[:, None]


def segment_caches(model: nn.Module, segments: mx.array) -> list[SegmentCache]:
    """The `cache` argument for one packed forward pass: one stand-in per block."""
    return [SegmentCache(segments) for _ in model.layers]


def packing_problem(model: nn.Module) -> str | None:
    """Why packed rows would not give this model's unpacked logits, or None when they do.

    Two short random sequences are run alone and packed into one row; the logits must agree.
    This catches absolute position embeddings, attention that ignores the cache's mask, and
    models whose call does not take a cache list.
    """
    lengths = (5, 7)
    vocab = vocab_rows(model) or 2
    ids = mx.random.randint(0, vocab, (sum(lengths),), key=mx.random.key(0))
    segments = mx.array(sum(([i + 1] * n for i, n in enumerate(lengths)), []))[None]
    was_training = model.training
    model.eval()  # no dropout in the comparison
    try:
        packed = model(ids[None], cache=segment_caches(model, segments))[0]
        starts = (0, lengths[0])
        alone = mx.concatenate([model(ids[None, s:s + n])[0]
                                for s, n in zip(starts, lengths, strict=True)])
        gap = logit_gap(alone, packed)
    except Exception as e:  # any architecture that cannot take the stand-in cache
        return f"{type(model).__module__} does not accept a packed mask ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
    if gap:
        return (f"packed logits differ from unpacked ones (max difference {gap[0]:.3g} of "
                f"{gap[1]:.3g}): the model uses absolute positions or ignores the cache's mask")
    return None
