"""A sweep of bad inputs: each gets one actionable line, exit status 2, and touches no file."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlx_lora.cli import cli
from mlx_lora.demo.tiny import make_tiny_model

GOOD = '{"prompt": "Say hi.", "completion": "hi"}\n'


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


# name -> (train.jsonl content, expected words in the message); trained from a directory.
DATA_CASES = {
    "empty file": ("", "train.jsonl: the file is empty"),
    "blank lines only": ("\n\n  \n", "the file is empty"),
    "BOM then a broken JSON array": ("\ufeff[" + GOOD.strip() + ",\n{oops}]\n",
                                     "train.jsonl:2: not valid JSON"),
    "non-UTF-8 bytes": (b'{"text": "caf\xe9"}\n', "train.jsonl:1: not valid UTF-8"),
    "JSON array of a string": ('[\n"a"\n]\n', "train.jsonl:2: expected a JSON object"),
    "unparseable line": (GOOD + "{oops\n", "train.jsonl:2: not valid JSON"),
    "a number, not an object": (GOOD + "42\n", "train.jsonl:2:"),
    "text is a number": ('{"text": 5}\n', "train.jsonl:1:"),
    "empty text": ('{"text": ""}\n', 'train.jsonl:1: "text" is empty'),
    "prompt without completion": ('{"prompt": "a"}\n', "train.jsonl:1:"),
    "empty completion": ('{"prompt": "a", "completion": ""}\n', "train.jsonl:1:"),
    "no known fields": ('{"question": "a", "answer": "b"}\n', "train.jsonl:1:"),
    "mixed formats": (GOOD + '{"text": "plain"}\n', "train.jsonl:2:"),
    "messages not a list": ('{"messages": "hi"}\n', "train.jsonl:1:"),
    "message without role": ('{"messages": [{"content": "hi"}]}\n', "train.jsonl:1:"),
    "unknown role": ('{"messages": [{"role": "robot", "content": "hi"}, '
                     '{"role": "assistant", "content": "x"}]}\n', "train.jsonl:1:"),
    "no assistant turn": ('{"messages": [{"role": "user", "content": "hi"}]}\n',
                          "train.jsonl:1:"),
    "content not a string": ('{"messages": [{"role": "user", "content": 3}, '
                             '{"role": "assistant", "content": "x"}]}\n', "train.jsonl:1:"),
    "tools not a list": ('{"messages": [{"role": "user", "content": "a"}, {"role": '
                         '"assistant", "content": "b"}], "tools": "x"}\n', "train.jsonl:1:"),
    "huge unparseable line": ("{" + "x" * 3_000_000 + "\n", "train.jsonl:1: not valid JSON"),
    "lone surrogate": (GOOD + '{"prompt": "a\\ud800b", "completion": "c"}\n',
                       "train.jsonl:2: holds text that is not valid Unicode"),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"), hidden_size=64, num_layers=1)


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_actionable_line(code: int, output: str, expected: str):
    assert code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and output.strip().endswith(errors[0].strip()), output
    assert expected in errors[0], output
    assert len(errors[0]) < 600


def snapshot(directory: Path) -> dict:
    if not directory.exists():
        return {}
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.rglob("*")
            if p.is_file()}


@pytest.mark.parametrize("content, expected", DATA_CASES.values(), ids=DATA_CASES.keys())
def test_bad_data(model, tmp_path, content, expected):
    write(tmp_path / "data" / "train.jsonl", content)
    out = tmp_path / "out"
    code, output = invoke("train", "--model", model, "--data", tmp_path / "data",
                          "--adapter-path", out, "--iters", 1)
    assert_one_actionable_line(code, output, expected)
    assert not out.exists()


PATH_CASES = {
    "data path missing": (lambda d: d / "nowhere", "no such file or directory"),
    "data file type": (lambda d: write(d / "train.csv", "a,b\n"), "unsupported file type"),
    "directory without train split": (lambda d: write(d / "x" / "valid.jsonl", GOOD).parent,
                                      "no train.jsonl"),
    "a device, not a file": (lambda d: Path("/dev/null"), "neither a regular file nor"),
}


@pytest.mark.parametrize("make, expected", PATH_CASES.values(), ids=PATH_CASES.keys())
def test_bad_data_paths(model, tmp_path, make, expected):
    code, output = invoke("train", "--model", model, "--data", make(tmp_path),
                          "--adapter-path", tmp_path / "out")
    assert_one_actionable_line(code, output, expected)
    assert not (tmp_path / "out").exists()


CONFIG_CASES = {
    "unknown key": ({"learnin_rate": 1e-4}, "unknown key 'learnin_rate'"),
    "wrong type": ({"rank": "eight"}, "'rank' must be int"),
    "negative learning rate": ({"learning_rate": -1.0}, "'learning_rate' must not be negative"),
    "negative iters": ({"iters": -5}, "'iters' must not be negative"),
    "zero batch size": ({"batch_size": 0}, "'batch_size' must be positive"),
    "dropout of one or more": ({"dropout": 1.5}, "'dropout' must be in [0, 1)"),
    "unsupported bits": ({"quantize": 7}, "'quantize' must be 0"),
    "bad num_layers": ({"num_layers": -5}, "'num_layers' must be -1"),
    "unknown mlx-lm schedule": ({"lr_schedule": {"name": "step_decay", "arguments": [1]}},
                                "lr_schedule.name 'step_decay' is not supported"),
    "unknown lora parameter": ({"lora_parameters": {"rnk": 4}},
                               "unknown key 'lora_parameters.rnk'"),
    "rank larger than the layer": ({"rank": 5000}, "rank 5000 is larger than layer"),
    "targets that match nothing": ({"targets": "qq_proj"}, "matches no linear layer"),
    "bad regex": ({"targets": "re:(["}, "bad regular expression"),
    "unknown optimizer": ({"optimizer": "lion"}, "'optimizer' must be one of"),
}


@pytest.mark.parametrize("values, expected", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_bad_config(model, tmp_path, values, expected):
    write(tmp_path / "data" / "train.jsonl", GOOD)
    config = write(tmp_path / "run.json", json.dumps(
        {"model": str(model), "data": str(tmp_path / "data"), **values}))
    out = tmp_path / "out"
    code, output = invoke("train", "--config", config, "--adapter-path", out)
    assert_one_actionable_line(code, output, expected)
    assert not out.exists()


CONFIG_FILE_CASES = {
    "missing config file": (None, "cannot read the config file"),
    "bad YAML": ("rank: [1, 2\n", "not valid YAML"),
    "not a mapping": ("- 1\n- 2\n", "must be a mapping"),
    "a key twice": ("rank: 4\nalpha: 8\nrank: 16\n", "duplicate key 'rank'"),
}


@pytest.mark.parametrize("text, expected", CONFIG_FILE_CASES.values(),
                         ids=CONFIG_FILE_CASES.keys())
def test_bad_config_file(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    if text is not None:
        path.write_text(text)
    code, output = invoke("train", "--config", path, "--adapter-path", tmp_path / "out")
    assert_one_actionable_line(code, output, expected)


def broken_model(model: Path, tmp_path: Path, how: str) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(model, target)
    config = json.loads((target / "config.json").read_text())
    if how == "no config":
        (target / "config.json").unlink()
    elif how == "no weights":
        (target / "model.safetensors").unlink()
    elif how == "pickle weights only":
        (target / "model.safetensors").rename(target / "pytorch_model.bin")
    elif how == "unknown architecture":
        write(target / "config.json", json.dumps({**config, "model_type": "no_such_arch"}))
    elif how == "config not JSON":
        write(target / "config.json", "{not json")
    elif how == "weights for another shape":
        write(target / "config.json", json.dumps({**config, "hidden_size": 128}))
    elif how in ("template syntax error", "template drops assistant turns"):
        tokenizer_config = json.loads((target / "tokenizer_config.json").read_text())
        tokenizer_config["chat_template"] = (
            "{% for m in messages %}{{ m['content'] }" if how == "template syntax error" else
            "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
            "{% endfor %}")
        write(target / "tokenizer_config.json", json.dumps(tokenizer_config))
    return target


MODEL_CASES = {
    "missing directory": ("missing", "no such directory"),
    "no config": ("no config", "config.json"),
    "no weights": ("no weights", "safetensors"),
    "pickle weights only": ("pickle weights only", "safetensors only"),
    "unknown architecture": ("unknown architecture", "no_such_arch"),
    "config not JSON": ("config not JSON", "config.json"),
    "weights for another shape": ("weights for another shape", "do not match"),
    "template syntax error": ("template syntax error", "chat template (chat_template.jinja "
                              "or tokenizer_config.json) has a syntax error"),
    "template drops assistant turns": ("template drops assistant turns",
                                       "the chat template drops assistant turns"),
}


@pytest.mark.parametrize("how, expected", MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_bad_model(model, tmp_path, how, expected):
    path = tmp_path / "gone" if how == "missing" else broken_model(model, tmp_path, how)
    write(tmp_path / "data" / "train.jsonl", GOOD)
    code, output = invoke("train", "--model", path, "--data", tmp_path / "data",
                          "--adapter-path", tmp_path / "out")
    assert_one_actionable_line(code, output, expected)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    write(root / "data" / "train.jsonl", GOOD * 4)
    code, output = invoke("train", "--model", model, "--data", root / "data",
                          "--adapter-path", root / "out", "--iters", 2, "--save-every", 1)
    assert code == 0, output
    return root / "out"


def broken_adapter(trained: Path, tmp_path: Path, how: str) -> Path:
    target = tmp_path / "adapter"
    shutil.copytree(trained, target)
    weights = target / "adapters.safetensors"
    if how == "corrupt file":
        weights.write_bytes(b"\x00garbage" * 10)
    elif how == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "no adapter_config.json":
        (target / "adapter_config.json").unlink()
    elif how == "tensor of the wrong shape":
        arrays = mx.load(str(weights))
        name = sorted(arrays)[0]
        arrays[name] = mx.zeros((3, 3))
        mx.save_safetensors(str(weights), arrays)
    elif how == "unknown method":
        config = json.loads((target / "adapter_config.json").read_text())
        write(target / "adapter_config.json", json.dumps({**config, "fine_tune_type": "xyz"}))
    return target


ADAPTER_CASES = {
    "corrupt file": "cannot read adapter weights",
    "truncated safetensors": "cannot read adapter weights",
    "no adapter_config.json": "not an adapter directory; expected adapter_config.json",
    "tensor of the wrong shape": "has shape (3, 3)",
    "unknown method": "fine_tune_type 'xyz' is not supported",
}


@pytest.mark.parametrize("how, expected", ADAPTER_CASES.items(), ids=ADAPTER_CASES.keys())
def test_bad_adapter(model, trained, tmp_path, how, expected):
    adapter = broken_adapter(trained, tmp_path, how)
    before = snapshot(adapter)
    code, output = invoke("generate", "--model", model, "--adapter-path", adapter,
                          "--prompt", "hi", "--max-tokens", 2)
    assert_one_actionable_line(code, output, expected)
    assert snapshot(adapter) == before


def test_adapter_for_another_model(trained, tmp_path):
    other = make_tiny_model(tmp_path / "other", hidden_size=128, num_layers=1)
    code, output = invoke("generate", "--model", other, "--adapter-path", trained,
                          "--prompt", "hi", "--max-tokens", 2)
    assert_one_actionable_line(code, output, "was the adapter trained on another base model")


def test_corrupt_checkpoint_on_resume(model, trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    newest = sorted((out / "checkpoints").iterdir())[-1]
    (newest / "optimizer.safetensors").write_bytes(b"broken")
    before = snapshot(out)
    code, output = invoke("train", "--model", model, "--data", trained.parent / "data",
                          "--adapter-path", out, "--iters", 2, "--resume")
    assert_one_actionable_line(code, output, "cannot read checkpoint")
    assert snapshot(out) == before


OUTPUT_CASES = {
    "under a file": (lambda d: write(d / "afile", "x") / "out", "which is a file"),
    "a file itself": (lambda d: write(d / "afile", "x"), "is a file"),
    "inside /proc": (lambda d: Path("/proc/mlx_lora_out"), "cannot write in /proc"),
    "an empty name": (lambda d: "", "--adapter-path is empty"),
}


@pytest.mark.parametrize("make, expected", OUTPUT_CASES.values(), ids=OUTPUT_CASES.keys())
def test_bad_output_location_fails_before_the_model_loads(tmp_path, make, expected):
    write(tmp_path / "data" / "train.jsonl", GOOD)
    # The model does not exist: an output error must come first, before any loading.
    code, output = invoke("train", "--model", tmp_path / "no-model", "--data",
                          tmp_path / "data", "--adapter-path", make(tmp_path))
    assert_one_actionable_line(code, output, expected)
