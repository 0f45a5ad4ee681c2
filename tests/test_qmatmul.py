"""QLoRA's matmul paths: dequantize-then-GEMM trains as the quantized matmul does, keeps only
the packed weights resident, and is chosen by measurement."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import addition_rows, randomize_lora_b, write_splits
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

from mlx_lora.adapters.inject import inject, make_spec
from mlx_lora.adapters.lora import LoRALinear
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.cli import cli
from mlx_lora.config import TrainConfig, build_config
from mlx_lora.data.batching import make_batch
from mlx_lora.data.tokenize import Example
from mlx_lora.errors import UserError
from mlx_lora.model.head import find_head, split_model
from mlx_lora.model.load import load_base
from mlx_lora.model.qmatmul import (
    DequantizingEmbedding,
    DequantizingLinear,
    MatmulChoice,
    choose_matmul,
    dequantized,
    quantized_again,
    time_paths,
)
from mlx_lora.model.recompute import checkpoint_blocks
from mlx_lora.objectives.sft import SFT
from mlx_lora.train.run import train
from mlx_lora.train.step import make_grad_step


def adapted(model_dir, setting: str, grad_checkpoint: bool = False) -> nn.Module:
    """The 4-bit base with LoRA on every linear (lora_b moved), on the path `setting` says."""
    model = load_base(str(model_dir), quantize=4).model
    mx.random.seed(0)
    inject(model, make_spec(model, "lora", "all-linear", -1, Hyper(4, 8.0)))
    randomize_lora_b(model)
    choose_matmul(model, setting, 256, find_head(model)[0], 32)
    if grad_checkpoint:
        checkpoint_blocks(list(model.layers))
    return model


def loss_and_grads(model: nn.Module) -> tuple[float, dict[str, np.ndarray]]:
    """One compiled training step's summed loss and LoRA gradients on fixed records."""
    rng = np.random.default_rng(0)
    records = [Example(rng.integers(3, 500, n).astype(np.int32), rng.random(n) < 0.8)
               for n in (40, 23, 61, 9)]
    grad_step = make_grad_step(model, SFT.make_loss(model, split_model(model)[0], with_grad=True))
    loss, _, grads = grad_step(*SFT.arrays(make_batch(records, [0, 1, 2, 3], 64)), mx.array(1.0))
    return loss.item(), {k: np.array(v) for k, v in tree_flatten(grads)}


@pytest.mark.parametrize("grad_checkpoint", [False, True], ids=["plain", "grad-checkpoint"])
@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen2"])
def test_dequantize_path_trains_as_the_quantized_matmul(model_name, grad_checkpoint, request):
    model_dir = request.getfixturevalue(model_name)  # untied QuantizedLinear / tied embedding head
    quantized = adapted(model_dir, "quantized", grad_checkpoint)
    dequantizing = adapted(model_dir, "dequantize", grad_checkpoint)
    head = find_head(dequantizing)[0]
    assert type(head) in (DequantizingLinear, DequantizingEmbedding)
    assert split_model(dequantizing)[0].weight is not None  # the loss dequantizes it once
    assert all(type(m.linear) is DequantizingLinear for m in dequantizing.modules()
               if isinstance(m, LoRALinear))
    loss, grads = loss_and_grads(quantized)
    dq_loss, dq_grads = loss_and_grads(dequantizing)
    # Not bit-exact: the float GEMM (BLAS) sums dot products in another order than MLX's
    # quantized kernel does, so float32 results differ in their last bits. Measured here: the
    # loss equal, the gradients 6e-7 apart (relative), as two BLAS libraries would be.
    assert dq_loss == pytest.approx(loss, rel=1e-5)
    assert dq_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        error = np.linalg.norm(dq_grads[name] - grad) / np.linalg.norm(grad)
        assert error < 1e-5, name


def test_parameters_are_the_packed_weights_only(tiny_qwen2):
    before = tree_flatten(adapted(tiny_qwen2, "quantized").parameters())
    model = adapted(tiny_qwen2, "dequantize")
    after = tree_flatten(model.parameters())
    assert [(k, v.shape, v.dtype) for k, v in after] == [(k, v.shape, v.dtype)
                                                         for k, v in before]
    assert sum(type(m) is DequantizingLinear for m in model.modules()) == 14
    quantized_again(model)
    assert not any(type(m) in (DequantizingLinear, DequantizingEmbedding)
                   for m in model.modules())


class Stack(nn.Module):
    """Layers big enough that their float weights dwarf everything else in a step."""

    def __init__(self, n_layers: int, width: int):
        super().__init__()
        self.layers = [LoRALinear.from_base(nn.QuantizedLinear(width, width, bias=False),
                                            Hyper(4, 8.0)) for _ in range(n_layers)]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def step_peak_bytes(model: nn.Module, forward) -> int:
    """Peak memory of a compiled LoRA gradient step above what is resident."""
    model.freeze()
    for layer in model.layers:
        layer.unfreeze(keys=["lora_a", "lora_b"])
    x = mx.random.normal((8, 1024), key=mx.random.key(1))
    state = model.state
    step = mx.compile(nn.value_and_grad(model, lambda x: forward(x).sum()), inputs=state,
                      outputs=state)
    mx.eval(step(x))
    mx.synchronize()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(step(x))
    return mx.get_peak_memory() - resident


