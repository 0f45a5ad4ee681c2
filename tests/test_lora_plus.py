"""LoRA+ (--lora-plus-ratio R): lora_b's updates are R times lora_a's rate; resume carries both."""


import mlx.core as mx
import numpy as np
import pytest
from helpers import addition_rows, assert_resume_equals_uninterrupted
from mlx.utils import tree_flatten
from test_train import examples_of_varied_length

from mlx_lora import Finetune, UserError
from mlx_lora.adapters.inject import inject, make_spec
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.config import TrainConfig
from mlx_lora.data.batching import make_batch
from mlx_lora.model.head import split_model
from mlx_lora.model.load import load_base
from mlx_lora.objectives.sft import SFT
from mlx_lora.train.loop import accumulate_and_update
from mlx_lora.train.optim import build_optimizer
from mlx_lora.train.step import make_grad_step, make_update

ROWS = addition_rows(6, 4)
SETTINGS = dict(iters=6, batch_size=4, learning_rate=2e-3, steps_per_report=1, save_every=3,
                lora_plus_ratio=8.0, mask_prompt=True)


def update_deltas(model_dir, ratio: float) -> dict[str, np.ndarray]:
    """How much one update moves each adapter tensor."""
    loaded = load_base(str(model_dir))
    mx.random.seed(0)
    inject(loaded.model, make_spec(loaded.model, "lora", "all-linear", -1, Hyper(4, 8.0)))
    before = {k: np.array(v) for k, v in tree_flatten(loaded.model.trainable_parameters())}
    optimizer = build_optimizer(TrainConfig(learning_rate=1e-3, lora_plus_ratio=ratio), 1)
    optimizer.init(loaded.model.trainable_parameters())
    loss = SFT.make_loss(loaded.model, split_model(loaded.model)[0], with_grad=True)
    batch = make_batch(examples_of_varied_length(4), [0, 1, 2, 3], 512)
    accumulate_and_update(make_grad_step(loaded.model, loss),
                          make_update(loaded.model, optimizer, 0.0), SFT, [batch], step=1)
    after = dict(tree_flatten(loaded.model.trainable_parameters()))
    return {k: np.array(after[k]) - v for k, v in before.items()}


def test_lora_b_moves_ratio_times_as_far(tiny_llama):
    plain, plus = update_deltas(tiny_llama, 0.0), update_deltas(tiny_llama, 4.0)
    for name in plain:
        scale = 4.0 if name.endswith("lora_b") else 1.0
        np.testing.assert_allclose(plus[name], scale * plain[name], rtol=1e-4, atol=1e-9,
                                   err_msg=name)
    assert any(np.abs(v).max() > 0 for k, v in plain.items() if k.endswith("lora_b"))


def test_resume_carries_both_groups(tiny_llama, tmp_path):
    assert_resume_equals_uninterrupted(tiny_llama, ROWS, tmp_path, 3, **SETTINGS)
    with pytest.raises(UserError, match="lora_plus_ratio 8.0 -> 2.0"):
        Finetune(model=str(tiny_llama), data=ROWS, adapter_path=str(tmp_path / "part"),
                 resume=True, **{**SETTINGS, "lora_plus_ratio": 2.0}).train()
