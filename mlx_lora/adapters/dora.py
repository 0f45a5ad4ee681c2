"""DoRA (Liu et al. 2024): LoRA's update, then each output row rescaled to a learned magnitude.

y = m / ||W + scale * (A B)^T||_row * (x W^T + scale * dropout(x) A B) + bias, where the norm
is taken per output row and treated as a constant in the backward pass (as the paper
suggests, and as mlx-lm and PEFT do). m starts at ||W||_row, so a fresh layer equals the base.
Tensor names and layout are mlx-lm's (lora_a, lora_b, m); PEFT calls m lora_magnitude_vector.
"""

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.adapters.lora import LoRALinear, dequantized_weight
from mlx_lora.adapters.protocol import Hyper, Method


class DoRALinear(LoRALinear):
    """A frozen linear (float or quantized) with LoRA factors and a trainable magnitude m."""

    @classmethod
    def from_base(cls, base: nn.Module, hyper: Hyper, path: str = "") -> "DoRALinear":
        """Wrap `base`; m is its row norms and lora_b zero, so the layer equals the base."""
        layer = super().from_base(base, hyper, path)
        layer.m = mx.linalg.norm(dequantized_weight(base).astype(mx.float32), axis=1)
        return layer

    def __init__(self, input_dims: int, output_dims: int, rank: int, scale: float, dropout: float):
        super().__init__(input_dims, output_dims, rank, scale, dropout)
        self.m = mx.ones((output_dims,), dtype=mx.float32)

    def _row_scale(self) -> mx.array:
        adapted = super().fused_weight()  # W + scale * (A B)^T, float32
        return self.m / mx.stop_gradient(mx.linalg.norm(adapted, axis=1))

    def __call__(self, x: mx.array) -> mx.array:
        bias = self.linear.get("bias")
        y = super().__call__(x)  # x W^T + bias + scale * dropout(x) A B
        if bias is not None:
            y = y - bias
        y = self._row_scale().astype(x.dtype) * y
        return y if bias is None else y + bias

    def fused_weight(self) -> mx.array:
        """m / ||W + scale (A B)^T|| * (W + scale (A B)^T), (output, input) in float32."""
        return self._row_scale()[:, None] * super().fused_weight()


DORA = Method(
    name="dora",
    layer=DoRALinear,
    wraps=(nn.Linear, nn.QuantizedLinear),
    trainable=("lora_a", "lora_b", "m"),
    peft_type="LORA",
    peft_names={"lora_a": "lora_A.weight", "lora_b": "lora_B.weight",
                "m": "lora_magnitude_vector"},
    peft_config={"use_dora": True},
)
