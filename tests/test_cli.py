"""The command line end to end, through click's runner."""

import dataclasses
import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mlx_lora.cli import cli
from mlx_lora.config import TrainConfig
from mlx_lora.formats.mlx_lm_adapter import load_adapters
from mlx_lora.model.load import load_base

CHAT = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a + b}"},
                  {"role": "user", "content": "And doubled?"},
                  {"role": "assistant", "content": f"{2 * (a + b)}"}]}
    for a in range(6) for b in range(4)
]


@pytest.fixture()
def chat_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, rows in (("train", CHAT[:20]), ("valid", CHAT[20:])):
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def test_help_lists_every_option_with_its_default():
    assert run("--help").exit_code == 0
    text = run("train", "--help").output.replace("\n", " ")
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in text
    assert text.count("[default:") >= len(dataclasses.fields(TrainConfig))
    for command in ("generate", "demo"):
        assert "[default:" in run(command, "--help").output


def test_train_end_to_end_then_mlx_lm_and_generate_load_it(tiny_llama, chat_data, tmp_path):
    out = tmp_path / "out"
    result = run("train", "--model", tiny_llama, "--data", chat_data, "--adapter-path", out,
                 "--iters", 6, "--batch-size", 4, "--mask-prompt", "--steps-per-eval", 3,
                 "--save-every", 3, "--learning-rate", 1e-2, "--targets", "q_proj,v_proj")
    assert result.exit_code == 0, result.output
    for name in ("adapter_config.json", "adapters.safetensors", "metrics.jsonl", "config.yaml"):
        assert (out / name).is_file(), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines]
    assert events.count("val") == 3 and events[-1] == "done" and "save" in events

    tokens = mx.array([[5, 6, 7, 8, 9]])
    theirs, _ = mlx_lm.load(str(tiny_llama), adapter_path=str(out))
    ours = load_base(str(tiny_llama)).model
    load_adapters(ours, out)
    np.testing.assert_allclose(np.array(theirs(tokens)), np.array(ours(tokens)), atol=1e-5)

    result = run("generate", "--model", tiny_llama, "--adapter-path", out, "--no-chat",
                 "--prompt", "the cat sat on", "--max-tokens", 8)
    _, tokenizer = mlx_lm.load(str(tiny_llama))
    expected = mlx_lm.generate(theirs, tokenizer, "the cat sat on", max_tokens=8)
    assert result.exit_code == 0 and result.output == expected + "\n"


def test_config_file_with_mlx_lm_keys_and_flag_override(tiny_llama, chat_data, tmp_path):
    config = {
        "model": str(tiny_llama), "data": str(chat_data), "adapter_path": str(tmp_path / "o"),
        "fine_tune_type": "lora", "num_layers": 1, "batch_size": 2, "iters": 3,
        "grad_accumulation_steps": 2, "train": True, "test": False, "seed": 3,
        "lora_parameters": {"keys": ["self_attn.q_proj"], "rank": 4, "scale": 5.0,
                            "dropout": 0.1},
        "lr_schedule": {"name": "cosine_decay", "warmup": 1, "arguments": [2e-4, 3, 1e-7]},
        "steps_per_eval": 2,
    }
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run("train", "--config", path, "--rank", 2)
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert resolved["rank"] == 2 and resolved["alpha"] == 20.0 and resolved["num_layers"] == 1
    assert resolved["lr_schedule"] == "cosine" and resolved["learning_rate"] == 2e-4
    assert resolved["warmup"] == 1 and resolved["targets"] == "self_attn.q_proj"
    adapter = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert adapter["lora_parameters"]["keys"] == ["self_attn.q_proj"]
    assert adapter["num_layers"] == 1 and adapter["lora_parameters"]["scale"] == 10.0


@pytest.mark.parametrize("content, message", [
    ({"rnak": 4}, "unknown key 'rnak'"),
    ({"rank": "four"}, "'rank' must be int"),
    ({"rank": -1}, "'rank' must be positive"),
    ({"optimizer": "sgd"}, "'optimizer' must be one of adam, adamw"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": "m", "data": "d", **content}))
    result = CliRunner().invoke(cli, ["train", "--config", str(path)])
    assert result.exit_code == 2
    assert message in result.output and str(path) in result.output
    assert "Traceback" not in result.output


def test_bad_records_fail_before_training(tiny_llama, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine"}\n{"text": ""}\nnot json\n')
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_llama), "--data", str(data),
                                      "--adapter-path", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "train.jsonl:2:" in result.output and "train.jsonl:3:" in result.output
    assert not (tmp_path / "o").exists()


def test_refuses_to_mix_runs_in_one_directory(tiny_llama, chat_data, tmp_path):
    args = ["train", "--model", tiny_llama, "--data", chat_data, "--adapter-path",
            tmp_path / "o", "--iters", 1]
    assert run(*args).exit_code == 0
    again = CliRunner().invoke(cli, [str(a) for a in args])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert run(*args, "--overwrite").exit_code == 0


def test_data_command_shows_counts_and_targets(tiny_llama, chat_data):
    result = run("data", "--model", tiny_llama, "--data", chat_data, "--mask-prompt")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "train: train.jsonl: chat (messages), 20 records"
    assert lines[1].startswith("  20 examples")
    assert "valid: valid.jsonl: chat (messages), 4 records" in lines
    # the first record is "0 plus 0": both assistant answers are targets, nothing else is
    shown = result.output.split("targets between ⟦ and ⟧:\n")[1]
    assert shown.count("⟦") == 2 and "⟦0<|im_end|>⟧" in shown
    assert shown.index("⟦") > shown.index("What is 0 plus 0?")
