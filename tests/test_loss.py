"""The chunked, loss-positions-only loss equals the plain full-logits loss, value and gradient."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lora.adapters.inject import inject, make_spec
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.data.batching import make_batch
from mlx_lora.data.tokenize import Example
from mlx_lora.model.head import split_model
from mlx_lora.model.load import load_base
from mlx_lora.model.probe import probe_model
from mlx_lora.objectives import chunked_ce
from mlx_lora.objectives.sft import batch_arrays, loss_sums, make_loss


def adapted(model_dir, targets="all-linear", quantize=0):
    """The model with LoRA on `targets`, lora_b random so every adapter gets a gradient."""
    model = load_base(str(model_dir), quantize=quantize).model
    inject(model, make_spec(model, "lora", targets, -1, Hyper(4, 8.0)))
    rng = np.random.default_rng(0)
    model.update(tree_unflatten([
        (k, mx.array(rng.standard_normal(v.shape).astype(np.float32) * 0.05))
        for k, v in tree_flatten(model.trainable_parameters())]))
    return model


def examples(vocab: int, seed: int = 0) -> list[Example]:
    """Records of varied length whose first 40% (the 'prompt') carries no loss."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (9, 40, 17, 3, 31):
        ids = rng.integers(0, vocab, n).astype(np.int32)
        out.append(Example(ids, np.arange(n) >= int(0.4 * n)))
    return out


def plain_and_grads(model, batch):
    def f(inputs, targets, mask):
        return loss_sums(model, inputs, targets, mask)[0]

    value, grads = nn.value_and_grad(model, f)(
        mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.loss_mask))
    return value, dict(tree_flatten(grads))


def fast_and_grads(model, batch, with_grad=True):
    loss = make_loss(model, split_model(model)[0], with_grad=with_grad)
    value, grads = nn.value_and_grad(model, lambda *a: loss(*a)[0])(*batch_arrays(batch))
    return value, dict(tree_flatten(grads))


def assert_same(plain, fast):
    (v1, g1), (v2, g2) = plain, fast
    assert v2.item() == pytest.approx(v1.item(), rel=1e-5)
    assert g1.keys() == g2.keys()
    for key in g1:
        scale = mx.abs(g1[key]).max().item()
        assert scale > 0, key
        assert mx.abs(g1[key] - g2[key]).max().item() <= 1e-4 * scale, key


@pytest.fixture(params=["tiny_llama", "tiny_qwen2"])
def model_dir(request):
    return request.getfixturevalue(request.param)


def test_splits_into_backbone_and_head(model_dir):
    split, problem = split_model(load_base(str(model_dir)).model)
    assert problem is None and split.frozen and split.weight is not None
    assert split.vocab_size == 512


def test_chunked_loss_and_grads_equal_plain(model_dir, monkeypatch):
    # 32 positions per chunk: the 5 records' targets span several chunks.
    monkeypatch.setattr(chunked_ce, "LOGITS_CHUNK_BYTES", 4 * 512 * 32)
    model = adapted(model_dir)
    batch = make_batch(examples(512), list(range(5)), 64)
    plain = plain_and_grads(model, batch)
    assert_same(plain, fast_and_grads(model, batch))
    assert_same(plain, fast_and_grads(model, batch, with_grad=False))  # the eval chunks


@pytest.mark.parametrize("model_dir", ["tiny_llama", "tiny_qwen2"], indirect=True)
def test_quantized_head_goes_through_its_own_vjp(model_dir, monkeypatch):
    monkeypatch.setattr(chunked_ce, "LOGITS_CHUNK_BYTES", 4 * 512 * 32)
    model = adapted(model_dir, quantize=4)  # QLoRA: lm_head / embeddings are quantized
    split, _ = split_model(model)
    assert split.frozen and split.weight is None
    batch = make_batch(examples(512), list(range(5)), 64)
    assert_same(plain_and_grads(model, batch), fast_and_grads(model, batch))


