"""Loading bases through mlx-lm: tiny models, transformers-5 config fixes, user errors."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

from mlx_lora.demo.tiny import make_tiny_model
from mlx_lora.errors import UserError
from mlx_lora.model.load import config_fixes, load_base, resolve_model_path

TOKENS = mx.array([[3, 17, 42, 99, 7, 250, 11, 5]])


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS))


def copy_with_config(src: Path, dst: Path, edit) -> Path:
    """A copy of a model dir whose config.json went through edit(config)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_tiny_model_loads_like_mlx_lm(name, request):
    path = request.getfixturevalue(name)
    model, _ = mlx_lm.load(str(path))
    loaded = load_base(str(path))
    out = logits(loaded.model)
    assert out.shape == (1, TOKENS.shape[1], 512)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, logits(model))
    assert tree_flatten(loaded.model.trainable_parameters()) == []
    assert loaded.quantization is None and loaded.model_path == path
    assert loaded.model.model.embed_tokens.weight.dtype == mx.float32


def test_tiny_architectures(tiny_llama, tiny_qwen2):
    llama, qwen2 = load_base(str(tiny_llama)).model, load_base(str(tiny_qwen2)).model
    assert "bias" in qwen2.model.layers[0].self_attn.q_proj
    assert "bias" not in llama.model.layers[0].self_attn.q_proj
    assert hasattr(llama, "lm_head") and not hasattr(qwen2, "lm_head")


def test_chat_template_renders_tools(tiny_llama):
    tokenizer = load_base(str(tiny_llama)).tokenizer
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "21C"},
        {"role": "assistant", "content": "It is 21C."},
    ]
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\n21C\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\nIt is 21C.<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(messages[1:2], add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token is None
    assert tokenizer.eos_token_id in tokenizer.eos_token_ids
    assert tokenizer.has_tool_calling  # mlx-lm recognized the <tool_call> format


def test_tokenizer_dir_sets_vocab(tmp_path, stories260k):
    path = make_tiny_model(tmp_path / "m", tokenizer_dir=stories260k)
    config = json.loads((path / "config.json").read_text())
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"]) == (512, 1, 2)
    assert np.isfinite(logits(load_base(str(path)).model)).all()


def test_transformers_loads_tiny_model(tiny_qwen2):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    with torch.no_grad():
        expected = hf(torch.tensor(np.array(TOKENS))).logits.numpy()
    np.testing.assert_allclose(logits(load_base(str(tiny_qwen2)).model), expected, atol=1e-4)


def test_rope_parameters_without_rope_theta(tmp_path, tiny_llama):
    def to_transformers5(config):
        del config["rope_theta"]
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}

    path = copy_with_config(tiny_llama, tmp_path / "m", to_transformers5)
    assert config_fixes(path) == {"rope_theta": 500000.0}
    loaded = load_base(str(path))
    assert loaded.model.args.rope_theta == 500000.0
    unfixed, _ = mlx_lm.load(str(path))
    assert unfixed.args.rope_theta != 500000.0
    assert not np.allclose(logits(loaded.model), logits(unfixed))


def test_rope_parameters_with_scaling(tmp_path, tiny_llama):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    path = copy_with_config(
        tiny_llama, tmp_path / "m", lambda c: c.update(rope_parameters=rope) or c.pop("rope_theta")
    )
    assert config_fixes(path) == {"rope_theta": 10000.0, "rope_scaling": rope}
    assert load_base(str(path)).model.args.rope_scaling == rope


def test_untied_lm_head_without_tie_key(tmp_path, tiny_llama):
    path = copy_with_config(tiny_llama, tmp_path / "m", lambda c: c.pop("tie_word_embeddings"))
    assert config_fixes(path) == {"tie_word_embeddings": False}
    unfixed, _ = mlx_lm.load(str(path))
    assert not hasattr(unfixed, "lm_head")  # what mlx-lm does alone: the head is dropped
    model = load_base(str(path)).model
    expected = load_file(str(path / "model.safetensors"))["lm_head.weight"]
    np.testing.assert_array_equal(np.array(model.lm_head.weight), expected)


def test_tied_without_tie_key(tmp_path, tiny_qwen2):
    path = copy_with_config(tiny_qwen2, tmp_path / "m", lambda c: c.pop("tie_word_embeddings"))
    assert config_fixes(path) == {"tie_word_embeddings": True}
    model = load_base(str(path)).model
    assert model.args.tie_word_embeddings and not hasattr(model, "lm_head")


def test_fixes_inside_text_config(tmp_path, tiny_llama):
    def nest(config):
        config["text_config"] = {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}

    path = copy_with_config(tiny_llama, tmp_path / "m", nest)
    fixes = config_fixes(path)
    assert fixes["text_config"]["rope_theta"] == 5e5
    assert fixes["text_config"]["tie_word_embeddings"] is False  # lm_head.weight is in the file
    assert fixes["text_config"]["rope_parameters"]["rope_theta"] == 5e5
    assert "rope_theta" not in fixes  # the top level had it


def test_fixes_leave_complete_configs_alone(tiny_llama, tiny_qwen2, stories260k):
    assert config_fixes(tiny_llama) == config_fixes(tiny_qwen2) == config_fixes(stories260k) == {}


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        resolve_model_path(str(tmp_path / "nope"))


def test_neither_path_nor_repo_id():
    with pytest.raises(UserError, match="neither an existing directory nor"):
        resolve_model_path("not a repo id!")


def test_directory_without_config(tmp_path, tiny_llama):
    shutil.copytree(tiny_llama, tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        load_base(str(tmp_path / "m"))


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"no model\*.safetensors weights \(found adapters"):
        resolve_model_path(str(tmp_path))


def test_only_pickle_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="safetensors only, never pickle"):
        load_base(str(tmp_path))


def test_unknown_model_type(tmp_path, tiny_llama):
    path = copy_with_config(tiny_llama, tmp_path / "m", lambda c: c.update(model_type="nope9"))
    with pytest.raises(UserError, match="model_type 'nope9' is not supported by mlx-lm"):
        load_base(str(path))


def test_config_without_model_type(tmp_path, tiny_llama):
    path = copy_with_config(tiny_llama, tmp_path / "m", lambda c: c.pop("model_type"))
    with pytest.raises(UserError, match="no model_type"):
        load_base(str(path))


def test_weights_that_do_not_match(tmp_path, tiny_llama):
    path = copy_with_config(tiny_llama, tmp_path / "m", lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(UserError, match="do not match config.json"):
        load_base(str(path))
