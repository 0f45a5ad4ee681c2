"""Prefix tuning (Li & Liang 2021): N learned keys and values before every sequence, at each layer.

As PEFT's PREFIX_TUNING computes it (without its training-time MLP): each layer attends to N
extra keys and values before the input's own, and the input's tokens sit at positions N..
(RoPE rotates them from there; the prefix keys are used as stored). `prompt_embeddings` is
PEFT's tensor as it is: (N, layers * 2 * kv_heads * head_dim), per layer the keys then the
values, each (kv_heads, head_dim). They start as the keys and values the base computes for the
tokens of --prompt-init-text, else for random tokens of the vocabulary, so a fresh prefix is
the model reading those tokens first (Li & Liang found real words' activations a better start
than noise). Nothing folds into the weights, and mlx-lm cannot load it: mlx-lora's loaders do.
"""

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.adapters.protocol import Method
from mlx_lora.errors import UserError
from mlx_lora.model.prefix_cache import compute_dtype, sequence_kv


class PrefixKV(nn.Module):
    """N trained float32 keys and values for every layer, in PEFT's flat layout."""

    input_embeddings = False  # its keys and values are the trained tensor itself

    @classmethod
    def from_model(cls, model: nn.Module, ids: list[int]) -> "PrefixKV":
        """The keys and values the model computes for the tokens `ids`, at every layer."""
        kv = sequence_kv(model, ids)
        shapes = {(k.shape[1], k.shape[3], v.shape[3]) for k, v in kv}
        kv_heads, key_dim, value_dim = shapes.pop()
        if shapes or key_dim != value_dim:
            raise UserError("prefix tuning keeps keys and values of one shape at every layer "
                            "(PEFT's layout), which this model's attention does not have; use "
                            "prompt or lora")
        layer = cls(len(ids), len(kv), kv_heads, key_dim)
        # (1, kv_heads, N, head_dim) -> (N, kv_heads * head_dim), keys then values per layer
        rows = [t[0].transpose(1, 0, 2).reshape(len(ids), -1) for pair in kv for t in pair]
        layer.prompt_embeddings = mx.concatenate(rows, axis=1).astype(mx.float32)
        return layer

    def __init__(self, num_virtual_tokens: int, num_layers: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.kv_heads, self.head_dim = kv_heads, head_dim
        width = num_layers * 2 * kv_heads * head_dim
        self.prompt_embeddings = mx.zeros((num_virtual_tokens, width), mx.float32)

    def keys_values(self, model: nn.Module) -> list[tuple[mx.array, mx.array]]:
        """Each layer's (1, kv_heads, N, head_dim) keys and values: views of the trained tensor."""
        n = self.prompt_embeddings.shape[0]
        blocks = self.prompt_embeddings.astype(compute_dtype(model)).reshape(
            n, -1, self.kv_heads, self.head_dim).transpose(1, 2, 0, 3)  # (2 layers, kv_heads, N, d)
        return [(blocks[i][None], blocks[i + 1][None]) for i in range(0, blocks.shape[0], 2)]


PREFIX = Method(
    name="prefix",
    layer=None,
    wraps=(),
    trainable=(),  # the virtual module's prompt_embeddings
    peft_type="PREFIX_TUNING",
    peft_names={"prompt_embeddings": "prompt_embeddings"},
    low_rank=False,
    default_targets={"*": ""},  # it wraps no layer
    virtual=PrefixKV,
    fusable=False,  # virtual tokens are no weight
)
