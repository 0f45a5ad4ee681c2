"""The compiled training step compiles once per distinct batch shape, and there are few."""

import mlx.core as mx
import numpy as np
import pytest
from test_loss import adapted

from mlx_lora.config import TrainConfig
from mlx_lora.data.batching import POSITION_MULTIPLE
from mlx_lora.data.stream import training_batches
from mlx_lora.data.tokenize import Example
from mlx_lora.model.head import split_model
from mlx_lora.objectives.sft import batch_arrays, make_loss
from mlx_lora.train.step import make_grad_step


def chat_like(n: int, seed: int = 0) -> list[Example]:
    """Records of 8-120 tokens whose prompt (a random 30-80%) carries no loss."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(8, 121))
        prompt = int(length * rng.uniform(0.3, 0.8))
        out.append(Example(rng.integers(0, 512, length).astype(np.int32),
                           np.arange(length) >= prompt))
    return out


def shape_key(arrays) -> tuple:
    return tuple(None if a is None else a.shape for a in arrays)


@pytest.mark.parametrize("pack", [True, False])
def test_compiles_once_per_shape_and_few_times(tiny_llama, pack):
    model = adapted(tiny_llama)
    traces = []
    loss = make_loss(model, split_model(model)[0], with_grad=True)
    grad_step = make_grad_step(model, loss, on_trace=lambda: traces.append(1))
    config = TrainConfig(batch_size=4, max_seq_length=128, pack=pack)
    records = chat_like(120)
    batches = training_batches(records, config, pack)
    shapes = set()
    for _ in range(60):  # two epochs
        _, _, batch = next(batches)
        arrays = batch_arrays(batch)
        shapes.add(shape_key(arrays))
        mx.eval(grad_step(*arrays, mx.array(1.0)))
    assert len(traces) == len(shapes)  # a compile per new shape, never per step
    if pack:
        assert all(s[1] is not None for s in shapes)  # these records do get packed
        rows, width = next(iter(shapes))[0]
        # (rows, width) is fixed (but for an epoch's last partial batch); only the count of
        # loss positions varies, in steps of POSITION_MULTIPLE.
        assert len({s[0] for s in shapes}) <= 2
        assert len(shapes) <= 2 * (rows * width // POSITION_MULTIPLE + 1)
    print(f"pack={pack}: {len(traces)} compilations over 60 steps, shapes {sorted(shapes)}")
    assert len(traces) <= (4 if pack else 12)
