"""Fused equals adapted, on float and 4-bit bases, through mlx-lm's loader and transformers."""

import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import randomize_lora_b

from mlx_lora.adapters.inject import inject, make_spec
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.cli import cli
from mlx_lora.config import TrainConfig, to_dict
from mlx_lora.errors import UserError
from mlx_lora.formats.mlx_lm_adapter import save_adapters
from mlx_lora.fuse import PROBE_TEXT, PROBE_TOKENS, fuse
from mlx_lora.model.adapted import load_adapted
from mlx_lora.model.load import load_base


def make_adapter(model_dir: Path, adapter_dir: Path, *, quantize: int = 0, b_std: float = 0.05,
                 targets: str = "all-linear", seed: int = 0, method: str = "lora") -> Path:
    """An adapter as a run would save it, with random (non-zero) lora_b (and DoRA's m)."""
    mx.random.seed(seed)
    loaded = load_base(str(model_dir), quantize=quantize)
    spec = make_spec(loaded.model, method, targets, -1, Hyper(4, 8.0))
    inject(loaded.model, spec)
    if b_std:
        randomize_lora_b(loaded.model, seed + 1, b_std)
    save_adapters(adapter_dir, loaded.model, spec, str(model_dir))
    # A QLoRA run records how it loaded the base; the fuse loads the base the same way.
    run = TrainConfig(model=str(model_dir), quantize=quantize, adapter_path=str(adapter_dir))
    (adapter_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(run)))
    return adapter_dir


def probe_ids(tokenizer) -> list[int]:
    return list(tokenizer.encode(PROBE_TEXT))[:PROBE_TOKENS]


def logits_of(model, ids) -> np.ndarray:
    return np.array(model(mx.array(ids)[None]).astype(mx.float32)[0])


