"""Training invariants: token-weighted accumulation, loss goes down on a real model."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_lora.adapters.inject import inject, make_spec
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.config import TrainConfig
from mlx_lora.data.batching import make_batch
from mlx_lora.data.tokenize import Example
from mlx_lora.model.head import split_model
from mlx_lora.model.load import load_base
from mlx_lora.objectives.sft import SFT
from mlx_lora.train.loop import accumulate_and_update
from mlx_lora.train.optim import build_optimizer
from mlx_lora.train.run import train
from mlx_lora.train.step import make_grad_step, make_update


def examples_of_varied_length(n: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length = int(rng.integers(8, 60))
        ids = rng.integers(3, 500, length).astype(np.int32)
        mask = rng.random(length) < 0.7  # uneven target counts make mean-of-means differ
        examples.append(Example(ids, mask))
    return examples


def one_update(model_dir, micro_batches: list[list[int]], examples, quantize=0):
    loaded = load_base(str(model_dir), quantize=quantize)
    mx.random.seed(0)
    spec = make_spec(loaded.model, "lora", "all-linear", -1, Hyper(4, 8.0))
    inject(loaded.model, spec)
    config = TrainConfig(learning_rate=1e-2)
    optimizer = build_optimizer(config, total_steps=1)
    optimizer.init(loaded.model.trainable_parameters())
    loss = SFT.make_loss(loaded.model, split_model(loaded.model)[0], with_grad=True)
    grad_step = make_grad_step(loaded.model, loss)
    update = make_update(loaded.model, optimizer, max_grad_norm=0.0)
    batches = [make_batch(examples, indices, 512) for indices in micro_batches]
    loss, n_tokens, _ = accumulate_and_update(grad_step, update, SFT, batches, step=1)
    return loss, n_tokens, dict(tree_flatten(loaded.model.trainable_parameters()))


@pytest.mark.parametrize("quantize", [0, 4], ids=["float", "4-bit"])
def test_accumulation_equals_one_big_batch(tiny_llama, quantize):
    examples = examples_of_varied_length(8)
    big = one_update(tiny_llama, [list(range(8))], examples, quantize)
    small = one_update(tiny_llama, [[0, 1], [2, 3], [4, 5], [6, 7]], examples, quantize)
    assert big[1] == small[1]
    assert big[0] == pytest.approx(small[0], rel=1e-5)
    for name, value in big[2].items():
        np.testing.assert_allclose(np.array(small[2][name]), np.array(value), atol=2e-6,
                                   err_msg=name)
    # the update did move the adapters (lora_b starts at zero)
    assert any(np.abs(np.array(v)).max() > 0 for k, v in big[2].items() if k.endswith("lora_b"))


@pytest.mark.slow
def test_loss_goes_down_on_stories260k_wikisql(stories260k, shared_data, tmp_path):
    config = TrainConfig(model=str(stories260k), data=str(shared_data / "mlx-examples-wikisql"),
                         adapter_path=str(tmp_path / "run"), iters=40, batch_size=8,
                         learning_rate=1e-3, steps_per_eval=20, val_batches=5, save_every=40,
                         max_seq_length=512)
    train(config)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in lines if r["event"] == "val"]
    train_losses = [r["loss"] for r in lines if r["event"] == "train"]
    assert len(val) == 3 and val[-1] < val[0] - 0.5
    assert train_losses[-1] < train_losses[0]
    assert lines[-1]["event"] == "done" and lines[-1]["step"] == 40
