"""The objective contract: what a batch is, its loss, and what an update is normalized by."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlx_lora.data.batching import padding_fraction

# (*arrays) -> (sum of the per-unit losses, sums of reported statistics); never divided here:
# the step divides by the units of the whole accumulated update.
LossFn = Callable[..., tuple[mx.array, dict[str, mx.array]]]


@dataclass(frozen=True)
class Objective:
    """One training objective, as plain functions; a new objective is one file and one line.

    examples(records, tokenizer, config, name) -> examples of one split
    train_batches(examples, config, pack, epoch, cursor, part=WHOLE) -> (epoch, cursor after,
        batch), forever: with part (data.stream.Part), a rank's share of every global batch
    eval_batches(examples, config, part=WHOLE) -> the batches one evaluation pass runs over
    arrays(batch) -> the loss's array arguments
    count(batch) -> the units the batch holds (target tokens, pairs): an update's divisor
    make_loss(model, split, with_grad) -> LossFn; split is the model's head split or None
    prepare(model, split, examples, config, train_batches) -> the examples with what the
        objective needs from the model as training starts (DPO: reference log-probabilities),
        for the first train_batches training batches, or (None) the evaluation batches of an
        evaluation split; None: nothing to prepare
    """

    name: str
    unit: str  # what count() counts, for messages: "tokens", "pairs"
    examples: Callable[..., list[Any]]
    train_batches: Callable[..., Iterator[tuple[int, int, Any]]]
    eval_batches: Callable[..., Iterator[Any]]
    arrays: Callable[[Any], tuple]
    count: Callable[[Any], int]
    make_loss: Callable[..., LossFn]
    prepare: Callable[..., list[Any]] | None = None
    padding: Callable[[Any], float] = padding_fraction  # of a batch's positions, for reports
    packable: bool = True  # whether examples may share a row (data.packing)