@pytest.fixture(params=["tiny_llama", "tiny_qwen2"])
def base_dir(request) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def prequantized_llama(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama saved at 4 bits, as mlx_lm.convert -q would (a fuse with a zero adapter)."""
    tmp = tmp_path_factory.mktemp("prequantized")
    adapter = make_adapter(tiny_llama, tmp / "zero", b_std=0.0)
    return fuse(str(tiny_llama), str(adapter), str(tmp / "model"), quantize=4).save_path


def check_fused_equals_adapted(base_dir: Path, adapter: Path, tmp_path: Path, quantized: bool):
    result = fuse(str(base_dir), str(adapter), str(tmp_path / "fused"))
    adapted, _ = load_adapted(str(base_dir), str(adapter))
    fused, tokenizer = mlx_lm.load(str(tmp_path / "fused"))
    ids = probe_ids(tokenizer)
    diff = np.abs(logits_of(fused, ids) - logits_of(adapted.model, ids)).max()
    # What the fuse reports is what a fresh load of its output measures.
    assert diff == pytest.approx(result.max_logit_diff, abs=1e-6)
    if quantized:
        assert 0 < diff <= result.bound
        assert {c.precision for c in result.layers} <= {"4-bit", "8-bit", "float32"}
    else:
        assert diff < 1e-5
        assert {c.precision for c in result.layers} == {"float32"}
    assert result.adapter_effect > 0.1  # the adapter does change the logits


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("quantize", [0, 4])
def test_fused_dir_loads_in_mlx_lm_with_adapted_logits(base_dir, quantize, method, tmp_path):
    adapter = make_adapter(base_dir, tmp_path / "adapter", quantize=quantize, method=method)
    check_fused_equals_adapted(base_dir, adapter, tmp_path, quantized=bool(quantize))


def test_fuse_onto_a_base_quantized_on_disk(prequantized_llama, tmp_path):
    assert "quantization" in json.loads((prequantized_llama / "config.json").read_text())
    adapter = make_adapter(prequantized_llama, tmp_path / "adapter")  # QLoRA with no flag
    check_fused_equals_adapted(prequantized_llama, adapter, tmp_path, quantized=True)


def test_quantized_fuse_keeps_a_small_update_that_same_bits_requantization_loses(
        tiny_llama, tmp_path):
    # An update far below the 4-bit step, as a short fine-tune of a large model gives.
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", quantize=4, b_std=0.003)
    naive = fuse(str(tiny_llama), str(adapter), str(tmp_path / "naive"), tolerance=float("inf"))
    ours = fuse(str(tiny_llama), str(adapter), str(tmp_path / "ours"))
    assert {c.precision for c in naive.layers} == {"4-bit"}
    assert np.median([c.error for c in naive.layers]) > 0.5  # most of each update rounded away
    assert naive.max_logit_diff > 0.5 * naive.adapter_effect
    assert max(c.error for c in ours.layers) <= 0.1
    assert ours.max_logit_diff <= ours.bound == pytest.approx(0.1 * ours.adapter_effect)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    kept = {c.path for c in ours.layers if c.precision != "4-bit"}
    assert kept and all(config["quantization"][p] in (False, {"group_size": 64, "bits": 8,
                                                             "mode": "affine"}) for p in kept)


def test_dequantized_fuse_loads_in_transformers_with_our_logits(tiny_llama, tmp_path):
    torch = pytest.importorskip("torch")  # CI installs torch's CPU build: this runs there
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", quantize=4)
    result = fuse(str(tiny_llama), str(adapter), str(tmp_path / "fused"), dequantize=True)
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert {c.precision for c in result.layers} == {"float32"}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32)
    adapted, _ = load_adapted(str(tiny_llama), str(adapter))
    ids = probe_ids(adapted.tokenizer)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - logits_of(adapted.model, ids)).max() < 1e-4


def test_quantize_option_requantizes_everything(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    fuse(str(tiny_llama), str(adapter), str(tmp_path / "fused"), quantize=8)
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["quantization"]["bits"] == 8
    fused, tokenizer = mlx_lm.load(str(tmp_path / "fused"))
    adapted, _ = load_adapted(str(tiny_llama), str(adapter))
    ids = probe_ids(tokenizer)
    assert np.abs(logits_of(fused, ids) - logits_of(adapted.model, ids)).max() < 0.05


def test_fuse_refuses_to_clobber_or_overlap(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        fuse(str(tiny_llama), str(adapter), str(busy))
    with pytest.raises(UserError, match="overlaps"):
        fuse(str(tiny_llama), str(adapter), str(adapter / "fused"))
    with pytest.raises(UserError, match="overlaps"):
        fuse(str(tiny_llama), str(adapter), str(tiny_llama))
    with pytest.raises(UserError, match="exclude"):
        fuse(str(tiny_llama), str(adapter), str(tmp_path / "f"), dequantize=True, quantize=4)
    assert (busy / "keep.txt").read_text() == "mine"
    # --overwrite replaces a model directory, never one holding a user's files (issue 9).
    with pytest.raises(UserError, match="not a model's"):
        fuse(str(tiny_llama), str(adapter), str(busy), overwrite=True)
    (busy / "keep.txt").unlink()
    (busy / "config.json").write_text("{}")  # an older model dir is replaced whole
    fuse(str(tiny_llama), str(adapter), str(busy), overwrite=True)
    assert (busy / "model.safetensors").is_file()
    # Nothing half-written is left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "busy"]


def test_fuse_cli(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    runner = CliRunner()
    result = runner.invoke(cli, ["fuse", "--model", str(tiny_llama), "--adapter-path",
                                 str(adapter), "--save-path", str(tmp_path / "fused")])
    assert result.exit_code == 0, result.output
    assert "max |logit diff|" in result.output
    assert (tmp_path / "fused" / "tokenizer.json").is_file()
    again = runner.invoke(cli, ["fuse", "--model", str(tiny_llama), "--adapter-path",
                                str(adapter), "--save-path", str(tmp_path / "fused")])
    assert again.exit_code == 2 and "error: " in again.output
