"""Hardening: output directories that are not ours, one process per output, mlx-lm's keys
honoured or refused, bad numbers refused, interrupted work loadable, permissions, warnings."""

import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import addition_rows, make_adapter

from mlx_lora.cli import cli
from mlx_lora.data.records import Record
from mlx_lora.data.template import render
from mlx_lora.demo.tiny import make_tiny_model
from mlx_lora.errors import UserError
from mlx_lora.formats.metrics import read_metrics
from mlx_lora.formats.output_dir import exclusive
from mlx_lora.fuse import fuse
from mlx_lora.model.load import load_base
from mlx_lora.train.checkpoint import Position
from mlx_lora.train.loop import TrainingDiverged, _check_not_uniform

ROWS = addition_rows(6, 4)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "train.jsonl", ROWS[:20])
    write_jsonl(root / "valid.jsonl", ROWS[20:])
    return root


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def train_args(model, data, out, *extra):
    return ["train", "--model", model, "--data", data, "--adapter-path", out, "--iters", 2,
            "--batch-size", 4, "--steps-per-eval", 2, *extra]


def error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


def snapshot(directory: Path) -> dict:
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


# ---- 1. a directory that is not a run of ours ----

FOREIGN = {
    "mlx-lm adapters": {"adapter_config.json": '{"fine_tune_type": "lora"}',
                        "adapters.safetensors": "not ours"},
    "a PEFT export": {"adapter_config.json": '{"peft_type": "LORA"}',
                      "adapter_model.safetensors": "not ours"},
    "a user's best/ folder": {"best/notes.txt": "keep me", "best/adapters.safetensors": "mine"},
    "a user's file": {"README.md": "my notes"},
}


@pytest.mark.parametrize("files", FOREIGN.values(), ids=FOREIGN.keys())
def test_a_directory_that_is_not_ours_is_refused_then_only_written_beside(tiny_llama, data,
                                                                         tmp_path, files):
    out = tmp_path / "out"
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(content)
    before = snapshot(out)
    code, output = invoke(*train_args(tiny_llama, data, out))
    assert code == 2 and "holds files mlx-lora did not write" in error_line(output)
    assert snapshot(out) == before
    code, output = invoke(*train_args(tiny_llama, data, out, "--overwrite"))
    assert code == 0, output
    for name, content in files.items():  # replaced where a run writes that name, else kept
        if name not in ("adapter_config.json", "adapters.safetensors",
                        "best/adapters.safetensors"):
            assert (out / name).read_text() == content
    assert mlx_lm.load(str(tiny_llama), adapter_path=str(out))


def test_a_fresh_overwrite_of_our_run_deletes_only_what_runs_write(tiny_llama, data, tmp_path):
    out = tmp_path / "out"
    assert invoke(*train_args(tiny_llama, data, out, "--save-every", 1))[0] == 0
    (out / "best" / "mine.txt").write_text("keep")
    (out / "checkpoints" / "mine").mkdir()
    (out / "notes.txt").write_text("keep")
    assert invoke(*train_args(tiny_llama, data, out, "--overwrite", "--iters", 1))[0] == 0
    assert (out / "best" / "mine.txt").is_file() and (out / "notes.txt").is_file()
    assert (out / "checkpoints" / "mine").is_dir()
    assert [r["step"] for r in read_metrics(out) if r["event"] == "done"] == [1]


# ---- 2. one process per output directory ----

def test_a_live_run_holds_its_directory_and_a_killed_one_does_not(tiny_llama, data, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mlx_lora",
            *map(str, train_args(tiny_llama, data, out, "--iters", 100000,
                                 "--steps-per-report", 1, "--save-every", 1))]
    live = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not any(r["event"] == "save" for r in read_metrics(out)):
            assert live.poll() is None
            time.sleep(0.05)
        for extra in ((), ("--resume",), ("--overwrite",)):
            code, output = invoke(*train_args(tiny_llama, data, out, *extra))
            assert code == 2 and f"in use by process {live.pid}" in error_line(output)
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    code, output = invoke(*train_args(tiny_llama, data, out, "--resume"))
    assert code == 0, output  # the killed run's lock is stale: the resume goes ahead


@pytest.mark.parametrize("command", ["fuse", "export"])
def test_fuse_and_export_hold_their_output(tiny_llama, tmp_path, command):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    save = tmp_path / "result"
    args = (["fuse", "--model", tiny_llama] if command == "fuse" else ["export"])
    with exclusive(save, "a test"):
        code, output = invoke(*args, "--adapter-path", adapter, "--save-path", save)
    assert code == 2 and "is in use by process" in error_line(output)
    assert invoke(*args, "--adapter-path", adapter, "--save-path", save)[0] == 0


# ---- 4. mlx-lm's lora keys: honoured, or refused in one line ----

