"""PiSSA (--init pissa): PEFT's init, and the saved adapter equal to the trained model on the
original base for every consumer (mlx-lm, PEFT, our loader), both ways.

The invariants every method shares (fresh equals base, save/load, fuse, resume) are in
test_adapters.py's table; these are PiSSA's own.
"""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import addition_rows, move_trainable
from test_peft import IDS, TOLERANCE, hf_model, ours, require, theirs

from mlx_lora import Finetune
from mlx_lora.adapters.inject import adapter_layers, inject, make_spec
from mlx_lora.adapters.lora import dequantized_weight
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.cli import cli
from mlx_lora.formats.convert import export_adapter
from mlx_lora.formats.mlx_lm_adapter import save_adapters
from mlx_lora.model.load import load_base

ROWS = addition_rows(6, 4)


def pissa_model(model_dir, method="lora", rslora=False, quantize=0, rank=4):
    loaded = load_base(str(model_dir), quantize=quantize)
    spec = make_spec(loaded.model, method, "all-linear", -1,
                     Hyper(rank, 8.0, 0.0, rslora, "pissa"))
    inject(loaded.model, spec)
    return loaded, spec


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)[None]).astype(mx.float32)[0])


@pytest.mark.parametrize("quantize", [0, 4], ids=["float", "4-bit"])
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_factors_are_the_top_svd_of_the_base_weight(tiny_llama, quantize, rslora):
    loaded, _ = pissa_model(tiny_llama, rslora=rslora, quantize=quantize)
    for path, layer in adapter_layers(loaded.model):
        weight = np.array(dequantized_weight(layer.linear).astype(mx.float32))
        u, s, vt = np.linalg.svd(weight.astype(np.float64), full_matrices=False)
        top = (u[:, :4] * s[:4]) @ vt[:4]  # numpy's rank-4 approximation, the reference
        a0, b0 = np.array(layer.lora_a0), np.array(layer.lora_b0)
        np.testing.assert_allclose(layer.scale * (a0 @ b0).T, top, atol=2e-5, err_msg=path)
        # the two factors share sqrt(S / scale) evenly, as PEFT splits them
        np.testing.assert_allclose(np.linalg.norm(a0, axis=0), np.linalg.norm(b0, axis=1),
                                   rtol=1e-4, err_msg=path)
        assert np.array_equal(np.array(layer.lora_a), a0)  # training starts there


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_init_is_pefts_pissa(tiny_qwen2, rslora):
    peft = require("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, init_lora_weights="pissa",
                             target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf_model(tiny_qwen2), config).base_model.model
    loaded, spec = pissa_model(tiny_qwen2, rslora=rslora)
    for path, layer in adapter_layers(loaded.model):
        theirs_layer = model.get_submodule(path)
        a_theirs = theirs_layer.lora_A["default"].weight.detach().numpy()  # (r, in)
        b_theirs = theirs_layer.lora_B["default"].weight.detach().numpy()  # (out, r)
        a0, b0 = np.array(layer.lora_a0).T, np.array(layer.lora_b0).T
        signs = np.sign(np.sum(a0 * a_theirs, axis=1))  # singular vectors' signs are free
        np.testing.assert_allclose(a0 * signs[:, None], a_theirs, atol=1e-4, err_msg=path)
        np.testing.assert_allclose(b0 * signs, b_theirs, atol=1e-4, err_msg=path)
        # PEFT's residual base is what our frozen -scale * a0 b0 term leaves of the base
        residual = np.array(layer.linear.weight) - layer.scale * (b0 @ a0)
        np.testing.assert_allclose(theirs_layer.base_layer.weight.detach().numpy(), residual,
                                   atol=1e-5, err_msg=path)
    assert len(spec.paths) == 14


