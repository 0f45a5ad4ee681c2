"""(IA)^3 (Liu et al. 2022): learned vectors that rescale keys, values and the feed-forward input.

As PEFT defines it on a linear layer: an attention target scales its output, bias included,
y = base(x) * l with l of the output's size; a feed-forward target scales its input,
y = base(x * l) with l of the input's size, so its bias is left as it is. l starts at ones,
so a fresh layer equals the base. `ia3_l` is PEFT's tensor transposed, as all of ours are:
(1, out) for an output scale, (in, 1) for an input scale, so the shape says which it is.
mlx-lm has no (IA)^3: fuse the adapter to serve it there.
"""

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.adapters.lora import dequantized_weight, linear_dims
from mlx_lora.adapters.protocol import Hyper, Method

# PEFT's defaults (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and ..._FEEDFORWARD_...)
# for the model types both it and mlx-lm know; any other type gets the paper's keys, values
# and feed-forward input under llama's names (PEFT asks for target_modules there).
DEFAULT_TARGETS = {
    **dict.fromkeys(("llama", "mistral"), "k_proj,v_proj,down_proj"),
    **dict.fromkeys(("llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"),
                    "q_proj,v_proj,down_proj"),
    "phi": "q_proj,v_proj,fc2",
    "gptj": "q_proj,v_proj,fc_out",
    **dict.fromkeys(("gpt2", "gpt_bigcode"), "c_attn,mlp.c_proj"),
    "gpt_neox": "query_key_value,dense_4h_to_h",
    "*": "k_proj,v_proj,down_proj",
}
FEEDFORWARD = {
    "phi": ("fc2",),
    "gptj": ("fc_out",),
    **dict.fromkeys(("gpt2", "gpt_bigcode"), ("mlp.c_proj",)),
    "gpt_neox": ("dense_4h_to_h",),
    "*": ("down_proj",),
}


class IA3Linear(nn.Module):
    """A frozen linear (float or quantized) whose output or input is scaled by a learned ia3_l."""

    @classmethod
    def from_base(cls, base: nn.Module, hyper: Hyper, path: str = "") -> "IA3Linear":
        """Wrap `base`; ia3_l starts at ones, so the layer equals the base."""
        input_dims, output_dims = linear_dims(base)
        layer = cls(input_dims, output_dims, feedforward=path in hyper.feedforward)
        layer.linear = base
        return layer

    def __init__(self, input_dims: int, output_dims: int, feedforward: bool = False):
        super().__init__()
        self.linear = nn.Linear(input_dims, output_dims, bias=False)
        self.feedforward = feedforward
        shape = (input_dims, 1) if feedforward else (1, output_dims)
        self.ia3_l = mx.ones(shape, dtype=mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        if self.feedforward:  # the scale in float32, then back to the base's dtype, as PEFT
            return self.linear((x.astype(mx.float32) * self.ia3_l.T).astype(x.dtype))
        y = self.linear(x)
        return (y.astype(mx.float32) * self.ia3_l).astype(y.dtype)

    def fused_weight(self) -> mx.array:
        """W with its rows (output scale) or columns (input scale) scaled, (out, in) float32."""
        return dequantized_weight(self.linear).astype(mx.float32) * self.ia3_l.T

    def fused_bias(self) -> mx.array | None:
        """The base's bias, scaled along with the output (an input scale leaves it)."""
        bias = self.linear.get("bias")
        if bias is None or self.feedforward:
            return bias
        return (bias.astype(mx.float32) * self.ia3_l[0]).astype(bias.dtype)


def feedforward_paths(weights: dict[str, mx.array]) -> tuple[str, ...]:
    """The paths whose ia3_l scales the input: shaped (in, 1), where an output scale is (1, out)."""
    return tuple(name.rsplit(".", 1)[0] for name, value in weights.items()
                 if name.endswith(".ia3_l") and value.shape[0] != 1)


IA3 = Method(
    name="ia3",
    layer=IA3Linear,
    wraps=(nn.Linear, nn.QuantizedLinear),
    trainable=("ia3_l",),
    peft_type="IA3",
    peft_names={"ia3_l": "ia3_l"},
    low_rank=False,
    default_targets=DEFAULT_TARGETS,
    feedforward=FEEDFORWARD,
)
