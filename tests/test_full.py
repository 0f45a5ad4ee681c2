"""Full fine-tuning: what trains, mlx-lm serves it, eval/generate, refusals, bfloat16."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lora import Finetune
from mlx_lora.adapters.inject import inject, make_spec
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.cli import cli
from mlx_lora.config import TrainConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.convert import load_any_adapter
from mlx_lora.formats.metrics import read_metrics
from mlx_lora.fuse import fuse
from mlx_lora.model.adapted import load_adapted
from mlx_lora.model.load import load_base
from mlx_lora.train.checkpoint import OPTIMIZER, list_checkpoints
from mlx_lora.train.optim import build_optimizer, init_state
from mlx_lora.train.step import make_update

IDS = mx.array([[3, 17, 42, 99, 250, 7, 311, 64, 128, 5]])
SETTINGS = dict(fine_tune_type="full", iters=12, batch_size=4, learning_rate=1e-3,
                steps_per_eval=4, save_every=4, mask_prompt=True)


def logits(model) -> np.ndarray:
    return np.array(model(IDS).astype(mx.float32))


def weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def val_losses(out) -> list[float]:
    return [r["val_loss"] for r in read_metrics(out) if r["event"] == "val"]


@pytest.fixture(scope="module")
def full_run(tiny_llama, data, tmp_path_factory):
    """The last of tiny_llama's two blocks fine-tuned in full through the API."""
    out = tmp_path_factory.mktemp("full") / "run"
    result = Finetune(model=str(tiny_llama), data=str(data), adapter_path=str(out),
                      num_layers=1, general_data="builtin", **SETTINGS).train()
    assert result.finished
    return out, result


def test_api_trains_every_weight_of_the_last_block_and_nothing_else(tiny_llama, full_run):
    out, result = full_run
    base = weights(load_base(str(tiny_llama)).model)
    trained = weights(result.loaded.model)
    saved = {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}
    assert sorted(saved) == sorted(k for k in base if k.startswith("model.layers.1."))
    for name, value in trained.items():
        if name in saved:  # every trained tensor moved, and is what was saved
            assert np.abs(value - base[name]).max() > 0, name
            np.testing.assert_array_equal(value, saved[name])
        else:
            np.testing.assert_array_equal(value, base[name], err_msg=name)
    assert all(v.dtype == np.float32 for v in saved.values())  # the base's dtype
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "full" and config["num_layers"] == 1
    assert "lora_parameters" not in config
    losses = val_losses(out)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1
    probes = [r for r in read_metrics(out) if r["event"] == "val"]
    assert all("general_loss" in r for r in probes)  # the forgetting probe runs in training


def test_mlx_lm_serves_our_full_fine_tune_to_our_logits(tiny_llama, full_run):
    out, _ = full_run
    for adapter in (out, out / "best"):
        ours, _ = load_adapted(str(tiny_llama), str(adapter))
        theirs, _ = mlx_lm.load(str(tiny_llama), adapter_path=str(adapter))
        np.testing.assert_allclose(logits(theirs), logits(ours.model), atol=1e-5)
    base = logits(load_base(str(tiny_llama)).model)
    assert np.abs(logits(ours.model) - base).max() > 1e-2