def test_mlx_lm_keys_are_honoured(tiny_llama, data, tmp_path):
    start = make_adapter(tiny_llama, tmp_path / "start")
    config = {
        "model": str(tiny_llama), "data": str(data), "iters": 2, "batch_size": 4,
        "optimizer": "adamw", "train": True, "clear_cache_threshold": 1000,
        "optimizer_config": {"adamw": {"betas": [0.8, 0.95], "eps": 1e-6,
                                       "weight_decay": 0.05}, "sgd": {}},
        "lr_schedule": {"name": "cosine_decay", "arguments": [1e-3, 50, 1e-5], "warmup": 1,
                        "warmup_init": 1e-7},
        "resume_adapter_file": str(start / "adapters.safetensors"),
        "lora_parameters": {"rank": 4, "scale": 2.0},
        "wandb": None, "report_to": None,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    code, output = invoke("train", "--config", tmp_path / "run.yaml", "--adapter-path", out)
    assert code == 0, output
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (resolved["adam_beta1"], resolved["adam_beta2"], resolved["adam_epsilon"]) == (
        0.8, 0.95, 1e-6)
    assert resolved["weight_decay"] == 0.05 and resolved["lr_schedule"] == "cosine"
    assert (resolved["decay_steps"], resolved["end_learning_rate"]) == (50, 1e-5)
    assert resolved["warmup_init"] == 1e-7 and resolved["clear_cache_threshold"] == 1000
    assert "starting from the adapter weights" in output
    first = read_metrics(out)[0]
    assert first["event"] == "val"  # step 0 already has the given adapter's loss
    base = invoke("eval", "--model", tiny_llama, "--data", data, "--split", "valid",
                  "--json")[1]
    given = invoke("eval", "--model", tiny_llama, "--adapter-path", start, "--data", data,
                   "--split", "valid", "--json")[1]
    assert json.loads(given.splitlines()[-1])["loss"] == pytest.approx(first["val_loss"],
                                                                      rel=1e-4)
    assert json.loads(base.splitlines()[-1])["loss"] != pytest.approx(first["val_loss"])


def test_features_map_other_keys(tiny_llama, tmp_path):
    rows = [{"question": f"What is {a} + 1?", "answer": f"{a + 1}"} for a in range(8)]
    data = write_jsonl(tmp_path / "gsm" / "train.jsonl", rows).parent
    code, output = invoke(*train_args(tiny_llama, data, tmp_path / "out", "--prompt-feature",
                                      "question", "--completion-feature", "answer"))
    assert code == 0, output


REFUSED_KEYS = {
    "unknown service": ({"report_to": "swanlab"}, "unknown service 'swanlab'"),
    "hf_dataset and data": ({"hf_dataset": {"path": "org/name"}},
                            "both 'data' and 'hf_dataset' name the data"),
    "train false": ({"train": False}, "asks mlx-lm not to train"),
    "unknown adam key": ({"optimizer_config": {"adamw": {"amsgrad": True}}},
                         "unknown key 'optimizer_config.adamw.amsgrad'"),
    "unknown schedule key": ({"lr_schedule": {"name": "cosine_decay", "arguments": [1e-3],
                                              "steps": 3}}, "unknown key 'lr_schedule.steps'"),
    "too many schedule arguments": ({"lr_schedule": {"name": "linear_schedule",
                                                     "arguments": [1, 0, 5, 9]}},
                                    "at most 3 values"),
    "weight decay with adam": ({"optimizer": "adam", "weight_decay": 0.1},
                               "weight_decay needs optimizer adamw"),
}


@pytest.mark.parametrize("values, expected", REFUSED_KEYS.values(), ids=REFUSED_KEYS.keys())
def test_mlx_lm_keys_that_cannot_be_honoured_are_refused(tiny_llama, data, tmp_path, values,
                                                         expected):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(
        {"model": str(tiny_llama), "data": str(data), **values}))
    code, output = invoke("train", "--config", tmp_path / "run.yaml", "--adapter-path",
                          tmp_path / "out")
    assert code == 2 and expected in error_line(output)
    assert not (tmp_path / "out").exists()


# ---- 5. bad numbers ----

def damaged_adapter(tiny_llama, tmp_path, how: str) -> Path:
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    weights = adapter / "adapters.safetensors"
    arrays = mx.load(str(weights))
    name = sorted(arrays)[0]
    config = json.loads((adapter / "adapter_config.json").read_text())
    if how == "nan":
        arrays[name] = arrays[name] * mx.array(float("nan"))
    elif how == "inf":
        arrays[name] = arrays[name] + mx.array(float("inf"))
    elif how == "int":
        arrays[name] = arrays[name].astype(mx.int32)
    elif how == "bool":
        arrays[name] = arrays[name] > 0
    elif how == "scale nan":
        config["lora_parameters"]["scale"] = float("nan")
        config.pop("alpha")
    elif how == "negative rank":
        config["lora_parameters"]["rank"] = -4
    elif how == "config not an object":
        config = [1, 2]
    mx.save_safetensors(str(weights), arrays)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


