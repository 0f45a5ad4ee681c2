"""The Python API: in-memory data and models, callbacks, stop and resume, errors, README example."""

import json
import re
import threading
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import yaml
from helpers import addition_rows

import mlx_lora
from mlx_lora import Finetune, UserError
from mlx_lora.formats.metrics import read_metrics

README = Path(__file__).resolve().parents[1] / "README.md"
ROWS = addition_rows(9, 5)
SPLITS = {"train": ROWS[:36], "valid": ROWS[36:], "test": ROWS[36:]}
SETTINGS = dict(iters=8, batch_size=4, learning_rate=5e-3, steps_per_report=1, steps_per_eval=4,
                save_every=2, mask_prompt=True, dropout=0.1, lr_schedule="cosine", warmup=2)


def adapters(out) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(Path(out) / "adapters.safetensors")).items()}


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    """An uninterrupted run on in-memory splits, with every callback event it got."""
    out = tmp_path_factory.mktemp("api") / "run"
    events = []
    run = Finetune(model=str(tiny_llama), data=SPLITS, adapter_path=str(out), **SETTINGS)
    result = run.train(callback=events.append)
    return run, result, events, out


def test_in_memory_records_train_evaluate_and_generate(reference):
    run, result, _, out = reference
    assert result.finished and result.step == 8 and result.adapter_dir == out
    assert (out / "adapters.safetensors").is_file() and (out / "best").is_dir()
    metrics = run.evaluate(split="test")
    assert set(metrics) == {"split", "loss", "perplexity", "tokens", "records"}
    assert metrics["records"] == len(SPLITS["test"]) and metrics["loss"] > 0
    with_accuracy = run.evaluate(split="valid", generate=2)
    assert 0.0 <= with_accuracy["accuracy"] <= 1.0 and with_accuracy["generated"] == 2
    assert isinstance(run.generate("Add 1 and 2.", max_tokens=4), str)


def test_callback_gets_every_metrics_line_with_the_same_keys(reference):
    _, _, events, out = reference
    assert events == read_metrics(out)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "val" and kinds[-1] == "done" and kinds.count("train") == 8
    train = next(e for e in events if e["event"] == "train")
    assert {"step", "loss", "learning_rate", "tokens_per_sec", "peak_memory_gb",
            "trained_tokens"} <= set(train)


def test_a_fresh_api_object_evaluates_the_saved_adapters(reference, tiny_llama):
    run, _, _, out = reference
    again = Finetune(model=str(tiny_llama), data=SPLITS, adapter_path=str(out),
                     mask_prompt=True)
    assert again.evaluate("test")["loss"] == pytest.approx(run.evaluate("test")["loss"],
                                                           rel=1e-5)
    base = Finetune(model=str(tiny_llama), data=SPLITS, adapter_path=None, mask_prompt=True)
    assert base.evaluate("test")["loss"] != pytest.approx(run.evaluate("test")["loss"])


def test_stop_from_another_thread_then_resume_equals_uninterrupted(reference, tiny_llama,
                                                                   tmp_path):
    _, _, _, uninterrupted = reference
    out = tmp_path / "run"
    stop, reached, outcome = threading.Event(), threading.Event(), {}

    def on_event(event):
        if event["event"] == "train" and event["step"] >= 3:
            reached.set()

    def train_in_background():
        run = Finetune(model=str(tiny_llama), data=SPLITS, adapter_path=str(out), **SETTINGS)
        outcome["result"] = run.train(callback=on_event, stop=stop)

    worker = threading.Thread(target=train_in_background)
    worker.start()
    assert reached.wait(timeout=300)
    stop.set()
    worker.join(timeout=300)
    first = outcome["result"]
    assert not first.finished and 3 <= first.step < 8
    assert (out / "adapters.safetensors").is_file()  # the work so far loads as it is
    assert not any(r["event"] == "done" for r in read_metrics(out))

    resumed = Finetune(model=str(tiny_llama), data=SPLITS, adapter_path=str(out), resume=True,
                       **SETTINGS).train()
    assert resumed.finished and resumed.step == 8
    want, got = adapters(uninterrupted), adapters(out)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
    losses = {r["step"]: r["loss"] for r in read_metrics(out) if r["event"] == "train"}
    reference_losses = {r["step"]: r["loss"] for r in read_metrics(uninterrupted)
                        if r["event"] == "train"}
    assert losses == pytest.approx(reference_losses, rel=1e-5)


def test_a_loaded_model_and_tokenizer_train_like_the_path(reference, tiny_llama, tmp_path):
    _, _, _, from_path = reference
    pair = mlx_lm.load(str(tiny_llama))
    run = Finetune(model=pair, data=SPLITS, adapter_path=str(tmp_path / "run"), **SETTINGS)
    assert run.train().finished
    want, got = adapters(from_path), adapters(tmp_path / "run")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
    assert isinstance(run.generate("Add 1 and 2.", max_tokens=4), str)


def test_bad_records_raise_the_cli_message_before_any_model_loads(tmp_path):
    records = [{"text": ""}, {"prompt": "a", "completion": "b"}, {"question": "?"}]
    run = Finetune(model=str(tmp_path / "no-such-model"), data=records,
                   adapter_path=str(tmp_path / "run"))
    with pytest.raises(UserError) as error:
        run.train()
    lines = str(error.value).splitlines()
    assert lines[0] == 'train[0]: "text" is empty'
    assert lines[1].startswith("train[1]: a completion record, but record 0 is a text record")
    assert lines[2].startswith('train[2]: no "text", "prompt"/"completion", "messages" or '
                               '"chosen"/"rejected" key')
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, message", [
    ({"learning_rat": 1e-4}, "unknown key 'learning_rat' (did you mean 'learning_rate'?"),
    ({"rank": "eight"}, "'rank' must be int"),
    ({"lr_schedule": "step"}, "'lr_schedule' must be one of"),
])
def test_bad_options_raise_user_error(options, message):
    with pytest.raises(UserError, match=re.escape(message)):
        Finetune(model="m", data="d", **options)


def test_bad_data_shapes_raise_user_error(tiny_llama, tmp_path):
    for data, message in (({"training": ROWS}, "needs a 'train' key"),
                          ([], "expected a non-empty list of records")):
        with pytest.raises(UserError, match=message):
            Finetune(model=str(tiny_llama), data=data, adapter_path=str(tmp_path)).train()


def test_the_run_records_the_packing_it_really_did(tiny_llama, tmp_path):
    same_length = [{"text": "one two three four five six seven"}] * 16  # padding fills rows
    run = Finetune(model=str(tiny_llama), data=same_length, adapter_path=str(tmp_path / "run"),
                   iters=1, batch_size=4)
    assert run.config.pack is True  # asked for (the default)
    run.train()
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["pack"] is False


def test_readme_python_example_runs_as_written(tiny_llama, tmp_path, monkeypatch):
    block = re.search(r"## Python API.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    data = tmp_path / "data"
    data.mkdir()
    for split, rows in SPLITS.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)  # the example writes "out" and reads "data/" here
    # The same code on a tiny local model, for few steps.
    code = block.replace('"Qwen/Qwen2.5-0.5B-Instruct"', repr(str(tiny_llama)))
    code = code.replace("iters=200", "iters=4")
    assert code != block
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["result"].finished and "loss" in namespace["metrics"]
    assert (tmp_path / "out" / "adapters.safetensors").is_file()
    assert mlx_lora.Finetune is Finetune