def test_float_weights_are_transient_per_layer():
    model = Stack(32, 1024)
    mx.eval(model.parameters())
    float_weights = 32 * 1024 * 1024 * 4  # 128 MiB; one layer's: 4 MiB

    def dequantize_by_autodiff(x):  # what plain autodiff of dequantize + matmul keeps
        for layer in model.layers:
            x = x @ dequantized(layer.linear).T + layer.scale * (x @ layer.lora_a) @ layer.lora_b
        return x

    assert step_peak_bytes(model, dequantize_by_autodiff) > float_weights
    choose_matmul(model, "dequantize", 8)
    # Measured 28-29 MiB with 4, 16 or 32 layers: a few layers' float weights at a time (a
    # dequantize makes a temporary as large as its output, and the forward's last layers
    # overlap the backward's first), however deep the model.
    assert step_peak_bytes(model, model) < float_weights / 2


def fake_timer(calls: list, fast_quantized_rows: int):
    """A timer that says dequantize is faster except at fast_quantized_rows rows."""

    def timer(layer, rows):
        calls.append((rows, layer.weight.shape))
        return {"quantized": 1.0, "dequantize": 2.0 if rows == fast_quantized_rows else 0.25}

    return timer


def test_auto_takes_the_path_timed_faster_once_per_shape(tiny_llama):
    model = load_base(str(tiny_llama), quantize=4).model
    head = find_head(model)[0]
    calls = []
    choice = choose_matmul(model, "auto", 256, head, 32, timer=fake_timer(calls, 32))
    # 2 blocks x (q, k, v, o, gate, up, down): 4 shapes (k and v are alike, gate and up), + head
    assert sorted(calls) == sorted({*calls}) and len(calls) == 5
    assert type(head) is nn.QuantizedLinear  # timed faster quantized at its 32 rows
    assert sum(type(m) is DequantizingLinear for m in model.modules()) == 14
    assert choice.setting == "auto"  # mixed: no single path to record
    assert choice.line.startswith(
        "qlora matmul: dequantize-then-GEMM for 14 layers, quantized for 1 (5 shapes timed in ")
    assert choice.line.endswith("; 3.3x the speed of quantized for all)")  # 15 / (14/4 + 1)

    fresh = load_base(str(tiny_llama), quantize=4).model
    everywhere = choose_matmul(fresh, "auto", 256, find_head(fresh)[0], 32,
                               timer=fake_timer([], 0))
    assert everywhere.setting == "dequantize"
    assert "for 15 layers, quantized for 0" in everywhere.line


def test_the_real_timer_times_both_paths(tiny_llama):
    layer = load_base(str(tiny_llama), quantize=4).model.model.layers[0].mlp.up_proj
    seconds = time_paths(layer, 64)
    assert seconds.keys() == {"quantized", "dequantize"} and min(seconds.values()) > 0


def test_forced_settings_and_float_bases(tiny_llama):
    model = load_base(str(tiny_llama), quantize=4).model
    choice = choose_matmul(model, "quantized", 256, find_head(model)[0], 32, timer=None)
    assert choice.setting == "quantized"
    assert choice.line == ("qlora matmul: dequantize-then-GEMM for 0 layers, quantized for 15 "
                           "(--qlora-matmul quantized)")
    float_model = load_base(str(tiny_llama)).model
    assert choose_matmul(float_model, "auto", 256, find_head(float_model)[0], 32,
                         timer=None) == MatmulChoice("auto", None)  # nothing to say or time


def test_the_flag_and_config_key():
    assert TrainConfig().qlora_matmul == "auto"
    for value in ("auto", "quantized", "dequantize"):
        assert build_config({"qlora_matmul": value}, {}, "c.yaml").qlora_matmul == value
    assert build_config({"qlora_matmul": "auto"}, {"qlora_matmul": "quantized"},
                        "c.yaml").qlora_matmul == "quantized"
    with pytest.raises(UserError, match="qlora_matmul"):
        build_config({"qlora_matmul": "fast"}, {}, "c.yaml")
    help_text = CliRunner().invoke(cli, ["train", "--help"]).output
    assert "--qlora-matmul [auto|quantized|dequantize]" in help_text


def trained(model_dir, data, out, setting: str):
    result = train(TrainConfig(model=str(model_dir), data=str(data), adapter_path=str(out),
                               quantize=4, qlora_matmul=setting, iters=3, batch_size=4,
                               max_seq_length=64, learning_rate=1e-3, steps_per_eval=0,
                               save_every=100, seed=0))
    return result, json.loads((out / "adapter_config.json").read_text())


def test_training_on_either_path_saves_the_same_adapter(tiny_qwen2, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    data = write_splits(tmp_path / "data", {"train": addition_rows(6, 4),
                                            "valid": addition_rows(2, 2)})
    quantized, quantized_config = trained(tiny_qwen2, data, tmp_path / "q", "quantized")
    capsys.readouterr()
    dequantizing, config = trained(tiny_qwen2, data, tmp_path / "d", "dequantize")
    assert "qlora matmul: dequantize-then-GEMM for 15 layers, quantized for 0" in (
        capsys.readouterr().err)
    assert config == quantized_config
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(
        p.name for p in (tmp_path / "q").iterdir())
    weights, reference = (load_file(str(tmp_path / run / "adapters.safetensors"))
                          for run in ("d", "q"))
    assert weights.keys() == reference.keys()
    for key, value in reference.items():
        assert weights[key].dtype == value.dtype and weights[key].shape == value.shape
        np.testing.assert_allclose(weights[key], value, atol=1e-5, err_msg=key)
    assert "qlora_matmul: dequantize" in (tmp_path / "d" / "config.yaml").read_text()
    # After training, generation's few rows per call go back to MLX's quantized matmul.
    assert not any(type(m) in (DequantizingLinear, DequantizingEmbedding)
                   for m in dequantizing.loaded.model.modules())
    assert quantized.step == dequantizing.step == 3
