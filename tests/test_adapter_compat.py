"""An adapter on a model it does not fit fails naming the first misfit; never half-loads."""

import json
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import make_adapter

from mlx_lora.demo.tiny import make_tiny_model
from mlx_lora.errors import UserError
from mlx_lora.formats.convert import export_adapter, load_any_adapter
from mlx_lora.model.load import load_base


@pytest.fixture(scope="module")
def narrow_llama(tmp_path_factory) -> Path:
    """A llama like tiny_llama with hidden size 32 instead of 64."""
    return make_tiny_model(tmp_path_factory.mktemp("narrow"), hidden_size=32,
                           intermediate_size=64)


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    """A llama like tiny_llama with 4 blocks instead of 2."""
    return make_tiny_model(tmp_path_factory.mktemp("deep"), num_layers=4)


def load_onto(model_dir: Path, adapter_dir: Path):
    return load_any_adapter(load_base(str(model_dir)).model, adapter_dir)


@pytest.mark.parametrize("fmt", ["mlx-lm", "peft"])
def test_other_hidden_size_names_the_first_mismatched_tensor(tiny_llama, narrow_llama, fmt,
                                                              tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "ours")
    if fmt == "peft":
        adapter = tmp_path / "peft"
        export_adapter(tmp_path / "ours", "peft", adapter)
    with pytest.raises(UserError, match=r"tensor '[^']+lora_[abAB][^']*' has shape .* needs"):
        load_onto(narrow_llama, adapter)


@pytest.mark.parametrize("fmt", ["ours", "mlx-lm", "peft"])
def test_missing_modules_are_named(tiny_llama, deep_llama, fmt, tmp_path):
    adapter = make_adapter(deep_llama, tmp_path / "ours")
    if fmt == "mlx-lm":  # as mlx-lm writes it: keys per block and num_layers, no full paths
        config = json.loads((adapter / "adapter_config.json").read_text())
        del config["target_paths"]
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    if fmt == "peft":
        adapter = tmp_path / "peft"
        export_adapter(tmp_path / "ours", "peft", adapter)
    with pytest.raises(UserError, match=r"model\.layers\.[23]\."):
        load_onto(tiny_llama, adapter)


def test_other_module_names_fail_instead_of_adapting_fewer_layers(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "ours", targets="q_proj,v_proj")
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["target_paths"]
    # An mlx-lm config for a model whose attention is one fused qkv_proj, plus q_proj.
    config["lora_parameters"]["keys"] = ["self_attn.qkv_proj", "self_attn.q_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="v_proj"):
        load_onto(tiny_llama, adapter)


def test_missing_tensor_fails_instead_of_leaving_a_layer_unadapted(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "ours")
    weights = mx.load(str(adapter / "adapters.safetensors"))
    dropped = "model.layers.1.mlp.down_proj.lora_b"
    del weights[dropped]
    mx.save_safetensors(str(adapter / "adapters.safetensors"), weights)
    with pytest.raises(UserError, match=dropped):
        load_onto(tiny_llama, adapter)
    export_adapter(adapter, "peft", tmp_path / "peft")  # conversion keeps what there is
    with pytest.raises(UserError, match="down_proj.lora_B"):
        load_onto(tiny_llama, tmp_path / "peft")


def test_peft_tensor_for_a_module_the_model_lacks_is_named(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "ours")
    export_adapter(adapter, "peft", tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_model.safetensors"
    weights = mx.load(str(path))
    renamed = {k.replace("self_attn.q_proj", "attn.c_attn"): v for k, v in weights.items()}
    mx.save_safetensors(str(path), renamed)
    with pytest.raises(UserError, match=r"attn\.c_attn\.lora_A\.weight' is for module"):
        load_onto(tiny_llama, tmp_path / "peft")


def test_other_architecture_of_the_same_shapes_is_refused(tiny_llama, tiny_qwen2, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "ours")
    config = json.loads((adapter / "adapter_config.json").read_text())
    # save_adapters records the base's model_type (from mlx-lm's model.model_type).
    config.setdefault("model_type", "llama")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="llama model but this base is qwen2"):
        load_onto(tiny_qwen2, adapter)


def test_not_an_adapter_directory(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="no such adapter directory"):
        load_onto(tiny_llama, tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not an adapter directory"):
        load_onto(tiny_llama, tmp_path / "empty")
