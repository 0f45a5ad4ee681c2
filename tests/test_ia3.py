"""IA3: PEFT's defaults and math, PEFT parity both ways, fusing with biases, and training.

The invariants every method shares (fresh equals base, save/load, fuse, resume) are in
test_adapters.py's table; these are IA3's own.
"""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import addition_rows, make_adapter
from test_peft import IDS, TOLERANCE, hf_model, ours, require, theirs

from mlx_lora import Finetune
from mlx_lora.adapters.ia3 import IA3Linear
from mlx_lora.adapters.inject import inject, make_spec
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.cli import cli
from mlx_lora.errors import UserError
from mlx_lora.formats.convert import export_adapter
from mlx_lora.fuse import fuse
from mlx_lora.model.adapted import load_adapted
from mlx_lora.model.load import load_base

ROWS = addition_rows(6, 4)


def ia3_model(model_dir, targets: str = "", num_layers: int = -1):
    loaded = load_base(str(model_dir))
    spec = make_spec(loaded.model, "ia3", targets, num_layers, Hyper(8, 16.0))
    inject(loaded.model, spec)
    return loaded, spec


@pytest.mark.parametrize("base, targets", [
    ("tiny_llama", {"self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"}),
    ("tiny_qwen2", {"self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"}),
])
def test_default_targets_are_pefts_for_the_model_type(base, targets, request):
    _, spec = ia3_model(request.getfixturevalue(base))
    assert {p.split(".", 3)[-1] for p in spec.paths} == targets
    assert spec.hyper.feedforward == tuple(p for p in spec.paths if p.endswith("down_proj"))


def test_outputs_or_inputs_are_scaled_as_peft_defines(tiny_qwen2):
    loaded, spec = ia3_model(tiny_qwen2)
    modules = dict(loaded.model.named_modules())
    for path, ff in [("model.layers.0.self_attn.q_proj", False),
                     ("model.layers.0.mlp.down_proj", True)]:
        layer = modules[path]
        assert isinstance(layer, IA3Linear) and layer.feedforward is ff
        base = layer.linear
        width = base.weight.shape[1] if ff else base.weight.shape[0]
        scale = 1 + 0.3 * mx.random.normal((width,), key=mx.random.key(1))
        layer.ia3_l = scale[:, None] if ff else scale[None]  # (in, 1) or (1, out)
        inputs = mx.random.normal((2, 5, base.weight.shape[1]), key=mx.random.key(2))
        if ff:  # y = base(x * l): the bias is not scaled
            expected = (inputs * scale) @ base.weight.T + base.get("bias", 0)
        else:  # y = base(x) * l: q_proj's bias is scaled with it
            expected = (inputs @ base.weight.T + base.bias) * scale
        np.testing.assert_allclose(np.array(layer(inputs)), np.array(expected), atol=1e-5)


def test_fused_ia3_scales_the_bias_too(tiny_qwen2, tmp_path):
    adapter = make_adapter(tiny_qwen2, tmp_path / "ia3", method="ia3", targets="")
    result = fuse(str(tiny_qwen2), str(adapter), str(tmp_path / "fused"))
    fused, _ = mlx_lm.load(str(tmp_path / "fused"))
    adapted, _ = load_adapted(str(tiny_qwen2), str(adapter))
    ids = mx.array(IDS)[None]
    assert np.abs(np.array(fused(ids)) - np.array(adapted.model(ids))).max() < 1e-5
    assert result.adapter_effect > 0.05


EXPORT_CASES = {
    "defaults": dict(targets=""),
    "last block, up_proj too": dict(targets="k_proj,v_proj,up_proj,down_proj", num_layers=1),
}


