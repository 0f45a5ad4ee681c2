"""8-bit Adam: Adam's moments kept in one byte per element, in blocks with a scale each.

As bitsandbytes' 8-bit optimizers do (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"): a moment is flattened and cut into blocks of BLOCK values; each block is
divided by its largest magnitude (its scale, kept in float32) and each value is stored as the
index of the nearest of 256 code values. The code is dynamic, dense near 1 and reaching down
to 1e-7 a decade at a time, because a block's moments span orders of magnitude; blocks keep
one outlier from coarsening a whole tensor. Each update dequantizes the moments, takes AdamW's
own float32 step (bias correction as configured), and quantizes the new moments.

The second moment is stored as its square root, the scale of the step's denominator: that
halves its span in decades. Stored as itself, a block whose gradients differ by 10^4 holds
squares 10^8 apart, more than the code reaches; the small ones round to zero and their
steps m / (sqrt(v) + eps) blow up (measured: 14 times AdamW's whole movement after 200 steps,
against 10% for the root; tests/test_adam8bit.py keeps that case).
"""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

BLOCK = 256  # values per scale: 2 bytes per element for the two codes, 8 per block for scales


def dynamic_code(signed: bool) -> np.ndarray:
    """256 sorted code values in [-1, 1] ([0, 1] unsigned): zero, and in each decade
    (10^-(k+1), 10^-k] values spaced evenly, half as many as in the decade above."""
    decades = 7 if signed else 8  # the sign takes one bit of the eight
    magnitudes = [10.0 ** -k * np.linspace(0.1, 1.0, 2 ** (decades - k) // 2 + 1)[1:]
                  for k in range(decades)]
    positive = np.concatenate(magnitudes)  # 127 values signed, 255 unsigned
    values = np.concatenate([-positive, [0.0], positive]) if signed else np.concatenate(
        [[0.0], positive])
    values = np.sort(values)
    if len(values) < 256:  # signed: 255 values; the last code repeats 1 and goes unused
        values = np.concatenate([values, values[-1:]])
    return values.astype(np.float32)


SIGNED = mx.array(dynamic_code(signed=True))  # the first moment's code
UNSIGNED = mx.array(dynamic_code(signed=False))  # the second moment's square root's


def nearest(x: mx.array, code: mx.array) -> mx.array:
    """Index of the code value nearest to each x (code sorted, x within its range): a binary
    search of 8 steps, then the closer of the two neighbours."""
    index = mx.zeros(x.shape, mx.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        probe = index + step
        index = mx.where(code[probe] <= x, probe, index)
    above = mx.minimum(index + 1, 255)
    return mx.where(code[above] - x < x - code[index], above, index)


def quantize(x: mx.array, code: mx.array) -> tuple[mx.array, mx.array]:
    """x as (codes (blocks, BLOCK) uint8, scales (blocks,) float32), flattened and padded with
    zeros to whole blocks."""
    flat = x.reshape(-1)
    if pad := -flat.size % BLOCK:
        flat = mx.concatenate([flat, mx.zeros((pad,), flat.dtype)])
    blocks = flat.reshape(-1, BLOCK)
    scales = mx.abs(blocks).max(axis=1)
    normalized = blocks / mx.where(scales > 0, scales, 1.0)[:, None]  # an all-zero block: 0s
    return nearest(normalized, code).astype(mx.uint8), scales


def dequantize(codes: mx.array, scales: mx.array, code: mx.array, shape) -> mx.array:
    """The float32 values that quantize() stored, in `shape`."""
    values = code[codes] * scales[:, None]  # (blocks, BLOCK)
    size = int(np.prod(shape))
    return values.reshape(-1)[:size].reshape(shape)


class Adam8bit(optim.AdamW):
    """AdamW (Adam with weight_decay 0) whose state per parameter is m_codes, sqrt_v_codes
    (blocks, BLOCK) uint8 and m_scales, sqrt_v_scales (blocks,) float32."""

    def init_single(self, parameter: mx.array, state: dict):
        """Zero moments: zero scales (every code then stands for 0)."""
        blocks = -(-parameter.size // BLOCK)
        for name in ("m", "sqrt_v"):
            state[f"{name}_codes"] = mx.zeros((blocks, BLOCK), mx.uint8)
            state[f"{name}_scales"] = mx.zeros((blocks,), mx.float32)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        """AdamW's step on the dequantized moments; the new moments quantized back."""
        shape = parameter.shape
        sqrt_v = dequantize(state["sqrt_v_codes"], state["sqrt_v_scales"], UNSIGNED, shape)
        moments = {"m": dequantize(state["m_codes"], state["m_scales"], SIGNED, shape),
                   "v": mx.square(sqrt_v)}
        updated = super().apply_single(gradient, parameter, moments)  # sets moments' m, v
        state["m_codes"], state["m_scales"] = quantize(moments["m"], SIGNED)
        state["sqrt_v_codes"], state["sqrt_v_scales"] = quantize(mx.sqrt(moments["v"]),
                                                                 UNSIGNED)
        return updated
