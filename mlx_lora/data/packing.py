"""Pack whole records side by side into rows of a fixed width, instead of padding each one.

A packed micro-batch is `rows_per_batch` rows of `width` positions holding about
`batch_size` records, so --batch-size keeps its meaning (records per update, on average)
and every micro-batch has the same (rows, width) shape. Segment ids tell the attention mask
which positions belong together (mlx_lora/train/packed_mask.py).
"""

import numpy as np

from mlx_lora.data.batching import Batch, round_up
from mlx_lora.data.tokenize import Example

PACK_WINDOW = 1024  # records packed together: bigger packs tighter, smaller keeps more randomness


def positions(examples: list[Example]) -> list[int]:
    """Input positions of each example: all its tokens but the last."""
    return [len(e.ids) - 1 for e in examples]


def packed_width(lengths: list[int], max_seq_length: int) -> int:
    """Row width: the longest record, or max_seq_length, rounded up to a multiple of 32."""
    return min(round_up(max(lengths)), round_up(max_seq_length))


def rows_per_batch(lengths: list[int], batch_size: int, width: int) -> int:
    """Rows per micro-batch so that it holds batch_size records of the mean length."""
    return max(1, round(batch_size * float(np.mean(lengths)) / width))


def first_fit(indices: np.ndarray, lengths: np.ndarray, width: int) -> list[list[int]]:
    """Rows of example indices: longest first, each into the first row it fits (FFD)."""
    indices = indices[np.argsort(-lengths[indices], kind="stable")]
    free = np.empty(len(indices), np.int64)  # room left per open row
    rows: list[list[int]] = []
    for i in indices:
        fits = np.flatnonzero(free[: len(rows)] >= lengths[i])
        if len(fits):
            rows[fits[0]].append(int(i))
            free[fits[0]] -= lengths[i]
        else:
            free[len(rows)] = width - lengths[i]
            rows.append([int(i)])
    return rows


def packed_plan(lengths: list[int], batch_size: int, width: int, seed: int,
                epoch: int) -> list[list[list[int]]]:
    """The epoch's micro-batches as rows of example indices: shuffled, packed, shuffled."""
    rng = np.random.default_rng([seed % 2**64, epoch])
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    rows = []
    for start in range(0, len(order), PACK_WINDOW):
        rows += first_fit(order[start : start + PACK_WINDOW], lengths, width)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    per_batch = rows_per_batch(lengths.tolist(), batch_size, width)
    return [rows[i : i + per_batch] for i in range(0, len(rows), per_batch)]


def make_packed_batch(examples: list[Example], rows: list[list[int]], width: int) -> Batch:
    """Rows of whole records, each record a segment of its own, padding at the row ends."""
    shape = (len(rows), width)
    inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    loss_mask, segments = np.zeros(shape, np.float32), np.zeros(shape, np.int32)
    lengths = np.zeros(len(rows), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for segment, index in enumerate(row, start=1):
            ids, mask = examples[index].ids, examples[index].mask
            n = len(ids) - 1
            inputs[r, at : at + n] = ids[:-1]
            targets[r, at : at + n] = ids[1:]
            loss_mask[r, at : at + n] = mask[1:]
            segments[r, at : at + n] = segment
            at += n
        lengths[r] = at
    return Batch(inputs, targets, loss_mask, int(loss_mask.sum()), lengths, segments)