def test_a_full_fine_tune_by_mlx_lm_loads_to_mlx_lm_logits(tiny_llama, data, tmp_path):
    out = tmp_path / "theirs"
    done = subprocess.run([sys.executable, "-m", "mlx_lm", "lora", "--model", str(tiny_llama),
                           "--train", "--data", str(data), "--fine-tune-type", "full",
                           "--num-layers", "1", "--iters", "2", "--batch-size", "4",
                           "--steps-per-eval", "100", "--adapter-path", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    ours, _ = load_adapted(str(tiny_llama), str(out))
    theirs, _ = mlx_lm.load(str(tiny_llama), adapter_path=str(out))
    np.testing.assert_array_equal(logits(ours.model), logits(theirs))
    assert np.abs(logits(ours.model) - logits(load_base(str(tiny_llama)).model)).max() > 1e-3


def test_fuse_writes_the_trained_weights_in_place(full_run, tiny_llama, tmp_path):
    out, result = full_run
    fused = fuse(str(tiny_llama), str(out), str(tmp_path / "fused"))
    assert fused.layers == () and fused.max_logit_diff == 0.0  # nothing to fold
    saved = weights(mlx_lm.load(str(tmp_path / "fused"))[0])
    for name, value in weights(result.loaded.model).items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)


def test_cli_trains_embeddings_of_a_tied_model_then_eval_and_generate(tiny_qwen2, data,
                                                                      tmp_path):
    out = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items() if k != "mask_prompt"]
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--model", str(tiny_qwen2), "--data", str(data),
                                 "--adapter-path", str(out), "--num-layers", "1",
                                 "--train-embeddings", "--mask-prompt", *flags])
    assert result.exit_code == 0, result.output
    assert "trained modules" in result.output
    saved = mx.load(str(out / "adapters.safetensors"))
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= set(saved)  # tied: no lm_head
    assert not any(k.startswith("model.layers.0.") for k in saved)
    losses = val_losses(out)
    assert losses[-1] < losses[0] - 0.1
    theirs, _ = mlx_lm.load(str(tiny_qwen2), adapter_path=str(out))
    ours, _ = load_adapted(str(tiny_qwen2), str(out))
    np.testing.assert_allclose(logits(theirs), logits(ours.model), atol=1e-5)

    def eval_json(*adapter):
        done = runner.invoke(cli, ["eval", "--model", str(tiny_qwen2), *adapter, "--data",
                                   str(data), "--split", "valid", "--mask-prompt", "--json"])
        assert done.exit_code == 0, done.output
        return json.loads(done.output.strip().splitlines()[-1])

    tuned, base = eval_json("--adapter-path", str(out)), eval_json()
    assert tuned["loss"] == pytest.approx(losses[-1], rel=1e-4) and tuned["loss"] < base["loss"]
    # Plain text, as the trained model answers a chat prompt with its end token at once.
    done = runner.invoke(cli, ["generate", "--model", str(tiny_qwen2), "--adapter-path",
                               str(out), "--prompt", "Once upon", "--max-tokens", "8",
                               "--no-chat"])
    tokenizer = mlx_lm.load(str(tiny_qwen2))[1]
    expected = mlx_lm.generate(theirs, tokenizer, "Once upon", max_tokens=8, verbose=False)
    assert expected.strip()
    assert done.exit_code == 0 and done.output == expected + "\n", done.output


def test_quantized_bases_are_refused_with_a_reason(tiny_llama, data, full_run, tmp_path):
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_llama), "--data", str(data),
                                      "--adapter-path", str(tmp_path / "q"), "--quantize", "4",
                                      "--fine-tune-type", "full"])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "--quantize" in result.output
    quantized = load_base(str(tiny_llama), quantize=4).model  # as an already-quantized model
    with pytest.raises(UserError, match="is quantized"):
        inject(quantized, make_spec(quantized, "full", "all-linear", -1, Hyper(8, 16.0)))
    with pytest.raises(UserError, match="is quantized"):
        load_any_adapter(load_base(str(tiny_llama), quantize=4).model, full_run[0])


def test_peft_export_and_the_eval_forgetting_probe_are_refused(tiny_llama, full_run, tmp_path):
    out, _ = full_run
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "--adapter-path", str(out), "--format", "peft",
                                 "--save-path", str(tmp_path / "peft")])
    assert result.exit_code == 2 and "PEFT has no format for a full" in result.output
    assert not (tmp_path / "peft").exists()
    result = runner.invoke(cli, ["eval", "--model", str(tiny_llama), "--adapter-path", str(out),
                                 "--general-data"])
    assert result.exit_code == 2 and "overwrites in place" in result.output


@pytest.mark.parametrize("options, message", [
    (dict(fine_tune_type="lora", train_embeddings=True), "use it with --fine-tune-type full"),
    (dict(fine_tune_type="full", targets="q_proj"), "drop --targets"),
    (dict(fine_tune_type="full", lora_plus_ratio=4.0), "drop it"),
])
def test_options_full_cannot_honor_are_refused(tiny_llama, data, tmp_path, options, message):
    run = Finetune(model=str(tiny_llama), data=str(data), adapter_path=str(tmp_path / "x"),
                   **options)
    with pytest.raises(UserError, match=message):
        run.train()


