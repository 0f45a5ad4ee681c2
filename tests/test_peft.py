"""Parity with Hugging Face PEFT both ways: the same adapter gives the same logits (float32)."""

import importlib
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_adapter

from mlx_lora.cli import cli
from mlx_lora.errors import UserError
from mlx_lora.formats.convert import export_adapter
from mlx_lora.formats.mlx_lm_adapter import adapter_weights
from mlx_lora.model.adapted import load_adapted

IDS = [3, 17, 42, 99, 250, 7, 311, 64, 128, 5, 480, 21]
TOLERANCE = 1e-4  # DESIGN.md's contract 5


def require(name: str):
    """Import `name`; in CI (which installs torch and peft) a missing one fails, never skips."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


def ours(model_dir: Path, adapter_dir: Path | None) -> np.ndarray:
    loaded, _ = load_adapted(str(model_dir), str(adapter_dir) if adapter_dir else None)
    return np.array(loaded.model(mx.array(IDS)[None]).astype(mx.float32)[0])


def theirs(model) -> np.ndarray:
    torch = require("torch")
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def hf_model(model_dir: Path):
    torch = require("torch")
    transformers = require("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.fixture(params=["tiny_llama", "tiny_qwen2"])
def base_dir(request) -> Path:
    return request.getfixturevalue(request.param)


EXPORT_CASES = {
    "all-linear": dict(),
    "rslora, q/v of the last block": dict(targets="q_proj,v_proj", num_layers=1, rslora=True,
                                          alpha=6.0),
    "dora": dict(method="dora"),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_exported_adapter_gives_our_logits_in_peft(base_dir, case, tmp_path):
    peft = require("peft")
    adapter = make_adapter(base_dir, tmp_path / "ours", **EXPORT_CASES[case])
    export_adapter(adapter, "peft", tmp_path / "peft")
    model = peft.PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "peft")
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(adapted) == len(json.loads((adapter / "adapter_config.json").read_text())
                               ["target_paths"])
    expected = ours(base_dir, adapter)
    assert np.abs(theirs(model) - expected).max() < TOLERANCE
    assert np.abs(expected - ours(base_dir, None)).max() > 0.05  # the adapter does something


PEFT_CASES = {
    "names": dict(target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=16),
    "rslora, all-linear": dict(target_modules="all-linear", use_rslora=True, lora_alpha=8),
    "regex, some layers": dict(target_modules=r"model\.layers\.1\.(self_attn|mlp)\..*_proj",
                               lora_alpha=4),
    "dora": dict(target_modules="all-linear", lora_alpha=8, use_dora=True),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_adapter_written_by_peft_gives_its_logits_in_ours(base_dir, case, tmp_path):
    torch, peft = require("torch"), require("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, init_lora_weights=False, task_type="CAUSAL_LM",
                             **PEFT_CASES[case])
    model = peft.get_peft_model(hf_model(base_dir), config)
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    expected = theirs(model)
    assert np.abs(ours(base_dir, tmp_path / "peft") - expected).max() < TOLERANCE
    # Converted to mlx-lm's format, mlx-lm itself loads it to the same logits.
    result = CliRunner().invoke(cli, ["import", "--adapter-path", str(tmp_path / "peft"),
                                      "--save-path", str(tmp_path / "mlx")])
    assert result.exit_code == 0, result.output
    net, _ = mlx_lm.load(str(base_dir), adapter_path=str(tmp_path / "mlx"))
    mlx_lm_logits = np.array(net(mx.array(IDS)[None]).astype(mx.float32)[0])
    assert np.abs(mlx_lm_logits - expected).max() < TOLERANCE
    assert np.abs(ours(base_dir, tmp_path / "mlx") - expected).max() < TOLERANCE


def test_round_trip_through_peft_is_exact(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "ours", rslora=True, alpha=3.0)
    export_adapter(adapter, "peft", tmp_path / "peft")
    export_adapter(tmp_path / "peft", "mlx-lm", tmp_path / "back")
    before, spec_before = load_adapted(str(tiny_llama), str(adapter))
    after, spec_after = load_adapted(str(tiny_llama), str(tmp_path / "back"))
    assert set(spec_after.paths) == set(spec_before.paths)
    assert spec_after.hyper.scale == pytest.approx(spec_before.hyper.scale)
    assert (spec_after.hyper.alpha, spec_after.hyper.rslora) == (3.0, True)
    a, b = adapter_weights(before.model), adapter_weights(after.model)
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


def test_export_config_names_modules_as_peft_users_do(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "ours", targets="q_proj,v_proj")
    result = CliRunner().invoke(cli, ["export", "--adapter-path", str(adapter), "--format",
                                      "peft", "--save-path", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert config["layers_to_transform"] is None  # every block
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, False)
    assert config["base_model_name_or_path"] == str(tiny_llama)
    weights = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    a = weights["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (32, 4)  # (r, in) and (out, r)


def test_peft_features_we_cannot_carry_are_refused(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "ours")
    export_adapter(adapter, "peft", tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for key, value in {"lora_bias": True, "rank_pattern": {"q_proj": 8}, "bias": "all"}.items():
        config_path.write_text(json.dumps({**config, key: value}))
        with pytest.raises(UserError, match=key):
            load_adapted(str(tiny_llama), str(tmp_path / "peft"))
    # DoRA is carried, but a DoRA config needs its magnitudes: named, not guessed.
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UserError, match="no tensor .*lora_magnitude_vector"):
        load_adapted(str(tiny_llama), str(tmp_path / "peft"))
    with pytest.raises(UserError, match="already in peft"):
        export_adapter(tmp_path / "peft", "peft", tmp_path / "again")


def test_fuse_takes_a_peft_adapter(tiny_qwen2, tmp_path):
    torch, peft = require("torch"), require("peft")
    from mlx_lora.fuse import fuse

    torch.manual_seed(1)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                             init_lora_weights=False, task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf_model(tiny_qwen2), config)
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    fuse(str(tiny_qwen2), str(tmp_path / "peft"), str(tmp_path / "fused"))
    net, _ = mlx_lm.load(str(tmp_path / "fused"))
    fused = np.array(net(mx.array(IDS)[None]).astype(mx.float32)[0])
    assert np.abs(fused - theirs(model)).max() < TOLERANCE
