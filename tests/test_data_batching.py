"""Batch plans and padded batches: shapes, shifts, coverage and determinism."""

import numpy as np
import pytest

from mlx_lora.data.batching import batch_plan, make_batch, padding_fraction
from mlx_lora.data.tokenize import Example


def example(length: int, first_target: int = 1) -> Example:
    """ids 1..length; targets from position first_target on."""
    ids = np.arange(1, length + 1, dtype=np.int32)
    return Example(ids, np.arange(length) >= first_target)


def all_indices(plan) -> list[int]:
    return sorted(i for batch in plan for i in batch)


@pytest.mark.parametrize("n,batch_size", [(1000, 8), (37, 4), (3, 8), (8, 8)])
def test_plan_covers_every_index_once(n, batch_size):
    lengths = np.random.default_rng(0).integers(2, 500, n).tolist()
    plan = batch_plan(lengths, batch_size, seed=1, epoch=0)
    assert all_indices(plan) == list(range(n))
    sizes = sorted(len(b) for b in plan)
    assert sizes[1:] == [batch_size] * (len(plan) - 1)  # at most one partial batch, kept
    assert sizes[0] == n - batch_size * (len(plan) - 1)


def test_plan_is_deterministic_by_seed_and_epoch():
    lengths = list(range(2, 302))
    plan = batch_plan(lengths, 4, seed=3, epoch=1)
    assert plan == batch_plan(lengths, 4, seed=3, epoch=1)
    assert plan != batch_plan(lengths, 4, seed=4, epoch=1)
    assert plan != batch_plan(lengths, 4, seed=3, epoch=2)
    assert all(isinstance(i, int) for batch in plan for i in batch)


def test_plan_buckets_by_length():
    lengths = np.random.default_rng(0).integers(2, 2000, 800).tolist()
    plan = batch_plan(lengths, 8, seed=0, epoch=0)
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plan])
    assert spread < 100  # random batches of 8 would spread over ~1500


def test_make_batch_shifts_and_pads():
    examples = [example(40, first_target=10), example(5), example(70)]
    batch = make_batch(examples, [0, 1], max_seq_length=128)
    assert batch.inputs.shape == batch.targets.shape == batch.loss_mask.shape == (2, 64)
    assert (batch.inputs.dtype, batch.targets.dtype, batch.loss_mask.dtype) == (
        np.int32, np.int32, np.float32)
    np.testing.assert_array_equal(batch.inputs[0, :39], examples[0].ids[:-1])
    np.testing.assert_array_equal(batch.targets[0, :39], examples[0].ids[1:])
    np.testing.assert_array_equal(batch.loss_mask[0, :39], examples[0].mask[1:])
    assert not batch.inputs[0, 39:].any() and not batch.loss_mask[0, 39:].any()
    np.testing.assert_array_equal(batch.targets[1, :4], [2, 3, 4, 5])
    assert not batch.targets[1, 4:].any()
    assert batch.n_target_tokens == (39 - 9) + 4 == int(batch.loss_mask.sum())
    assert padding_fraction(batch) == pytest.approx(1 - (39 + 4) / 128)


@pytest.mark.parametrize("longest,max_seq_length,width", [
    (2, 8, 32), (33, 64, 32), (34, 64, 64), (100, 100, 128), (70, 70, 96),
])
def test_width_is_a_multiple_of_32_within_max_seq_length(longest, max_seq_length, width):
    batch = make_batch([example(longest), example(2)], [0, 1], max_seq_length)
    assert batch.inputs.shape == (2, width)
