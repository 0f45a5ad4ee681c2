"""LoRA: y = base(x) + scale * dropout(x) @ lora_a @ lora_b, over a float or quantized linear."""

import math

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.adapters.protocol import Hyper, Method


def linear_dims(linear: nn.Module) -> tuple[int, int]:
    """(input, output) width of an nn.Linear or nn.QuantizedLinear."""
    output_dims, packed_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        return packed_dims * 32 // linear.bits, output_dims
    return packed_dims, output_dims


def dequantized_weight(linear: nn.Module) -> mx.array:
    """The (output, input) weight of a float or quantized linear, in its compute dtype."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(
            linear.weight, linear.scales, linear.get("biases"),
            group_size=linear.group_size, bits=linear.bits, mode=linear.mode,
        )
    return linear.weight


class LoRALinear(nn.Module):
    """A frozen linear (float: LoRA, quantized: QLoRA) plus a trainable float32 low-rank update."""

    @classmethod
    def from_base(cls, base: nn.Module, hyper: Hyper, path: str = "") -> "LoRALinear":
        """Wrap `base`; lora_b starts at zero so the wrapped layer equals the base."""
        input_dims, output_dims = linear_dims(base)
        layer = cls(input_dims, output_dims, hyper.rank, hyper.scale, hyper.dropout)
        layer.linear = base
        return layer

    def __init__(self, input_dims: int, output_dims: int, rank: int, scale: float, dropout: float):
        super().__init__()
        self.linear = nn.Linear(input_dims, output_dims, bias=False)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        # mlx-lm's layout and init: lora_a (in, r) uniform, lora_b (r, out) zero.
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (input_dims, rank), dtype=mx.float32)
        self.lora_b = mx.zeros((rank, output_dims), dtype=mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        z = (self.dropout(x).astype(mx.float32) @ self.lora_a) @ self.lora_b
        if "lora_a0" in self:  # PiSSA (pissa.py): its base is the residual W - s (a0 b0)^T
            z = z - (x.astype(mx.float32) @ self.lora_a0) @ self.lora_b0
        return y + (self.scale * z).astype(x.dtype)

    def fused_weight(self) -> mx.array:
        """W + scale * (lora_a @ lora_b - lora_a0 @ lora_b0).T, (output, input) in float32."""
        weight = dequantized_weight(self.linear).astype(mx.float32)
        delta = self.lora_a @ self.lora_b
        if "lora_a0" in self:
            delta = delta - self.lora_a0 @ self.lora_b0
        return weight + self.scale * delta.T

    def fused_bias(self) -> mx.array | None:
        """The base's bias: LoRA leaves it as it is."""
        return self.linear.get("bias")


LORA = Method(
    name="lora",
    layer=LoRALinear,
    wraps=(nn.Linear, nn.QuantizedLinear),
    trainable=("lora_a", "lora_b"),
    peft_type="LORA",
    peft_names={"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"},
    peft_config={"use_dora": False},
)
