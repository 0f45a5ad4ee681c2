"""Blockwise attention: the plain attention's loss and gradients, in a fraction of its memory."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2, qwen3
from mlx_lm.models.cache import make_prompt_cache

from mlx_lora.adapters.inject import inject, make_spec
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.config import TrainConfig
from mlx_lora.errors import UserError
from mlx_lora.model.blockwise_attention import (
    attention_modules,
    blockwise_attention,
    choose_attention,
    fused_keeps_scores,
)
from mlx_lora.model.packed_mask import segment_caches
from mlx_lora.model.recompute import checkpoint_blocks
from mlx_lora.train.checks import blockwise_ruled_out, check_method
from mlx_lora.train.step import make_grad_step

VOCAB, LENGTH = 64, 24
COMMON = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
              rms_norm_eps=1e-6, vocab_size=VOCAB, num_key_value_heads=2)
ARCHS = {
    "qwen2": lambda: qwen2.Model(qwen2.ModelArgs(model_type="qwen2", **COMMON)),  # GQA, biases
    "llama": lambda: llama.Model(llama.ModelArgs(model_type="llama", **COMMON)),
    "qwen3": lambda: qwen3.Model(qwen3.ModelArgs(  # q_norm, k_norm, a head_dim of its own
        model_type="qwen3", max_position_embeddings=256, head_dim=16, tie_word_embeddings=True,
        rope_theta=10000.0, **COMMON)),
}


def adapted(arch: str) -> nn.Module:
    """A tiny float32 model of `arch` with LoRA on every linear, lora_b away from zero."""
    mx.random.seed(0)
    model = ARCHS[arch]()
    inject(model, make_spec(model, "lora", "all-linear", -1, Hyper(4, 8.0, 0.0, False, "default")))
    model.load_weights([(k, 0.1 * mx.random.normal(v.shape)) for k, v in
                        tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")],
                       strict=False)
    mx.eval(model.parameters())
    return model


def inputs(packed: bool):
    """Token ids, input embeddings' stand-in and the cache argument (None: causal)."""
    ids = mx.random.randint(0, VOCAB, (2, LENGTH), key=mx.random.key(1))
    embeddings = mx.random.normal((2, LENGTH, COMMON["hidden_size"]), key=mx.random.key(2))
    segments = mx.array([[1] * 9 + [2] * 15, [1] * 5 + [2] * 13 + [0] * 6])  # two records a row
    return ids, embeddings, segments if packed else None


def loss_and_grads(model: nn.Module, ids, embeddings, segments):
    """The loss and its gradients with respect to every LoRA factor and the input embeddings."""
    cache = None if segments is None else segment_caches(model, segments)

    def loss(params, embeddings):
        model.update(params)
        logits = model(ids, cache=cache, input_embeddings=embeddings)  # (B, L, V)
        return nn.losses.cross_entropy(logits[:, :-1], ids[:, 1:]).mean()

    value, grads = mx.value_and_grad(loss, argnums=(0, 1))(model.trainable_parameters(),
                                                           embeddings)
    mx.eval(value, grads)
    return value, grads


def assert_same(expected, got) -> None:
    """Equal losses and gradients, to float32's rounding (1e-5 of each tensor's scale)."""
    (loss, grads), (got_loss, got_grads) = expected, got
    assert abs(loss.item() - got_loss.item()) <= 1e-5 * abs(loss.item())
    want, have = tree_flatten(grads), tree_flatten(got_grads)
    assert [k for k, _ in want] == [k for k, _ in have] and len(want) > 20
    for (name, a), (_, b) in zip(want, have, strict=True):
        a, b = np.array(a), np.array(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), name


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("recompute", [True, False], ids=["blockwise", "causal-blocks"])
def test_blockwise_equals_plain(arch, packed, recompute):
    model = adapted(arch)
    batch = inputs(packed)
    plain = loss_and_grads(model, *batch)
    attention = attention_modules(model.layers)
    assert len(attention) == 2
    for rows in (4, 7, 24):  # 7 does not divide 24; 24 is one block
        blockwise_attention(attention, rows, recompute)
        assert_same(plain, loss_and_grads(model, *batch))


def test_blockwise_inside_checkpointed_blocks():
    model = adapted("qwen2")
    batch = inputs(packed=True)
    plain = loss_and_grads(model, *batch)
    checkpoint_blocks(list(model.layers))
    blockwise_attention(attention_modules(model.layers), 5)
    assert_same(plain, loss_and_grads(model, *batch))


def compiled_grads(model: nn.Module, ids, segments):
    """Loss and gradients through the training run's compiled step."""

    def loss(ids, segments):
        cache = None if segments is None else segment_caches(model, segments)
        logits = model(ids, cache=cache)  # (B, L, V)
        return nn.losses.cross_entropy(logits[:, :-1], ids[:, 1:]).sum(), mx.array(0)

    total, _, grads = make_grad_step(model, loss)(ids, segments, mx.array(1.0))
    mx.eval(total, grads)
    return total, grads


