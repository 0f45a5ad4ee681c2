"""Never lose a run: resume equals the uninterrupted run, kills, Ctrl-C, NaN, full disk."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_lora.cli import cli
from mlx_lora.config import TrainConfig
from mlx_lora.formats.metrics import read_metrics
from mlx_lora.train.checkpoint import list_checkpoints
from mlx_lora.train.run import train


def config_for(model, data, out, **overrides) -> TrainConfig:
    settings = dict(model=str(model), data=str(data), adapter_path=str(out), iters=12,
                    batch_size=4, learning_rate=5e-3, steps_per_report=1, steps_per_eval=4,
                    save_every=3, dropout=0.1, lr_schedule="cosine", warmup=2,
                    mask_prompt=True)
    return TrainConfig(**{**settings, **overrides})


def train_losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if r["event"] == "train"}


def adapters(out) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}


def assert_same_adapters(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(config_for(tiny_llama, data, out))
    return out


def test_resume_reproduces_the_uninterrupted_run(tiny_llama, data, uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    for checkpoint in list_checkpoints(out):  # as if killed right after the step-6 checkpoint
        if checkpoint.name != "step-00000006":
            shutil.rmtree(checkpoint)
    train(config_for(tiny_llama, data, out), resume=True)
    expected, resumed = train_losses(uninterrupted), train_losses(out)
    assert sorted(resumed) == list(range(1, 13))
    assert max(abs(expected[s] - resumed[s]) for s in expected) <= 1e-5
    assert_same_adapters(adapters(out), adapters(uninterrupted))
    assert [r["event"] for r in read_metrics(out)].count("done") == 1


def cli_args(model, data, out, *extra):
    return [sys.executable, "-m", "mlx_lora", "train", "--model", str(model), "--data",
            str(data), "--adapter-path", str(out), "--iters", "12", "--batch-size", "4",
            "--learning-rate", "5e-3", "--steps-per-report", "1", "--steps-per-eval", "4",
            "--save-every", "3", "--dropout", "0.1", "--lr-schedule", "cosine", "--warmup",
            "2", "--mask-prompt", *extra]


def check_directory_is_sound(out):
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # no torn line
    for checkpoint in list_checkpoints(out):
        for name in ("adapters.safetensors", "optimizer.safetensors"):
            mx.load(str(checkpoint / name))
        json.loads((checkpoint / "state.json").read_text())
    if (out / "adapters.safetensors").exists():
        mx.load(str(out / "adapters.safetensors"))
        json.loads((out / "adapter_config.json").read_text())


def kill_at_a_random_moment(process, out, rng) -> bool:
    """SIGKILL once training has logged a random number of lines, plus a random delay."""
    lines_wanted = rng.randint(1, 30)
    while process.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines_wanted:
            time.sleep(rng.uniform(0.0, 0.3))
            break
        time.sleep(0.01)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tiny_llama, data, tmp_path):
    reference = tmp_path / "reference"
    train(config_for(tiny_llama, data, reference, iters=60))
    out, rng = tmp_path / "run", random.Random(0)
    kills = 0
    for attempt in range(60):
        args = cli_args(tiny_llama, data, out, "--iters", "60", *(["--resume"] * (attempt > 0)))
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt < 12 and kill_at_a_random_moment(process, out, rng):
            kills += 1
            check_directory_is_sound(out)
            continue
        process.wait()
        assert process.returncode == 0, process.stderr.read().decode()
        break
    print(f"\nkill test: {kills} SIGKILLs, {attempt} resumes, then finished")
    assert kills >= 8
    check_directory_is_sound(out)
    assert_same_adapters(adapters(out), adapters(reference))
    assert train_losses(out).keys() == train_losses(reference).keys()
    events = [r["event"] for r in read_metrics(out)]
    assert events.count("done") == 1 and events[-1] == "done"


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_llama, data, tmp_path):
    out = tmp_path / "run"
    args = cli_args(tiny_llama, data, out, "--iters", "300", "--steps-per-eval", "100")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    while not (out / "metrics.jsonl").exists() or not any(
            r["event"] == "train" for r in read_metrics(out)):
        time.sleep(0.05)
        assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    step = int(list_checkpoints(out)[-1].name.split("-")[1])
    assert 0 < step < 300 and step == max(train_losses(out))
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {list_checkpoints(out)[0].parent}" in resumed.stderr
    assert sorted(train_losses(out)) == list(range(1, 301))


def test_non_finite_loss_stops_before_the_update(tiny_llama, data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama), "--data", str(data), "--adapter-path",
            str(out), "--iters", "30", "--batch-size", "4", "--learning-rate", "1e30",
            "--save-every", "1", "--steps-per-eval", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert "is not finite" in message and "learning rate" in message and "step " in message
    step = int(message.split("step ")[1].split(":")[0])
    checkpoints = list_checkpoints(out)
    assert checkpoints and checkpoints[-1].name == f"step-{step - 1:08d}"
    for value in mx.load(str(checkpoints[-1] / "adapters.safetensors")).values():
        assert np.isfinite(np.array(value)).all()
    assert "done" not in [r["event"] for r in read_metrics(out)]


def test_early_stopping_and_best_adapters(tiny_llama, data, tmp_path):
    out = tmp_path / "run"
    # With a zero learning rate nothing improves after step 0: patience 2 stops at step 4.
    train(config_for(tiny_llama, data, out, learning_rate=0.0, warmup=0, steps_per_eval=2,
                     early_stopping_patience=2, iters=50))
    records = read_metrics(out)
    assert records[-1]["event"] == "done" and records[-1]["step"] == 4
    assert [r["step"] for r in records if r["event"] == "val"] == [0, 2, 4]
    best = json.loads((out / "best" / "adapter_config.json").read_text())
    assert best["lora_parameters"]["rank"] == 8
    assert (out / "loss.svg").read_text().startswith("<svg")


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny_llama, data, tmp_path,
                                                               monkeypatch):
    out = tmp_path / "run"
    real_save = mx.save_safetensors
    calls = {"n": 0}

    def save_until_the_disk_fills(path, arrays, metadata=None):
        calls["n"] += 1
        if "checkpoints" in str(path) and calls["n"] > 6:
            raise RuntimeError("[save_safetensors] No space left on device")
        return real_save(path, arrays, metadata=metadata)

    monkeypatch.setattr(mx, "save_safetensors", save_until_the_disk_fills)
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_llama), "--data", str(data),
                                      "--adapter-path", str(out), "--iters", "12",
                                      "--save-every", "3", "--batch-size", "4"])
    assert result.exit_code == 2 and "No space left on device" in result.output
    assert "previous version of the file is kept" in result.output
    checkpoints = list_checkpoints(out)
    assert [c.name for c in checkpoints] == ["step-00000003"]
    check_directory_is_sound(out)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
