"""Whether two ways of running a model gave the same logits, up to its dtype's rounding."""

import mlx.core as mx


def logit_gap(expected: mx.array, got: mx.array) -> tuple[float, float] | None:
    """None when `got` equals `expected` within float32's (1e-4) or half precision's (3e-2)
    relative rounding; else (the largest difference, the logits' scale). NaN never equals."""
    scale = mx.abs(expected).max().item() + 1e-6
    diff = mx.abs(got.astype(mx.float32) - expected.astype(mx.float32)).max().item()
    tolerance = 1e-4 if expected.dtype == mx.float32 else 3e-2
    return None if diff <= tolerance * scale else (diff, scale)