def test_early_stopping_keeps_the_best_full_weights(tiny_llama, data, tmp_path):
    out = tmp_path / "run"
    # With a zero learning rate nothing improves after step 0: patience 2 stops at step 4.
    Finetune(model=str(tiny_llama), data=str(data), adapter_path=str(out),
             **{**SETTINGS, "learning_rate": 0.0, "steps_per_eval": 2, "iters": 50},
             early_stopping_patience=2).train()
    records = read_metrics(out)
    assert records[-1]["event"] == "done" and records[-1]["step"] == 4
    best = json.loads((out / "best" / "adapter_config.json").read_text())
    assert best["fine_tune_type"] == "full" and best["num_layers"] == 2
    base = weights(load_base(str(tiny_llama)).model)
    for name, value in mx.load(str(out / "best" / "adapters.safetensors")).items():
        np.testing.assert_array_equal(np.array(value), base[name])


def test_adam_runs_in_float32_and_weights_keep_bfloat16():
    """One compiled update against Adam written out in plain MLX, in float32."""
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4))
    model.set_dtype(mx.bfloat16)
    start = dict(tree_flatten(model.parameters()))
    optimizer = build_optimizer(TrainConfig(learning_rate=1e-2), 10)
    init_state(optimizer, model)
    update = make_update(model, optimizer, 0.0)
    mx.random.seed(0)
    b1, b2, lr, eps = 0.9, 0.999, 1e-2, 1e-8
    m = {k: mx.zeros(v.shape) for k, v in start.items()}
    v = dict(m)
    expected = {k: w.astype(mx.float32) for k, w in start.items()}
    for step in (1, 2):
        grads = {k: mx.random.normal(w.shape).astype(mx.bfloat16) for k, w in start.items()}
        mx.eval(update(tree_unflatten(list(grads.items()))))
        for k, g in grads.items():
            g = g.astype(mx.float32)
            m[k], v[k] = b1 * m[k] + (1 - b1) * g, b2 * v[k] + (1 - b2) * g * g
            step_size = lr * (m[k] / (1 - b1**step)) / (mx.sqrt(v[k] / (1 - b2**step)) + eps)
            expected[k] = (expected[k] - step_size).astype(mx.bfloat16).astype(mx.float32)
    for k, w in tree_flatten(model.parameters()):
        assert w.dtype == mx.bfloat16
        got = np.array(w.astype(mx.float32))
        assert np.abs(got - np.array(start[k].astype(mx.float32))).max() > 1e-2  # it moved
        # equal but where float32 rounding differs by one bfloat16 step (2^-8 relative)
        np.testing.assert_allclose(got, np.array(expected[k]), rtol=2**-8, atol=1e-7)
    state = dict(tree_flatten(optimizer.state))
    assert all(s.dtype == mx.float32 for k, s in state.items() if k.endswith((".m", ".v")))


def test_a_bfloat16_base_trains_in_bfloat16_with_float32_optimizer_state(tiny_llama, data,
                                                                         tmp_path):
    model, tokenizer = mlx_lm.load(str(tiny_llama))
    model.set_dtype(mx.bfloat16)
    out = tmp_path / "run"
    run = Finetune(model=(model, tokenizer), data=str(data), adapter_path=str(out),
                   **{**SETTINGS, "iters": 4, "save_every": 2})
    assert run.train().finished
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(model.parameters()))
    saved = mx.load(str(out / "adapters.safetensors"))
    assert saved and all(v.dtype == mx.bfloat16 for v in saved.values())
    state = mx.load(str(list_checkpoints(out)[-1] / OPTIMIZER))
    moments = [v for k, v in state.items() if k.endswith((".m", ".v"))]
    assert moments and all(v.dtype == mx.float32 for v in moments)
    losses = val_losses(out)
    assert losses[-1] < losses[0]
