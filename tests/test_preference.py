"""DPO and ORPO: step-0 value, loss and gradient against a full-logits reference, real updates,
accumulation, resume, metrics, and mlx-lm-lora's names."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_resume_equals_uninterrupted
from mlx.utils import tree_flatten, tree_map_with_path

from mlx_lora import Finetune
from mlx_lora.adapters.inject import inject, make_spec
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.cli import cli
from mlx_lora.config import TrainConfig
from mlx_lora.config_file import read_config_file
from mlx_lora.data.records import records_from_objects
from mlx_lora.model.head import split_model
from mlx_lora.model.load import load_base
from mlx_lora.objectives.pairs import make_pair_batch, pair_arrays, to_pairs, with_reference
from mlx_lora.objectives.preference import preference_objective
from mlx_lora.train.loop import accumulate_and_update
from mlx_lora.train.step import make_grad_step

PAIRS = [{"prompt": f"Add {a} and {b}.", "chosen": f"{a + b}",
          "rejected": f"{a + b + 1 + (a * b) % 3} maybe"} for a in range(6) for b in range(4)]
SETTINGS = dict(train_mode="dpo", iters=4, batch_size=4, learning_rate=5e-3, steps_per_report=1,
                steps_per_eval=2, save_every=2, max_seq_length=64)


def adapted_model(model_dir, seed=0):
    """The tiny model with LoRA whose lora_b is random, so the adapter changes the output."""
    loaded = load_base(str(model_dir))
    mx.random.seed(seed)
    inject(loaded.model, make_spec(loaded.model, "lora", "all-linear", -1, Hyper(4, 8.0)))
    loaded.model.update(tree_map_with_path(
        lambda path, v: 0.05 * mx.random.normal(v.shape) if path.endswith("lora_b") else v,
        loaded.model.trainable_parameters()))
    return loaded


def full_logits_logps(model, batch) -> mx.array:
    """Each row's response log-probability from the full (R, L, V) logits: the plain way."""
    logits = model(mx.array(batch.rows.inputs)).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp, mx.array(batch.rows.targets)[..., None], axis=-1)[..., 0]
    return (picked * mx.array(batch.rows.loss_mask)).sum(axis=1)


def plain_loss(kind: str, beta: float, logps, reference, n_tokens):
    """DPO (three losses) and ORPO written out from their papers, per pair, averaged."""
    half = logps.shape[0] // 2
    if kind == "orpo":
        mean = logps / n_tokens
        pc, pr = mean[:half], mean[half:]
        odds = (pc - mx.log(1 - mx.exp(pc))) - (pr - mx.log(1 - mx.exp(pr)))
        return (-pc - beta * mx.log(mx.sigmoid(odds))).mean()
    if kind == "ipo":
        logps, reference = logps / n_tokens, reference / n_tokens
    h = (logps[:half] - reference[:half]) - (logps[half:] - reference[half:])
    if kind == "sigmoid":
        return (-mx.log(mx.sigmoid(beta * h))).mean()
    if kind == "hinge":
        return mx.maximum(0, 1 - beta * h).mean()
    return ((h - 1 / (2 * beta)) ** 2).mean()


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge", "orpo"])
def test_loss_and_gradient_equal_the_full_logits_reference(kind, tiny_llama):
    loaded = adapted_model(tiny_llama)
    model, beta = loaded.model, 0.3
    config = TrainConfig(train_mode="orpo" if kind == "orpo" else "dpo", beta=beta,
                         dpo_loss_type="sigmoid" if kind == "orpo" else kind, max_seq_length=64)
    objective = preference_objective(config)
    pairs = to_pairs(records_from_objects(PAIRS[:6], "train"), loaded.tokenizer, config, "t")
    # References near the policy's own, so that every loss (hinge's too) is active.
    start = np.array(full_logits_logps(model, make_pair_batch(pairs, list(range(6)), 64)))
    noise = np.random.default_rng(0).normal(0, 1, start.shape)
    pairs = with_reference(pairs, list(range(6)),
                           (start + noise).reshape(2, -1).T.astype(np.float32))
    batch = make_pair_batch(pairs, list(range(6)), 64)
    arrays = pair_arrays(batch)
    split = split_model(model)[0]
    loss = objective.make_loss(model, split, with_grad=True)

    def ours():
        return loss(*arrays)[0] / batch.n_pairs

    def reference():
        return plain_loss(kind, beta, full_logits_logps(model, batch), arrays[-1], arrays[-2])

    value, grads = nn.value_and_grad(model, ours)()
    want_value, want_grads = nn.value_and_grad(model, reference)()
    assert abs(value.item() - want_value.item()) <= 1e-5 * max(1.0, abs(want_value.item()))
    want = dict(tree_flatten(want_grads))
    for name, grad in tree_flatten(grads):
        scale = float(mx.abs(want[name]).max())
        np.testing.assert_allclose(np.array(grad), np.array(want[name]), rtol=1e-4,
                                   atol=1e-4 * max(scale, 1e-6), err_msg=name)
    assert any(float(mx.abs(g).max()) > 0 for _, g in tree_flatten(grads))


