"""The forgetting probe: the bypass is the base, eval's general losses equal a plain
cross-entropy, and training logs the general loss at every evaluation and plots it."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_adapter, randomize_lora_b

from mlx_lora import Finetune
from mlx_lora.adapters.inject import adapter_layers, bypassed, inject, make_spec
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.cli import cli
from mlx_lora.forgetting import BUILTIN_FILE, general_examples, read_general
from mlx_lora.model.adapted import load_adapted
from mlx_lora.model.load import load_base

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]])
COMPLETIONS = [{"prompt": f"What is {a} plus {b}?", "completion": f"{a + b}"}
               for a in range(6) for b in range(3)]
PAIRS = [{"prompt": f"Add {a} and {b}.", "chosen": f"{a + b}", "rejected": f"{a + b + 1} maybe"}
         for a in range(4) for b in range(3)]
MAX_SEQ = 256  # the builtin text in several chunks


def reference_loss(model, examples) -> float:
    """Mean cross-entropy per target token from the model's full logits, one example at a time."""
    total, count = 0.0, 0
    for example in examples:
        logits = model(mx.array(example.ids[:-1])[None])[0].astype(mx.float32)  # (L-1, V)
        ce = nn.losses.cross_entropy(logits, mx.array(example.ids[1:]))
        mask = mx.array(example.mask[1:].astype(np.float32))
        total += (ce * mask).sum().item()
        count += int(example.mask[1:].sum())
    return total / count


def builtin_examples(tokenizer, max_seq_length=MAX_SEQ):
    return general_examples(*read_general("builtin"), tokenizer, max_seq_length)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("quantize", [0, 4], ids=["float", "4-bit"])
def test_bypass_is_the_base_and_swaps_back(tiny_llama, method, quantize):
    fresh = load_base(str(tiny_llama), quantize=quantize).model(TOKENS)
    adapted = load_base(str(tiny_llama), quantize=quantize).model
    mx.random.seed(0)
    spec = make_spec(adapted, method, "all-linear", -1, Hyper(4, 8.0))
    inject(adapted, spec)
    randomize_lora_b(adapted)
    before = adapted(TOKENS)
    assert mx.abs(before - fresh).max().item() > 1e-3  # the adapter changes the output
    with bypassed(adapted) as base:
        assert not adapter_layers(base)
        assert mx.abs(base(TOKENS) - fresh).max().item() < 1e-6
    assert [path for path, _ in adapter_layers(adapted)] == list(spec.paths)
    assert mx.abs(adapted(TOKENS) - before).max().item() == 0.0


def test_bypass_swaps_back_after_an_error(tiny_llama):
    model = load_base(str(tiny_llama)).model
    inject(model, make_spec(model, "lora", "all-linear", -1, Hyper(4, 8.0)))
    layers = [(path, id(layer)) for path, layer in adapter_layers(model)]
    with pytest.raises(RuntimeError), bypassed(model):
        raise RuntimeError("inside")
    assert [(path, id(layer)) for path, layer in adapter_layers(model)] == layers


def test_builtin_set_loads_and_ships(tiny_llama):
    name, records = read_general("builtin")
    assert name == "general_text.txt" and len(records) == 1 and records[0].kind == "text"
    assert "mlx_lora project wrote" in records[0].text.splitlines()[0]
    assert len(records[0].text) > 3000
    examples = builtin_examples(load_base(str(tiny_llama)).tokenizer)
    assert len(examples) > 2 and all(len(e.ids) <= MAX_SEQ for e in examples)
    # It ships in a wheel: setuptools' package-data names it.
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    section = pyproject.split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    assert f'"mlx_lora.data" = ["{BUILTIN_FILE.name}"]' in section