@pytest.mark.parametrize("method, rslora", [("lora", False), ("lora", True), ("dora", False)])
def test_saved_adapter_on_the_original_base_equals_the_trained_model(tiny_llama, tmp_path,
                                                                      method, rslora):
    peft = require("peft")
    loaded, spec = pissa_model(tiny_llama, method, rslora)
    move_trainable(loaded.model)
    trained = logits(loaded.model)
    save_adapters(tmp_path / "ours", loaded.model, spec, str(tiny_llama))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["fine_tune_type"], config["lora_parameters"]["rank"]) == (method, 8)
    assert config["lora_parameters"]["scale"] == pytest.approx(spec.hyper.scale)
    net, _ = mlx_lm.load(str(tiny_llama), adapter_path=str(tmp_path / "ours"))
    assert np.abs(logits(net) - trained).max() < TOLERANCE
    assert np.abs(ours(tiny_llama, tmp_path / "ours") - trained).max() < TOLERANCE
    export_adapter(tmp_path / "ours", "peft", tmp_path / "peft")
    model = peft.PeftModel.from_pretrained(hf_model(tiny_llama), tmp_path / "peft")
    assert model.peft_config["default"].r == 8
    assert np.abs(theirs(model) - trained).max() < TOLERANCE
    assert np.abs(trained - ours(tiny_llama, None)).max() > 0.05  # training moved it


def test_pissa_trained_in_peft_loads_to_its_logits_either_way_it_is_saved(tiny_llama, tmp_path):
    torch, peft = require("torch"), require("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                             target_modules=["q_proj", "v_proj", "down_proj"],
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf_model(tiny_llama), config)
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the conversion
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = "pissa"
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.eval()
    model.save_pretrained(tmp_path / "converted",
                          path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    model.save_pretrained(tmp_path / "pissa")  # for PEFT's residual base: we redo the SVD
    expected = theirs(model)
    assert np.abs(ours(tiny_llama, tmp_path / "converted") - expected).max() < TOLERANCE
    assert np.abs(ours(tiny_llama, tmp_path / "pissa") - expected).max() < TOLERANCE
    result = CliRunner().invoke(cli, ["import", "--adapter-path", str(tmp_path / "pissa"),
                                      "--save-path", str(tmp_path / "mlx")])
    assert result.exit_code != 0 and "PiSSA adapter PEFT saved unconverted" in result.output


def test_zero_steps_save_the_base(tiny_llama, tmp_path):
    run = Finetune(model=str(tiny_llama), data={"train": ROWS[:20], "valid": ROWS[20:]},
                   adapter_path=str(tmp_path / "run"), init="pissa", iters=0, batch_size=4)
    assert run.train().finished
    net, _ = mlx_lm.load(str(tiny_llama), adapter_path=str(tmp_path / "run"))
    base, _ = mlx_lm.load(str(tiny_llama))
    assert np.abs(logits(net) - logits(base)).max() < 1e-5
    saved = mx.load(str(tmp_path / "run" / "adapters.safetensors"))
    assert np.abs(np.array(saved["model.layers.0.self_attn.q_proj.lora_b"])).max() > 0.1


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_api_training_saves_what_it_trained(tiny_llama, tmp_path, method):
    events = []
    run = Finetune(model=str(tiny_llama), data={"train": ROWS[:20], "valid": ROWS[20:]},
                   adapter_path=str(tmp_path / "run"), fine_tune_type=method, init="pissa",
                   iters=6, batch_size=4, learning_rate=5e-3, steps_per_eval=3, save_every=3,
                   mask_prompt=True)
    result = run.train(callback=events.append)
    val = [e["val_loss"] for e in events if e["event"] == "val"]
    assert result.finished and val[-1] < val[0]
    trained = logits(result.loaded.model)
    for saved in ("", "checkpoints/step-00000006"):
        net, _ = mlx_lm.load(str(tiny_llama), adapter_path=str(tmp_path / "run" / saved))
        assert np.abs(logits(net) - trained).max() < TOLERANCE, saved
    run_config = (tmp_path / "run" / "config.yaml").read_text()
    assert "init: pissa" in run_config and "rank: 8" in run_config  # as asked: rank 8
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["lora_parameters"]["rank"] == 16 and adapter["init"] == "pissa"