def test_micro_batches_accumulate_to_the_larger_batch(tiny_llama):
    loaded = adapted_model(tiny_llama)
    config = TrainConfig(train_mode="dpo", max_seq_length=64)
    objective = preference_objective(config)
    pairs = to_pairs(records_from_objects(PAIRS[:4], "train"), loaded.tokenizer, config, "t")
    pairs = with_reference(pairs, list(range(4)), np.full((4, 2), -20.0, np.float32))
    grad_step = make_grad_step(loaded.model, objective.make_loss(
        loaded.model, split_model(loaded.model)[0], with_grad=True))
    results = []
    for plan in ([[0, 1, 2, 3]], [[0, 3], [1, 2]]):
        captured = {}

        def update(grads, captured=captured):
            captured.update(tree_flatten(grads))
            return mx.array(1.0)

        batches = [make_pair_batch(pairs, indices, 64) for indices in plan]
        loss, units, stats = accumulate_and_update(grad_step, update, objective, batches, 1)
        results.append((loss, units, stats, captured))
    (loss1, units1, stats1, grads1), (loss2, units2, stats2, grads2) = results
    assert units1 == units2 == 4
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    assert stats1 == pytest.approx(stats2, rel=1e-4, abs=1e-6)
    for name, grad in grads1.items():
        np.testing.assert_allclose(np.array(grads2[name]), np.array(grad), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method,quantize", [("lora", 0), ("lora", 4), ("dora", 0), ("dora", 4)])
def test_dpo_starts_at_log_2_and_its_first_step_moves_the_adapter(method, quantize, tiny_llama,
                                                                   tmp_path):
    events = []
    run = Finetune(model=str(tiny_llama), data={"train": PAIRS[:16], "valid": PAIRS[16:]},
                   adapter_path=str(tmp_path / "out"), quantize=quantize,
                   fine_tune_type=method, **{**SETTINGS, "iters": 1})
    assert run.train(callback=events.append).finished
    val0 = next(e for e in events if e["event"] == "val" and e["step"] == 0)
    assert val0["val_loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert val0["val_reward_accuracy"] == 0.0 and val0["val_reward_margin"] == 0.0
    train1 = next(e for e in events if e["event"] == "train")
    assert train1["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward",
            "chosen_logp", "rejected_logp", "pairs_per_sec", "trained_pairs"} <= set(train1)
    assert train1["trained_pairs"] == 4
    lora_b = [v for k, v in mx.load(str(tmp_path / "out" / "adapters.safetensors")).items()
              if k.endswith("lora_b")]
    assert lora_b and all(bool(mx.all(mx.isfinite(v))) for v in lora_b)
    assert sum(float(mx.abs(v).max()) > 0 for v in lora_b) == len(lora_b)
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert any("val_reward_accuracy" in m for m in metrics if m["event"] == "val")


@pytest.mark.parametrize("mode", ["dpo", "orpo"])
def test_resume_equals_uninterrupted(mode, tiny_llama, tmp_path):
    assert_resume_equals_uninterrupted(tiny_llama, {"train": PAIRS[:16], "valid": PAIRS[16:]},
                                       tmp_path, 2, **{**SETTINGS, "train_mode": mode})


def test_mlx_lm_lora_names_work_as_flags_and_config_keys(tmp_path):
    train = cli.commands["train"]
    flags = {opt for param in train.params for opt in param.opts}
    assert {"--train-mode", "--beta", "--dpo-loss-type", "--dpo-cpo-loss-type", "--orpo-lambda",
            "--gradient-accumulation-steps", "--train-type"} <= flags
    config = tmp_path / "dpo.yaml"
    config.write_text("train_mode: dpo\ntrain_type: lora\ndpo_cpo_loss_type: hinge\nbeta: 0.2\n"
                      "gradient_accumulation_steps: 2\nload_in_4bits: true\ndelta: 50.0\n"
                      "reward_scaling: 1.0\nreference_model_path: null\n")
    assert read_config_file(str(config)) == {
        "train_mode": "dpo", "fine_tune_type": "lora", "dpo_loss_type": "hinge", "beta": 0.2,
        "grad_accumulation_steps": 2, "quantize": 4}
    config.write_text("train_mode: dpo\nreference_model_path: other/model\n")
    result = CliRunner().invoke(cli, ["train", "--config", str(config)])
    assert result.exit_code != 0 and "reference_model_path" in result.output
    assert "Traceback" not in result.output
    assert Finetune(model="m", data="d", dpo_cpo_loss_type="ipo").config.dpo_loss_type == "ipo"


def test_orpo_weight_defaults_to_beta():
    objective = preference_objective(TrainConfig(train_mode="orpo", beta=0.25))
    assert objective.make_loss.args[0].keywords == {"weight": 0.25}
    assert objective.prepare is None  # ORPO has no reference
    objective = preference_objective(TrainConfig(train_mode="orpo", beta=0.25, orpo_lambda=0.5))
    assert objective.make_loss.args[0].keywords == {"weight": 0.5}


def test_the_reference_covers_exactly_the_pairs_the_run_reads(tiny_llama):
    loaded = load_base(str(tiny_llama))
    config = TrainConfig(train_mode="dpo", batch_size=3, val_batches=2, max_seq_length=64)
    pairs = to_pairs(records_from_objects(PAIRS, "train"), loaded.tokenizer, config, "t")
    objective = preference_objective(config)
    split = split_model(loaded.model)[0]
    trained = objective.prepare(loaded.model, split, pairs, config, 3)
    batches = objective.train_batches(trained, config, False)
    read = [next(batches)[2] for _ in range(3)]
    assert all(bool(np.any(b.reference != 0)) for b in read)  # every row it reads has one
    assert sum(p.reference is not None for p in trained) == 9 < len(pairs)
    evaluated = objective.prepare(loaded.model, split, pairs, config, None)
    assert sum(p.reference is not None for p in evaluated) == 6
    assert all(np.all(b.reference != 0) for b in objective.eval_batches(evaluated, config))


def test_cli_trains_orpo_on_a_json_array_of_sharegpt_pairs(tiny_llama, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": p["prompt"]}],
             "chosen": {"from": "gpt", "value": p["chosen"]},
             "rejected": {"from": "gpt", "value": p["rejected"]}} for p in PAIRS[:8]]
    (tmp_path / "pairs.json").write_text(json.dumps(rows, indent=2))
    result = CliRunner().invoke(cli, [
        "train", "--model", str(tiny_llama), "--data", str(tmp_path / "pairs.json"),
        "--train-mode", "orpo", "--iters", "2", "--batch-size", "4",
        "--adapter-path", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "packing: off (orpo batches whole pairs)" in result.output
    done = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()][-1]
    assert done["event"] == "done" and done["trained_pairs"] == 8