def run_eval(*args) -> tuple[dict, str]:
    result = CliRunner().invoke(cli, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_eval_general_data_equals_plain_cross_entropy(tiny_llama, tmp_path, method):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", method=method)
    # The bare flag means builtin, even right before another option.
    report, said = run_eval("--model", str(tiny_llama), "--adapter-path", str(adapter),
                            "--max-seq-length", str(MAX_SEQ), "--general-data")
    base = load_base(str(tiny_llama))
    examples = builtin_examples(base.tokenizer)
    want_base = reference_loss(base.model, examples)
    want_adapted = reference_loss(load_adapted(str(tiny_llama), str(adapter))[0].model,
                                  examples)
    assert report["general_loss_base"] == pytest.approx(want_base, rel=1e-5)
    assert report["general_loss"] == pytest.approx(want_adapted, rel=1e-5)
    increase = (report["general_loss"] - report["general_loss_base"]) / want_base
    assert report["general_loss_increase"] == pytest.approx(increase, rel=1e-4)
    assert report["general_tokens"] == sum(int(e.mask[1:].sum()) for e in examples)
    # The adapter changes the loss by several times the tolerance above.
    assert abs(want_adapted - want_base) > 1e-4 * want_base
    assert "loss" not in report  # no --data: the probe alone
    assert "general text (builtin)" in said and "base" in said


def test_eval_data_and_general_file_together(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                         for r in COMPLETIONS))
    general = tmp_path / "general.txt"
    general.write_text("The river runs past the old mill and under the stone bridge.\n" * 5)
    report, _ = run_eval("--model", str(tiny_llama), "--adapter-path", str(adapter),
                         "--data", str(tmp_path), "--general-data", str(general))
    assert {"loss", "perplexity", "tokens", "general_loss", "general_loss_base"} <= set(report)
    base = load_base(str(tiny_llama))
    examples = general_examples(*read_general(str(general)), base.tokenizer, 2048)
    assert report["general_loss_base"] == pytest.approx(reference_loss(base.model, examples),
                                                        rel=1e-5)


def test_eval_needs_data_or_general_data(tiny_llama, tmp_path):
    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_llama)])
    assert result.exit_code == 2 and "--general-data" in result.output
    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_llama), "--general-data",
                                      str(tmp_path / "missing.txt")])
    assert result.exit_code == 2 and "missing.txt: no such file" in result.output


def val_events(adapter_dir: Path) -> list[dict]:
    lines = (adapter_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "val"]


def test_train_cli_logs_general_loss_and_plots_it(tiny_llama, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, rows in (("train", COMPLETIONS), ("valid", COMPLETIONS[:4])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "train", "--model", str(tiny_llama), "--data", str(data), "--adapter-path", str(out),
        "--iters", "4", "--steps-per-eval", "2", "--batch-size", "4", "--learning-rate",
        "1e-2", "--max-seq-length", str(MAX_SEQ), "--general-data"])
    assert result.exit_code == 0, result.output
    events = val_events(out)
    assert [e["step"] for e in events] == [0, 2, 4]
    assert all("general_loss" in e and "val_loss" in e for e in events)
    base = load_base(str(tiny_llama))
    want = reference_loss(base.model, builtin_examples(base.tokenizer))
    assert events[0]["general_loss"] == pytest.approx(want, rel=1e-5)  # LoRA starts at the base
    assert events[-1]["general_loss"] != pytest.approx(want, rel=1e-4)
    plot = (out / "loss.svg").read_text()
    assert plot.count("<polyline") == 3 and "general-text loss" in plot


@pytest.mark.parametrize("mode", ["sft-without-valid", "dpo"])
def test_training_logs_general_loss_at_every_evaluation(tiny_llama, tmp_path, mode):
    """Without a validation split the probe still runs; a DPO run measures it through SFT."""
    records = {"train": PAIRS, "valid": PAIRS[:4]} if mode == "dpo" else COMPLETIONS
    events = []
    run = Finetune(model=str(tiny_llama), data=records, adapter_path=str(tmp_path / "out"),
                   train_mode="dpo" if mode == "dpo" else "sft", fine_tune_type="dora",
                   valid_fraction=0.0, iters=2, steps_per_eval=1, batch_size=4,
                   max_seq_length=MAX_SEQ, general_data="builtin")
    assert run.train(callback=events.append).finished
    vals = [e for e in events if e["event"] == "val"]
    assert [e["step"] for e in vals] == [0, 1, 2]
    assert all("general_loss" in e for e in vals)
    assert all(("val_loss" in e) == (mode == "dpo") for e in vals)
    base = load_base(str(tiny_llama))
    want = reference_loss(base.model, builtin_examples(base.tokenizer))
    assert vals[0]["general_loss"] == pytest.approx(want, rel=1e-5)  # DoRA starts at the base