def test_trained_head_recomputes_chunks(tiny_llama):
    model = adapted(tiny_llama, targets="q_proj,lm_head")
    split, _ = split_model(model)
    assert not split.frozen
    batch = make_batch(examples(512), list(range(5)), 64)
    assert_same(plain_and_grads(model, batch), fast_and_grads(model, batch))


class ScaledLogits(nn.Module):
    """An mlx-lm model whose logits are scaled after the head, as some architectures do."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def model(self):
        return self.inner.model

    @property
    def layers(self):
        return self.inner.layers

    def __call__(self, inputs, cache=None):
        return 2.0 * self.inner(inputs, cache=cache)


def test_full_logits_when_head_does_not_split(tiny_qwen2):
    model = ScaledLogits(adapted(tiny_qwen2))
    split, problem = split_model(model)
    assert split is None and "scale" in problem
    note = probe_model(model, packing=False).loss_note()
    assert note is not None and "full logits" in note
    batch = make_batch(examples(512), list(range(5)), 64)
    assert_same(plain_and_grads(model, batch), fast_and_grads(model, batch))


def test_arithmetic_exp_matches_float64_exp():
    x = np.linspace(-100.0, 0.0, 200_001, dtype=np.float32)
    got = np.array(chunked_ce._exp_arithmetic(mx.array(x))).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    relative = got / want - 1
    assert np.abs(relative[x > -20]).max() < 2e-5  # where a softmax's terms matter
    assert abs(relative[x > -20].mean()) < 1e-7  # unbiased: sums of many terms stay exact
    assert np.abs(got - want).max() < 1e-6  # the floor: exp(-87) and below are ~1e-38


@pytest.mark.parametrize("width", [151_936, 1000, 997])  # 64, 8 and 1 groups
def test_row_reductions_equal_plain_ones(width):
    x = mx.random.normal((3, width), key=mx.random.key(1))
    assert mx.array_equal(chunked_ce._row_reduce(mx.max, x), x.max(axis=-1, keepdims=True))
    assert mx.allclose(chunked_ce._row_reduce(mx.sum, x), x.sum(axis=-1, keepdims=True),
                       rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("with_grad", [True, False])
def test_per_position_terms_equal_the_plain_per_token_loss(tiny_llama, monkeypatch, with_grad):
    """What preference losses take: each loss position's term, still without full logits."""
    monkeypatch.setattr(chunked_ce, "LOGITS_CHUNK_BYTES", 4 * 512 * 32)  # several chunks
    model = adapted(tiny_llama)
    split, _ = split_model(model)
    batch = make_batch(examples(512), list(range(5)), 64)
    inputs, _, positions, targets, weights = batch_arrays(batch)
    coefficients = mx.random.normal(positions.shape, key=mx.random.key(3))

    def plain(_):
        logits = model(inputs).reshape(-1, split.vocab_size)[positions]
        terms = nn.losses.cross_entropy(logits, targets) * weights
        return (terms * coefficients).sum(), terms

    def chunked(_):
        hidden = split.backbone(inputs).reshape(-1, 64)[positions]  # hidden size 64
        terms = chunked_ce.chunked_ce(split, hidden, targets, weights, with_grad,
                                      per_position=True)
        return (terms * coefficients).sum(), terms

    (v1, t1), g1 = nn.value_and_grad(model, plain)(None)
    (v2, t2), g2 = nn.value_and_grad(model, chunked)(None)
    np.testing.assert_allclose(np.array(t2), np.array(t1), rtol=1e-5, atol=1e-5)
    assert v2.item() == pytest.approx(v1.item(), rel=1e-5)
    if with_grad:
        for key, value in dict(tree_flatten(g1)).items():
            np.testing.assert_allclose(np.array(dict(tree_flatten(g2))[key]), np.array(value),
                                       rtol=1e-4, atol=1e-6, err_msg=key)
