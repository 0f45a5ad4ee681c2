"""Packed rows: whole records, every record once, and the same loss and gradient as unpacked."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import gpt2
from test_loss import adapted, assert_same, examples, fast_and_grads, plain_and_grads

from mlx_lora.data.batching import make_batch
from mlx_lora.data.packing import (
    decide_packing,
    first_fit,
    make_packed_batch,
    packed_plan,
    packed_width,
    padding_does_as_well,
    positions,
)
from mlx_lora.data.tokenize import Example
from mlx_lora.model.load import load_base
from mlx_lora.model.packed_mask import packing_problem
from mlx_lora.model.recompute import checkpoint_blocks


@pytest.fixture(params=["tiny_llama", "tiny_qwen2"])
def model_dir(request):
    return request.getfixturevalue(request.param)


def test_plan_packs_every_record_once_within_the_width():
    lengths = np.random.default_rng(0).integers(1, 300, 500).tolist()
    width = packed_width(lengths, 512)
    assert width == 320  # the longest record, rounded up to 32, within max_seq_length
    plan = packed_plan(lengths, batch_size=8, width=width, seed=3, epoch=1)
    assert sorted(i for batch in plan for row in batch for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= width for batch in plan for row in batch)
    assert len(plan) == 63  # ceil(500 / 8): as many micro-batches as padding makes
    assert len({len(batch) for batch in plan}) == 2  # rows dealt out evenly: two shapes
    used = sum(lengths) / (width * sum(len(b) for b in plan))
    assert used > 0.93  # first-fit-decreasing leaves little padding
    assert plan == packed_plan(lengths, 8, width, seed=3, epoch=1)
    assert plan != packed_plan(lengths, 8, width, seed=3, epoch=2)


def test_packing_is_skipped_where_padding_fills_as_well():
    # Similar lengths: length-bucketed batches are nearly full, packed rows no fuller.
    alike = np.random.default_rng(0).integers(180, 200, 400).tolist()
    why = padding_does_as_well(alike, 8, 512, seed=0)
    assert why is not None and "would fill" in why
    # Mostly short records and a few long ones: packing fills rows padding leaves empty.
    mixed = np.random.default_rng(0).choice([20, 40, 500], 400, p=[0.45, 0.45, 0.1]).tolist()
    assert padding_does_as_well(mixed, 8, 512, seed=0) is None


def test_first_fit_puts_the_longest_first():
    lengths = np.array([5, 9, 30, 2, 17, 8])
    assert first_fit(np.array([1, 4, 0]), lengths, 32) == [[4, 1, 0]]
    assert first_fit(np.array([2, 4, 1]), lengths, 32) == [[2], [4, 1]]


def test_packed_batch_lays_records_side_by_side():
    records = [Example(np.array([1, 2, 3], np.int32), np.array([0, 1, 1], bool)),
               Example(np.array([4, 5, 6, 7], np.int32), np.array([0, 0, 1, 1], bool))]
    batch = make_packed_batch(records, [[0, 1]], width=8)
    assert batch.inputs.tolist() == [[1, 2, 4, 5, 6, 0, 0, 0]]
    assert batch.targets.tolist() == [[2, 3, 5, 6, 7, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[1, 1, 0, 1, 1, 0, 0, 0]]
    assert batch.segments.tolist() == [[1, 1, 2, 2, 2, 0, 0, 0]]
    assert batch.lengths.tolist() == [5] and batch.n_target_tokens == 4


def test_rope_models_pack_exactly(model_dir):
    assert packing_problem(load_base(str(model_dir)).model) is None


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_packed_loss_and_grads_equal_unpacked(model_dir, grad_checkpoint):
    model = adapted(model_dir)
    if grad_checkpoint:
        checkpoint_blocks(list(model.layers))
    records = examples(512)
    width = packed_width(positions(records), 64)
    rows = first_fit(np.arange(len(records)), np.array(positions(records)), width)
    assert len(rows) < len(records)  # some records do share a row
    packed = make_packed_batch(records, rows, width)
    unpacked = make_batch(records, list(range(len(records))), 64)
    assert_same(plain_and_grads(model, unpacked), fast_and_grads(model, packed))


def tiny_gpt2() -> gpt2.Model:
    """GPT-2 adds learned absolute position embeddings: packing cannot be exact."""
    args = gpt2.ModelArgs(model_type="gpt2", n_ctx=64, n_embd=32, n_head=2, n_layer=1,
                          n_positions=64, layer_norm_epsilon=1e-5, vocab_size=64)
    model = gpt2.Model(args)
    mx.eval(model.parameters())
    return model


def test_absolute_positions_turn_packing_off():
    model = tiny_gpt2()
    assert "absolute positions" in packing_problem(model)
    lengths = [40, 7, 9, 12] * 8  # short records that padding would waste room on
    pack, line = decide_packing(True, packing_problem(model), lengths, 4, 64, 0)
    assert pack is False and "packing is off" in line and "absolute positions" in line
    assert decide_packing(True, None, lengths, 4, 64, 0)[0] is True  # exact: it pays here
    assert decide_packing(False, None, lengths, 4, 64, 0) == (False, "packing is off (--no-pack)")