@pytest.mark.parametrize("grad_checkpoint", [False, True])
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_compiled_training_step(grad_checkpoint, packed):
    model = adapted("llama")
    ids, _, segments = inputs(packed)
    plain = compiled_grads(model, ids, segments)
    if grad_checkpoint:
        checkpoint_blocks(list(model.layers))
    for rows, recompute in ((6, True), (24, True), (6, False)):  # 24: one block
        blockwise_attention(attention_modules(model.layers), rows, recompute)
        assert_same(plain, compiled_grads(model, ids, segments))


def test_generation_cache_goes_the_plain_way():
    model = adapted("qwen3")
    ids = inputs(packed=False)[0][:1]
    plain = model(ids, cache=make_prompt_cache(model))
    blockwise_attention(attention_modules(model.layers), 4)
    cache = make_prompt_cache(model)
    prompt = model(ids[:, :-1], cache=cache)
    last = model(ids[:, -1:], cache=cache)  # one new token attends to the cached keys
    np.testing.assert_allclose(np.array(mx.concatenate([prompt, last], axis=1)), np.array(plain),
                               atol=1e-5)


def peak_bytes(model: nn.Module, ids) -> int:
    """Peak memory above what was held before, of one compiled gradient of the model."""
    step = mx.compile(nn.value_and_grad(model, lambda ids: model(ids).sum()),
                      inputs=model.state, outputs=model.state)
    mx.eval(step(ids))
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(step(ids))
    return mx.get_peak_memory() - before


def test_blockwise_keeps_a_fraction_of_the_memory():
    model = adapted("qwen2")
    ids = mx.random.randint(0, VOCAB, (1, 1024), key=mx.random.key(3))
    plain = peak_bytes(model, ids)  # each layer keeps (4, 1024, 1024) scores for the backward
    blockwise_attention(attention_modules(model.layers), 64)
    blockwise = peak_bytes(model, ids)
    assert blockwise < 0.25 * plain, (blockwise, plain)
    blockwise_attention(attention_modules(model.layers), 128, recompute=False)
    causal_blocks = peak_bytes(model, ids)  # 8 blocks keep 9/16 of the scores
    assert blockwise < causal_blocks < 0.75 * plain, (causal_blocks, plain)


class CacheBlindAttention(nn.Module):
    """An attention that makes its own causal mask and never asks its cache for keys."""

    def __init__(self, dims: int):
        super().__init__()
        self.qkv = nn.Linear(dims, 3 * dims)

    def __call__(self, x, mask=None, cache=None):
        q, k, v = (t[:, None] for t in mx.split(self.qkv(x), 3, axis=-1))
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask="causal")[:, 0]


def test_choice_falls_back_to_fused_when_blockwise_does_not_match():
    model = adapted("llama")
    model.layers[1].self_attn = CacheBlindAttention(COMMON["hidden_size"])
    for choice in ("auto", "blockwise"):
        chosen, line = choose_attention(model, list(model.layers), choice, 4096, True, None)
        assert chosen == "fused" and "not blockwise" in line and "AttributeError" in line
        assert [type(m).__name__ for m in attention_modules(model.layers)] == [
            "Attention", "CacheBlindAttention"]  # left plain, every one of them


def test_choice_rules():
    model = adapted("qwen2")
    blocks = list(model.layers)
    assert choose_attention(model, blocks, "fused", 4096, True, None)[0] == "fused"
    short = choose_attention(model, blocks, "auto", 200, True, None)
    assert short[0] == "fused" and "200 tokens" in short[1]
    ruled_out = blockwise_ruled_out(TrainConfig(dropout=0.1))
    assert "--dropout 0.1" in ruled_out
    assert choose_attention(model, blocks, "auto", 4096, True, ruled_out)[0] == "fused"
    assert type(blocks[0].self_attn).__name__ == "Attention"
    if mx.default_device() == mx.cpu:  # MLX's CPU attention keeps its scores for the backward
        assert fused_keeps_scores()
        chosen, line = choose_attention(model, blocks, "auto", 4096, True, None)
        assert chosen == "blockwise" and "in 2 layers" in line
        assert type(blocks[0].self_attn).__name__ == "BlockwiseAttention"
        assert blocks[0].self_attn.recompute
        chosen, line = choose_attention(model, blocks, "auto", 640, True, None)
        assert chosen == "causal-blocks" and "masked or not" in line
        assert not blocks[0].self_attn.recompute and blocks[0].self_attn.block_rows == 128


def test_explicit_blockwise_is_refused_where_it_cannot_be_exact():
    with pytest.raises(UserError, match="--dropout 0.1 would draw other masks"):
        check_method(TrainConfig(attention="blockwise", dropout=0.1))
    with pytest.raises(UserError, match="--attention causal-blocks calls attention block by"):
        check_method(TrainConfig(attention="causal-blocks", dropout=0.1))
    with pytest.raises(UserError, match="prefix tuning's virtual keys"):
        check_method(TrainConfig(attention="blockwise", fine_tune_type="prefix"))
    check_method(TrainConfig(attention="auto", dropout=0.1))  # auto takes fused, saying why