BAD_NUMBERS = {
    "nan": "holds NaN or infinite values", "inf": "holds NaN or infinite values",
    "int": "not floating point", "bool": "not floating point",
    "scale nan": "is not a finite number", "negative rank": "rank is -4",
    "config not an object": "expected a JSON object",
}


@pytest.mark.parametrize("how, expected", BAD_NUMBERS.items(), ids=BAD_NUMBERS.keys())
def test_bad_adapter_numbers_are_refused(tiny_llama, tmp_path, how, expected):
    adapter = damaged_adapter(tiny_llama, tmp_path, how)
    code, output = invoke("fuse", "--model", tiny_llama, "--adapter-path", adapter,
                          "--save-path", tmp_path / "fused")
    assert code == 2 and expected in error_line(output)
    assert not (tmp_path / "fused").exists()


def test_a_base_with_nan_weights_or_too_few_rows_is_refused_on_load(tmp_path, data):
    nan = make_tiny_model(tmp_path / "nan", hidden_size=32, num_layers=1)
    weights = mx.load(str(nan / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * float("nan")
    mx.save_safetensors(str(nan / "model.safetensors"), weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match="'model.norm.weight' holds NaN"):
        load_base(str(nan))
    small = make_tiny_model(tmp_path / "small", hidden_size=32, num_layers=1)
    weights = mx.load(str(small / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[key] = weights[key][:300]
    mx.save_safetensors(str(small / "model.safetensors"), weights, metadata={"format": "pt"})
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    code, output = invoke(*train_args(small, data, tmp_path / "out"))
    assert code == 2 and "has 300 rows" in error_line(output)


def test_a_loss_back_at_ln_vocab_is_divergence():
    position = Position(step=40)
    uniform = math.log(512)
    _check_not_uniform(uniform, position, 512)  # random init starts there: fine
    _check_not_uniform(0.5 * uniform, position, 512)
    with pytest.raises(TrainingDiverged, match="ln\\(vocabulary 512\\)"):
        _check_not_uniform(uniform * 1.005, position, 512)


# ---- 6. an interrupted run leaves loadable adapters ----

def test_stop_leaves_loadable_adapters_and_checkpoint(tiny_llama, data, tmp_path):
    import threading

    from mlx_lora import Finetune

    stop = threading.Event()
    run = Finetune(model=str(tiny_llama), data=str(data), adapter_path=str(tmp_path / "out"),
                   iters=50, save_every=1000, batch_size=4, steps_per_report=1)
    result = run.train(callback=lambda e: stop.set() if e.get("step") == 2 else None,
                       stop=stop)
    assert not result.finished
    checkpoint = next((tmp_path / "out" / "checkpoints").iterdir())
    for adapter_dir in (tmp_path / "out", checkpoint):
        assert (adapter_dir / "adapter_config.json").is_file()
        mlx_lm.load(str(tiny_llama), adapter_path=str(adapter_dir))
        assert invoke("generate", "--model", tiny_llama, "--adapter-path", adapter_dir,
                      "--prompt", "Add 1 and 2.", "--max-tokens", 2)[0] == 0


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tiny_llama, tmp_path):
    words = "the quick brown fox jumps over the lazy dog and runs far away ".split()
    long_rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(1500))}
                 for i in range(64)]
    data = write_jsonl(tmp_path / "long" / "train.jsonl", long_rows).parent
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mlx_lora",
            *map(str, train_args(tiny_llama, data, out, "--iters", 100000, "--batch-size", 8,
                                 "--steps-per-report", 1, "--save-every", 100000))]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    lines = iter(process.stderr.readline, "")
    seen = []
    for line in lines:  # off a terminal the bar prints a line per step: wait for step 2
        seen.append(line)
        if " 2/100000 " in line:
            break
    assert process.poll() is None, "".join(seen)
    while len(elapsed := [r["elapsed_s"] for r in read_metrics(out)
                          if r["event"] == "train"]) < 2:
        time.sleep(0.01)
    step_s = elapsed[1] - elapsed[0]  # a step after compilation
    process.send_signal(signal.SIGINT)  # early in step 3
    for line in lines:
        seen.append(line)
        if "stopping after this step" in line:
            break
    started = time.perf_counter()
    process.send_signal(signal.SIGINT)  # still inside step 3
    rest = process.communicate(timeout=60)[1]
    waited = time.perf_counter() - started
    assert process.returncode == 130 and "stopped at once" in rest, "".join(seen) + rest
    assert waited < step_s / 2, (waited, step_s)  # it did not wait for the step to end


# ---- 8. permissions, 9. stale partials, 10. fuse --quantize keeps the update ----