@pytest.mark.parametrize("base", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("case", EXPORT_CASES)
def test_exported_ia3_gives_our_logits_in_peft(base, case, request, tmp_path):
    peft = require("peft")
    model_dir = request.getfixturevalue(base)
    adapter = make_adapter(model_dir, tmp_path / "ours", method="ia3", **EXPORT_CASES[case])
    export_adapter(adapter, "peft", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"]
    model = peft.PeftModel.from_pretrained(hf_model(model_dir), tmp_path / "peft")
    scaled = [n for n, m in model.named_modules() if getattr(m, "ia3_l", None)]
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert len(scaled) == len(saved["target_paths"]) and saved["feedforward_paths"]
    expected = ours(model_dir, adapter)
    assert np.abs(theirs(model) - expected).max() < TOLERANCE
    assert np.abs(expected - ours(model_dir, None)).max() > 0.02  # the adapter does something


PEFT_CASES = {
    "defaults": dict(),
    "regexes, up_proj input-scaled": dict(
        target_modules=r".*\.(k_proj|v_proj|up_proj|down_proj)",
        feedforward_modules=r".*\.(up_proj|down_proj)"),
}


@pytest.mark.parametrize("base", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("case", PEFT_CASES)
def test_ia3_written_by_peft_gives_its_logits_in_ours(base, case, request, tmp_path):
    torch, peft = require("torch"), require("peft")
    model_dir = request.getfixturevalue(base)
    torch.manual_seed(0)
    model = peft.get_peft_model(hf_model(model_dir),
                                peft.IA3Config(task_type="CAUSAL_LM", **PEFT_CASES[case]))
    with torch.no_grad():  # trained vectors are not all ones
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.add_(0.3 * torch.randn_like(param))
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    expected = theirs(model)
    assert np.abs(ours(model_dir, tmp_path / "peft") - expected).max() < TOLERANCE
    result = CliRunner().invoke(cli, ["import", "--adapter-path", str(tmp_path / "peft"),
                                      "--save-path", str(tmp_path / "mlx")])
    assert result.exit_code == 0, result.output
    assert np.abs(ours(model_dir, tmp_path / "mlx") - expected).max() < TOLERANCE


def test_cli_training_lowers_the_validation_loss(tiny_llama, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, rows in (("train", ROWS[:20]), ("valid", ROWS[20:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "train", "--model", str(tiny_llama), "--data", str(data), "--adapter-path", str(out),
        "--fine-tune-type", "ia3", "--iters", "8", "--batch-size", "4", "--learning-rate",
        "3e-2", "--steps-per-eval", "8", "--mask-prompt"])
    assert result.exit_code == 0, result.output
    val = [json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text()
           .splitlines() if json.loads(line)["event"] == "val"]
    assert len(val) == 2 and val[-1] < val[0]
    run = (out / "config.yaml").read_text()
    assert "targets: k_proj,v_proj,down_proj" in run  # the resolved default, recorded
    saved = mx.load(str(out / "adapters.safetensors"))
    assert saved and all(name.endswith(".ia3_l") for name in saved)


def test_api_training_lowers_the_validation_loss(tiny_qwen2, tmp_path):
    events = []
    run = Finetune(model=str(tiny_qwen2), data={"train": ROWS[:20], "valid": ROWS[20:]},
                   adapter_path=str(tmp_path / "run"), fine_tune_type="ia3", iters=8,
                   batch_size=4, learning_rate=3e-2, steps_per_eval=8, mask_prompt=True)
    result = run.train(callback=events.append)
    val = [e["val_loss"] for e in events if e["event"] == "val"]
    assert result.finished and len(val) == 2 and val[-1] < val[0]
    assert run.evaluate(split="valid")["loss"] == pytest.approx(val[-1], rel=1e-4)


@pytest.mark.parametrize("settings, message", [
    (dict(init="pissa"), "--init pissa sets how lora_a and lora_b start"),
    (dict(dropout=0.1), "--dropout and --lora-plus-ratio act on LoRA's factors"),
])
def test_lora_settings_are_refused_for_ia3(tiny_llama, tmp_path, settings, message):
    run = Finetune(model=str(tiny_llama), data={"train": ROWS}, fine_tune_type="ia3",
                   adapter_path=str(tmp_path / "run"), **settings)
    with pytest.raises(UserError, match=message):
        run.train()
