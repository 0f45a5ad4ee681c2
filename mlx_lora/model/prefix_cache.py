"""Put virtual tokens (prompt and prefix tuning) before an mlx-lm model's input, through its cache.

mlx-lm's attention rotates queries and keys from `cache.offset`, passes its keys and values
through `cache.update_and_fetch` and asks the cache for its mask. A cache that starts at
offset N and returns N fixed keys and values before the step's own makes every layer attend
to N tokens the input does not hold, the input's tokens at positions N.. (where transformers
puts them after PEFT's virtual tokens). No model class changes. For generation, mlx-lm's own
prompt cache is filled with the same keys and values before the prompt.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import (
    ConcatenateKVCache,
    KVCache,
    RotatingKVCache,
    create_attention_mask,
    make_prompt_cache,
)

from mlx_lora.errors import UserError
from mlx_lora.model.logit_gap import logit_gap

KEY = "virtual_tokens"  # where a VirtualTokens module (adapters/protocol.py) sits in the model
PROBE_IDS = [1, 2, 3, 4, 5, 6, 7, 8]  # the first half the prefix, the rest the input


class PrefixCache:
    """One layer's cache for a forward pass over whole sequences: fixed keys and values come
    before the step's own; it keeps nothing, so a compiled step can trace it."""

    def __init__(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values  # (1, kv_heads, N, head_dim)
        self.offset = keys.shape[2]  # the input's RoPE positions start after the prefix

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        """n queries over the N prefix keys and their own, causal: as mlx-lm's KVCache makes it."""
        return create_attention_mask(n, self.offset, return_array, window_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """The prefix's keys and values, then this step's: (B, kv_heads, N + L, head_dim)."""
        return _joined(self.keys, keys), _joined(self.values, values)


def _joined(prefix: mx.array, own: mx.array) -> mx.array:
    prefix = mx.broadcast_to(prefix.astype(own.dtype), (own.shape[0], *prefix.shape[1:]))
    return mx.concatenate([prefix, own], axis=2)


def prefix_cache(model: nn.Module) -> list[PrefixCache] | None:
    """The cache argument that puts the model's virtual tokens before a batch (None without)."""
    virtual = model.get(KEY)
    if virtual is None:
        return None
    return [PrefixCache(keys, values) for keys, values in virtual.keys_values(model)]


def generation_cache(model: nn.Module) -> list | None:
    """mlx-lm's prompt cache for the model, already holding its virtual tokens (None without)."""
    virtual = model.get(KEY)
    return None if virtual is None else filled_cache(model, virtual.keys_values(model))


def filled_cache(model: nn.Module, keys_values: list[tuple[mx.array, mx.array]]) -> list:
    """mlx-lm's prompt cache for the model holding these keys and values of each layer."""
    cache = make_prompt_cache(model)
    for layer_cache, (keys, values) in zip(cache, keys_values, strict=True):
        layer_cache.update_and_fetch(keys, values)
    return cache


def sequence_kv(model: nn.Module, ids: list[int] | None = None,
                embeddings: mx.array | None = None) -> list[tuple[mx.array, mx.array]]:
    """Each layer's keys and values of one sequence from position 0, as a KV cache holds them:
    of token `ids`, or of input `embeddings` (1, N, H) (models that take input_embeddings)."""
    caches = [ConcatenateKVCache() for _ in model.layers]
    if embeddings is None:
        model(mx.array(ids)[None], cache=caches)
    else:  # the ids are not read when embeddings are given; the logits are never evaluated
        model(mx.zeros(embeddings.shape[:2], mx.int32), cache=caches, input_embeddings=embeddings)
    return [(cache.keys, cache.values) for cache in caches]


def input_embedding(model: nn.Module) -> nn.Module:
    """The model's token embedding (float or quantized), where mlx-lm models keep it."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not isinstance(embed, (nn.Embedding, nn.QuantizedEmbedding)):
        raise UserError(f"{type(model).__module__}: virtual tokens need the token embedding at "
                        "model.embed_tokens, which this model does not have; use lora")
    return embed


def compute_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype the model computes in: its token embedding's."""
    embed = input_embedding(model)
    return embed.scales.dtype if isinstance(embed, nn.QuantizedEmbedding) else embed.weight.dtype


def check_model(model: nn.Module, method: str, embeddings: bool) -> None:
    """Refuse a model that cannot take virtual tokens through its cache: every layer must keep
    keys and values, and a prefix cache must give the logits the prefix's tokens would."""
    for i, cache in enumerate(make_prompt_cache(model)):
        if not isinstance(cache, (KVCache, RotatingKVCache)):
            raise UserError(f"{method} tuning hands virtual tokens to every layer as keys and "
                            f"values, but layer {i} of this model keeps a {type(cache).__name__}; "
                            "use lora")
    if problem := _prefix_problem(model, embeddings):
        raise UserError(f"{method} tuning: {problem}; use lora")


def _prefix_problem(model: nn.Module, embeddings: bool) -> str | None:
    half = len(PROBE_IDS) // 2
    was_training = model.training
    model.eval()  # no dropout in the comparison
    try:
        whole = model(mx.array(PROBE_IDS)[None])[0, half:]
        if embeddings:
            token_embeddings = input_embedding(model)(mx.array(PROBE_IDS[:half]))[None]
            prefix = sequence_kv(model, embeddings=token_embeddings)
        else:
            prefix = sequence_kv(model, PROBE_IDS[:half])
        cache = [PrefixCache(keys, values) for keys, values in prefix]
        after = model(mx.array(PROBE_IDS[half:])[None], cache=cache)[0]
        gap = logit_gap(whole, after)
    except Exception as e:  # any architecture that cannot take the cache or the embeddings
        return f"{type(model).__module__} does not take a prefix cache ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
    if gap:
        return (f"a prefix through the cache changes the logits by {gap[0]:.3g} of {gap[1]:.3g} "
                "(the model ignores its cache's offset or mask)")
    return None


def attach(model: nn.Module, virtual: type, method: str, n: int, ids: tuple[int, ...]) -> None:
    """Freeze the model and put n virtual tokens of class `virtual` in it that start as the
    tokens `ids` (empty: random tokens of the vocabulary); they alone train."""
    check_model(model, method, virtual.input_embeddings)
    if not ids:
        vocab = input_embedding(model).weight.shape[0]
        ids = tuple(mx.random.randint(0, vocab, (n,)).tolist())
    model.freeze()
    setattr(model, KEY, virtual.from_model(model, list(ids)))  # a new module's arrays train


def init_ids(tokenizer, text: str, n: int) -> tuple[int, ...]:
    """PEFT's prompt_tuning_init TEXT: the text's tokens, repeated or cut to n."""
    ids = list(tokenizer.encode(text))
    if not ids:
        raise UserError(f"--prompt-init-text {text!r} has no tokens; give some text or drop it")
    return tuple((ids * (n // len(ids) + 1))[:n])
