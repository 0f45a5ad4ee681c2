"""QLoRA quantization of a frozen base: what is quantized, what stays float, and reloading it."""

import shutil

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import save_config, save_model

from mlx_lora.errors import UserError
from mlx_lora.model.load import load_base
from mlx_lora.model.quantize import is_quantized, quantize_base

TOKENS = mx.array([[1, 403, 407, 261, 378, 466, 370, 15, 30, 40, 200, 300]])


def relative_error(model, reference: np.ndarray) -> float:
    out = np.array(model(TOKENS))
    return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


def test_stories260k_down_proj_stays_float(stories260k, capsys):
    float_logits = np.array(load_base(str(stories260k)).model(TOKENS))
    capsys.readouterr()
    loaded = load_base(str(stories260k), quantize=4, group_size=64)
    # 5 blocks x (q, k, v, o, gate, up) + the tied embedding; down_proj's input is 172 wide.
    assert capsys.readouterr().err.strip() == (
        "quantized 31 layers to 4 bits (group size 64); 5 stay in float32 because 64 does "
        "not divide their input width (e.g. model.layers.0.mlp.down_proj: 172)"
    )
    layer = loaded.model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, nn.Linear)
    assert isinstance(layer.mlp.up_proj, nn.QuantizedLinear)
    assert isinstance(loaded.model.model.embed_tokens, nn.QuantizedEmbedding)
    assert loaded.quantization == {
        "group_size": 64, "bits": 4, "mode": "affine",
        **{f"model.layers.{i}.mlp.down_proj": False for i in range(5)},
    }
    assert loaded.config["quantization"] == loaded.quantization
    assert tree_flatten(loaded.model.trainable_parameters()) == []
    assert relative_error(loaded.model, float_logits) < 0.2


def test_8_bits_is_close_to_float(stories260k):
    float_logits = np.array(load_base(str(stories260k)).model(TOKENS))
    loaded = load_base(str(stories260k), quantize=8)
    assert loaded.quantization["bits"] == 8
    assert relative_error(loaded.model, float_logits) < 0.02


def test_every_layer_fits_in_tiny_llama(tiny_llama, capsys):
    loaded = load_base(str(tiny_llama), quantize=4)
    # 2 blocks x 7 linears + embedding + untied lm_head
    assert capsys.readouterr().err.strip() == "quantized 16 layers to 4 bits (group size 64)"
    assert isinstance(loaded.model.lm_head, nn.QuantizedLinear)
    assert is_quantized(loaded.model) == {"group_size": 64, "bits": 4, "mode": "affine"}


def test_saved_quantized_base_is_detected_and_reloads(tmp_path, stories260k, capsys):
    quantized = load_base(str(stories260k), quantize=4)
    out = tmp_path / "q4"
    save_model(out, quantized.model)
    save_config(dict(quantized.config), out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(stories260k / name, out / name)
    expected = np.array(quantized.model(TOKENS))
    capsys.readouterr()

    again = load_base(str(out), quantize=8)
    assert "already quantized at 4 bits (group size 64)" in capsys.readouterr().err
    assert again.quantization == quantized.quantization
    assert isinstance(again.model.model.layers[0].mlp.down_proj, nn.Linear)
    np.testing.assert_array_equal(np.array(again.model(TOKENS)), expected)
    served, _ = mlx_lm.load(str(out))  # mlx-lm alone rebuilds the same structure
    np.testing.assert_array_equal(np.array(served(TOKENS)), expected)


def test_float_base_is_not_quantized(tiny_qwen2):
    assert is_quantized(load_base(str(tiny_qwen2)).model) is None


def test_unsupported_group_size(tiny_llama):
    model = load_base(str(tiny_llama)).model
    with pytest.raises(UserError, match="group size 16"):
        quantize_base(model, 4, 16)
