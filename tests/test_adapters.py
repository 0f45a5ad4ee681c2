"""Adapter invariants, as one table over float and 4-bit bases (as PEFT's suite does)."""

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from helpers import randomize_lora_b
from mlx.utils import tree_flatten

from mlx_lora.adapters.inject import find_targets, inject, make_spec, parameter_counts
from mlx_lora.adapters.lora import LoRALinear
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.errors import UserError
from mlx_lora.formats.mlx_lm_adapter import load_adapters, save_adapters
from mlx_lora.fuse import fused_linear
from mlx_lora.model.load import load_base

BASES = {"float": 0, "4-bit": 4}
TOKENS = mx.array([[1, 5, 9, 33, 70, 2, 8, 100, 41, 7]])


def adapted(path, quantize: int, targets: str = "all-linear", num_layers: int = -1, seed=0):
    loaded = load_base(str(path), quantize=quantize)
    mx.random.seed(seed)
    spec = make_spec(loaded.model, "lora", targets, num_layers, Hyper(rank=4, alpha=8.0))
    inject(loaded.model, spec)
    return loaded, spec


@pytest.mark.parametrize("quantize", BASES.values(), ids=BASES.keys())
def test_zero_initialized_adapter_equals_base(tiny_llama, quantize):
    base = load_base(str(tiny_llama), quantize=quantize).model(TOKENS)
    loaded, _ = adapted(tiny_llama, quantize)
    np.testing.assert_array_equal(np.array(loaded.model(TOKENS)), np.array(base))


@pytest.mark.parametrize("quantize", BASES.values(), ids=BASES.keys())
def test_only_adapters_train_and_are_float32(tiny_llama, quantize):
    loaded, spec = adapted(tiny_llama, quantize)
    trainable = dict(tree_flatten(loaded.model.trainable_parameters()))
    assert trainable and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in trainable)
    assert len(trainable) == 2 * len(spec.paths)
    assert all(v.dtype == mx.float32 for v in trainable.values())
    n_trainable, n_total = parameter_counts(loaded.model)
    assert 0 < n_trainable < n_total


@pytest.mark.parametrize("quantize", BASES.values(), ids=BASES.keys())
def test_mlx_lm_loads_our_adapters_with_equal_logits(tiny_llama, tmp_path, quantize):
    loaded, spec = adapted(tiny_llama, quantize, targets="q_proj,v_proj,down_proj",
                           num_layers=1)
    randomize_lora_b(loaded.model)
    ours = np.array(loaded.model(TOKENS))
    save_adapters(tmp_path, loaded.model, spec, str(tiny_llama))

    theirs_model, _ = mlx_lm.load(str(tiny_llama), adapter_path=str(tmp_path))
    if quantize:  # mlx-lm quantizes nothing on its own: give it the same 4-bit base
        theirs_model, _ = mlx_lm.load(str(tiny_llama))
        nn.quantize(theirs_model, 64, 4, class_predicate=lambda p, m: isinstance(
            m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % 64 == 0)
        mlx_lm.utils.load_adapters(theirs_model, str(tmp_path))
    theirs = np.array(theirs_model(TOKENS))
    assert np.abs(ours - theirs).max() < 1e-5
    base = np.array(load_base(str(tiny_llama), quantize=quantize).model(TOKENS))
    assert np.abs(ours - base).max() > 1e-3  # the adapters do change the output


@pytest.mark.parametrize("quantize", BASES.values(), ids=BASES.keys())
def test_save_then_load_is_exact(tiny_llama, tmp_path, quantize):
    loaded, spec = adapted(tiny_llama, quantize, targets="re:.*layers\\.0\\..*_proj")
    randomize_lora_b(loaded.model)
    save_adapters(tmp_path, loaded.model, spec, str(tiny_llama))
    fresh = load_base(str(tiny_llama), quantize=quantize)
    assert load_adapters(fresh.model, tmp_path).paths == spec.paths
    np.testing.assert_array_equal(np.array(fresh.model(TOKENS)), np.array(loaded.model(TOKENS)))


def test_fused_layer_equals_adapted_layer():
    base = nn.Linear(64, 32)
    layer = LoRALinear.from_base(base, Hyper(rank=4, alpha=8.0))
    layer.lora_b = mx.random.normal(layer.lora_b.shape)
    x = mx.random.normal((3, 64))
    np.testing.assert_allclose(np.array(fused_linear(layer)(x)), np.array(layer(x)), atol=1e-5)


def test_targets_by_name_regex_all_linear_and_num_layers(tiny_llama):
    model = load_base(str(tiny_llama)).model
    every = find_targets(model, "all-linear", -1)
    assert len(every) == 7 * len(model.layers) and "lm_head" not in every
    assert find_targets(model, "q_proj,v_proj", -1) == [
        p for p in every if p.endswith(("q_proj", "v_proj"))]
    last = find_targets(model, "all-linear", 1)
    assert last and all(p.startswith(f"model.layers.{len(model.layers) - 1}.") for p in last)
    assert find_targets(model, r"re:model\.layers\.0\.mlp\..*", -1) == [
        p for p in every if p.startswith("model.layers.0.mlp.")]
    assert find_targets(model, "lm_head", -1) == ["lm_head"]


@pytest.mark.parametrize("targets, message", [
    ("nonexistent_proj", "matches no linear layer"),
    ("re:(", "bad regular expression"),
])
def test_bad_targets_say_what_exists(tiny_llama, targets, message):
    model = load_base(str(tiny_llama)).model
    with pytest.raises(UserError, match=message):
        find_targets(model, targets, -1)


def test_rank_larger_than_layer_is_refused(tiny_llama):
    model = load_base(str(tiny_llama)).model
    spec = make_spec(model, "lora", "q_proj", -1, Hyper(rank=4096, alpha=16.0))
    with pytest.raises(UserError, match="rank 4096 is larger than layer"):
        inject(model, spec)


def test_rslora_scale(tiny_llama):
    model = load_base(str(tiny_llama)).model
    spec = make_spec(model, "lora", "q_proj", -1, Hyper(rank=16, alpha=8.0, rslora=True))
    assert spec.hyper.scale == pytest.approx(8.0 / 4.0)
