"""Preference pairs as training data: tokenized halves, batches of 2B rows, the loss's arrays.

A batch of B pairs is one (2B, L) array, the chosen halves in rows 0..B-1 and the rejected in
rows B..2B-1, so both go through the model in one pass. Only the response tokens carry loss;
the prompt is context (tokenized alike in both halves, as both render the same messages).
"""

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import numpy as np

from mlx_lora.config import TrainConfig
from mlx_lora.console import status
from mlx_lora.data.batching import Batch, batch_plan, eval_plan, loss_positions, make_batch
from mlx_lora.data.records import Record, problems_error
from mlx_lora.data.stream import WHOLE, Part, share
from mlx_lora.data.template import check_chat_template
from mlx_lora.data.tokenize import Example, encode, to_example
from mlx_lora.errors import UserError


@dataclass(frozen=True)
class Pair:
    """One preference pair; reference: the starting model's log-probabilities of the chosen
    and rejected responses (summed over their tokens), once the run has computed them."""

    chosen: Example
    rejected: Example
    reference: tuple[float, float] | None = None


@dataclass(frozen=True)
class PairBatch:
    """B pairs as 2B padded rows, and the reference log-probabilities of each row."""

    rows: Batch
    reference: np.ndarray  # (2B,) float32; zeros before the reference pass
    n_pairs: int


def to_pairs(records: list[Record], tokenizer, config: TrainConfig, name: str) -> list[Pair]:
    """Tokenize a split's preference records; pairs with no response token left are skipped."""
    if bad := [r for r in records if r.kind != "preference"]:
        raise problems_error([
            f"{r.source}: a {r.kind} record, but --train-mode {config.train_mode} trains on "
            'preference pairs: {"prompt", "chosen", "rejected"} (strings or message lists) or '
            'ShareGPT {"conversations", "chosen", "rejected"}' for r in bad])
    check_chat_template([h for r in records for h in (r.chosen, r.rejected)], tokenizer, name)
    pairs, problems, n_truncated = [], [], 0
    for record in records:
        try:
            halves = [_example(h, tokenizer, config.max_seq_length)
                      for h in (record.chosen, record.rejected)]
        except UserError as e:
            problems.append(str(e))
            continue
        n_truncated += any(truncated for _, truncated in halves)
        if all(example is not None for example, _ in halves):
            pairs.append(Pair(halves[0][0], halves[1][0]))
    if problems:
        raise problems_error(problems)
    if n_truncated:
        status(f"warning: {n_truncated} of {len(records)} pairs in {name} were longer than "
               f"--max-seq-length {config.max_seq_length} and were truncated")
    if not pairs:
        raise UserError(f"{name}: no pair has a response token within --max-seq-length "
                        f"{config.max_seq_length}; raise it")
    if len(pairs) < len(records):
        status(f"warning: {len(records) - len(pairs)} pairs from {name} had no response token "
               "left after truncation and were skipped")
    return pairs


def _example(half: Record, tokenizer, max_seq_length: int) -> tuple[Example | None, bool]:
    ids, flags = encode(half, tokenizer, mask_prompt=True, max_tokens=max_seq_length)
    example = to_example(ids[:max_seq_length], flags[:max_seq_length])
    return example, len(ids) > max_seq_length


def pair_lengths(pairs: list[Pair]) -> list[int]:
    """A pair's length for batching: its longer half."""
    return [max(len(p.chosen.ids), len(p.rejected.ids)) - 1 for p in pairs]


def make_pair_batch(pairs: list[Pair], indices: list[int], max_seq_length: int) -> PairBatch:
    """The pairs at `indices` as 2B rows: chosen halves first, then rejected. A pair without
    a reference gets zeros (ORPO's, or the reference pass itself)."""
    chosen = [pairs[i] for i in indices]
    halves = [p.chosen for p in chosen] + [p.rejected for p in chosen]
    rows = make_batch(halves, list(range(len(halves))), max_seq_length)
    references = [p.reference or (0.0, 0.0) for p in chosen]
    reference = np.array([r[0] for r in references] + [r[1] for r in references], np.float32)
    return PairBatch(rows, reference, len(chosen))


def with_reference(pairs: list[Pair], indices: list[int], logps: np.ndarray) -> list[Pair]:
    """The pairs, those at `indices` with their reference log-probabilities (logps (n, 2),
    in the order of indices)."""
    found = dict(zip(indices, logps.tolist(), strict=True))
    return [dataclasses.replace(p, reference=tuple(found[i])) if i in found else p
            for i, p in enumerate(pairs)]


def read_by_training(pairs: list[Pair], config: TrainConfig, n_batches: int) -> list[int]:
    """The pairs the first n_batches training batches hold (pair_batches from the start)."""
    lengths, used, epoch = pair_lengths(pairs), set(), 0
    while n_batches > 0 and len(used) < len(pairs):
        plan = batch_plan(lengths, config.batch_size, config.seed, epoch)
        for indices in plan[:n_batches]:
            used.update(indices)
        n_batches, epoch = n_batches - len(plan), epoch + 1
    return sorted(used)


def read_by_evaluation(pairs: list[Pair], config: TrainConfig) -> list[int]:
    """The pairs eval_pair_batches reads, in its order."""
    return [i for batch in _eval_plan(pairs, config) for i in batch]


def _eval_plan(pairs: list[Pair], config: TrainConfig) -> list[list[int]]:
    return eval_plan(pair_lengths(pairs), config.batch_size, config.val_batches)


def pair_batches(pairs: list[Pair], config: TrainConfig, pack: bool, epoch: int = 0,
                 cursor: int = 0, part: Part = WHOLE) -> Iterator[tuple[int, int, PairBatch]]:
    """(epoch, cursor after this batch, batch) forever; pairs are never packed."""
    lengths = pair_lengths(pairs)
    make = partial(make_pair_batch, pairs, max_seq_length=config.max_seq_length)
    while True:
        plan = batch_plan(lengths, config.batch_size, config.seed, epoch)
        for index in range(cursor, len(plan)):
            yield epoch, index + 1, share(make, plan[index], part)
        epoch, cursor = epoch + 1, 0


def eval_pair_batches(pairs: list[Pair], config: TrainConfig,
                      part: Part = WHOLE) -> Iterator[PairBatch]:
    """The first val_batches batches (-1: all), sorted by length to pad little."""
    make = partial(make_pair_batch, pairs, max_seq_length=config.max_seq_length)
    for indices in _eval_plan(pairs, config):
        yield share(make, indices, part)



def pair_arrays(batch: PairBatch) -> tuple:
    """(inputs, positions, targets, weights, rows, n_tokens, reference) for the loss.

    rows (P,): the row each loss position belongs to (0 for padding, whose weight is 0);
    n_tokens (2B,): response tokens per row.
    """
    rows = batch.rows
    positions, weights = loss_positions(rows.loss_mask)
    width = rows.inputs.shape[1]
    return (mx.array(rows.inputs), mx.array(positions),
            mx.array(rows.targets.reshape(-1)[positions]), mx.array(weights),
            mx.array(positions // width), mx.array(rows.loss_mask.sum(axis=1)),
            mx.array(batch.reference))