def test_files_have_the_users_umask(tiny_llama, data, tmp_path):
    old = os.umask(0o022)
    try:
        assert invoke(*train_args(tiny_llama, data, tmp_path / "out"))[0] == 0
    finally:
        os.umask(old)
    for name in ("adapters.safetensors", "adapter_config.json", "config.yaml", "loss.svg"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name


def test_fuse_removes_what_a_killed_fuse_left(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    stale = tmp_path / ".fused.partial-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    fuse(str(tiny_llama), str(adapter), str(tmp_path / "fused"))
    assert not stale.exists() and (tmp_path / "fused" / "config.json").is_file()


def test_fuse_quantize_keeps_a_float_adapters_update(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    result = fuse(str(tiny_llama), str(adapter), str(tmp_path / "fused"), quantize=4)
    assert all(c.error <= 0.1 or c.precision == "float32" for c in result.layers)
    assert any(c.precision != "4-bit" for c in result.layers)  # where 4 bits lose the update
    model, _ = mlx_lm.load(str(tmp_path / "fused"))  # the entries rebuild every layer
    assert model(mx.array([[1, 2, 3]])).shape[-1] > 0


# ---- 11. resume with other settings, 12. warnings, 13. one huge record ----

@pytest.mark.parametrize("change, expected", [
    (("--rank", 16), "rank 8 -> 16"), (("--max-seq-length", 64), "max_seq_length 2048 -> 64")])
def test_resume_with_other_settings_says_what_changed(tiny_llama, data, tmp_path, change,
                                                      expected):
    out = tmp_path / "out"
    assert invoke(*train_args(tiny_llama, data, out))[0] == 0
    code, output = invoke(*train_args(tiny_llama, data, out, "--resume", *change))
    assert code == 2 and expected in error_line(output)


def test_resume_with_other_data_says_so(tiny_llama, data, tmp_path):
    out = tmp_path / "out"
    assert invoke(*train_args(tiny_llama, data, out))[0] == 0
    other = write_jsonl(tmp_path / "other" / "train.jsonl", ROWS).parent
    code, output = invoke(*train_args(tiny_llama, other, out, "--resume"))
    assert code == 2 and "data" in error_line(output) and str(other) in error_line(output)


def test_warnings_for_settings_that_train_but_not_as_meant(tmp_path, data):
    model = make_tiny_model(tmp_path / "model", hidden_size=32, num_layers=1)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    code, output = invoke(*train_args(model, data, tmp_path / "out", "--max-seq-length", 128))
    assert code == 0, output
    warnings = [line for line in output.splitlines() if line.startswith("warning:")]
    assert any("no chat template" in w for w in warnings)
    assert any("beyond the model's context of 64" in w for w in warnings)


def test_a_huge_record_is_tokenized_only_as_far_as_it_is_kept(tiny_llama):
    tokenizer = load_base(str(tiny_llama)).tokenizer
    text = "Once upon a time there was a fox who liked to run. " * 20_000  # ~1 MB
    record = Record(kind="text", source="train.jsonl:1", text=text)
    ids, flags = render(record, tokenizer, mask_prompt=False, max_tokens=64)
    assert len(ids) < 2000  # a prefix, not the whole text
    head = tokenizer.encode(text[:5000])
    assert ids[:64] == head[:64] and len(flags) == len(ids)
    np.testing.assert_array_equal(np.array(flags), True)


def test_test_key_reports_the_test_loss_after_training(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d" / "train.jsonl", ROWS[:20]).parent
    code, output = invoke(*train_args(tiny_llama, data, tmp_path / "out", "--test"))
    assert code == 2 and "--test needs a test split" in error_line(output)
    write_jsonl(data / "test.jsonl", ROWS[20:])
    code, output = invoke(*train_args(tiny_llama, data, tmp_path / "out", "--test",
                                      "--test-batches", 1))
    assert code == 0 and "test loss" in output, output
    reported = float(output.split("test loss ")[1].split(",")[0])
    code, evaluated = invoke("eval", "--model", tiny_llama, "--adapter-path", tmp_path / "out",
                             "--data", data, "--json")
    assert reported == pytest.approx(json.loads(evaluated.splitlines()[-1])["loss"], abs=1e-4)


def test_fuse_overwrite_replaces_only_a_model_directory(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    fused = tmp_path / "fused"
    fuse(str(tiny_llama), str(adapter), str(fused))
    fuse(str(tiny_llama), str(adapter), str(fused), overwrite=True)  # a model dir: replaced
    (fused / "my-notes.txt").write_text("keep")
    code, output = invoke("fuse", "--model", tiny_llama, "--adapter-path", adapter,
                          "--save-path", fused, "--overwrite")
    assert code == 2 and "holds files that are not a model's (my-notes.txt)" in error_line(output)
    assert (fused / "my-notes.txt").read_text() == "keep"
