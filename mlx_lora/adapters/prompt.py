"""Prompt tuning (Lester et al. 2021): N learned input embeddings put before every sequence.

As PEFT's PROMPT_TUNING computes it: the model runs on [virtual embeddings; token embeddings],
the virtual tokens at positions 0..N-1, causal. Their keys and values at each layer depend
only on the virtual embeddings, so they are computed once per forward pass (a batch of one)
and handed to the input through the cache (model/prefix_cache.py). `prompt_embeddings`
(N, hidden) is PEFT's tensor as it is. They start as the tokens of --prompt-init-text
(PEFT's TEXT init), else as random tokens of the vocabulary (PEFT's SAMPLE_VOCAB).
Nothing folds into the weights, and mlx-lm cannot load it: mlx-lora's loaders do.
"""

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.adapters.protocol import Method
from mlx_lora.model.prefix_cache import compute_dtype, input_embedding, sequence_kv


class PromptEmbedding(nn.Module):
    """N trained float32 input embeddings that lead every sequence."""

    input_embeddings = True  # its keys and values come from running the model on them

    @classmethod
    def from_model(cls, model: nn.Module, ids: list[int]) -> "PromptEmbedding":
        """Embeddings that start as the model's own embeddings of the tokens `ids`."""
        embedded = input_embedding(model)(mx.array(ids))  # (N, H); a quantized one dequantizes
        layer = cls(*embedded.shape)
        layer.prompt_embeddings = embedded.astype(mx.float32)
        return layer

    def __init__(self, num_virtual_tokens: int, hidden_size: int):
        super().__init__()
        self.prompt_embeddings = mx.zeros((num_virtual_tokens, hidden_size), mx.float32)

    def keys_values(self, model: nn.Module) -> list[tuple[mx.array, mx.array]]:
        """Each layer's keys and values of the virtual tokens, from the model run on them."""
        embeddings = self.prompt_embeddings.astype(compute_dtype(model))[None]  # (1, N, H)
        return sequence_kv(model, embeddings=embeddings)


PROMPT = Method(
    name="prompt",
    layer=None,
    wraps=(),
    trainable=(),  # the virtual module's prompt_embeddings
    peft_type="PROMPT_TUNING",
    peft_names={"prompt_embeddings": "prompt_embeddings"},
    low_rank=False,
    default_targets={"*": ""},  # it wraps no layer
    virtual=PromptEmbedding,
    fusable=False,  # virtual tokens are no weight
)
