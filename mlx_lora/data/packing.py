"""Pack whole records side by side into rows of a fixed width, instead of padding each one.

An epoch's packed rows are dealt out evenly to as many micro-batches as padding would make
(ceil(records / batch_size)), so a micro-batch holds batch_size records on average and
--iters, --epochs and --batch-size mean what they mean without packing. Micro-batches have
one width and two row counts at most: few shapes to compile. Segment ids tell the attention
mask which positions belong together (mlx_lora/model/packed_mask.py).

Packing is there to cut padding. Where length-bucketed padding already fills rows about as
well, packing is skipped: attention runs over whole rows, so rows holding several records
cost more attention per token (on CPU, where attention is dense, up to 2x the step time).
"""

import numpy as np

from mlx_lora.data.batching import Batch, batch_plan, round_up
from mlx_lora.data.tokenize import Example

PACK_WINDOW = 1024  # records packed together: bigger packs tighter, smaller keeps more randomness
MIN_FILL_GAIN = 0.02  # pack only when rows are this much fuller (a fraction of all positions)


def positions(examples: list[Example]) -> list[int]:
    """Input positions of each example: all its tokens but the last."""
    return [len(e.ids) - 1 for e in examples]


def packed_width(lengths: list[int], max_seq_length: int) -> int:
    """Row width: the longest record, or max_seq_length, rounded up to a multiple of 32."""
    return min(round_up(max(lengths)), round_up(max_seq_length))


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
    n_batches = min(-(-len(lengths) // batch_size), len(rows))
    bounds = np.linspace(0, len(rows), n_batches + 1).round().astype(int)
    return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def decide_packing(requested: bool, model_problem: str | None, lengths: list[int],
                   batch_size: int, max_seq_length: int, seed: int) -> tuple[bool, str]:
    """Whether a run packs, and the one line that says so and why.

    Packing needs to be exact for the model (model_problem None) and to pay for the data.
    """
    if not requested:
        return False, "packing is off (--no-pack)"
    if model_problem is not None:
        return False, f"packing is off: {model_problem}"
    if why_not := padding_does_as_well(lengths, batch_size, max_seq_length, seed):
        return False, f"packing is off: {why_not}"
    width = packed_width(lengths, max_seq_length)
    return True, f"packing records into rows of {width} tokens"


def padding_does_as_well(lengths: list[int], batch_size: int, max_seq_length: int,
                          seed: int) -> str | None:
    """Why packing would not pay for this data (a sentence), or None when it would."""
    width = packed_width(lengths, max_seq_length)
    cap = round_up(max_seq_length)
    padded = sum(len(b) * min(round_up(max(lengths[i] for i in b)), cap)
                 for b in batch_plan(lengths, batch_size, seed, 0))
    packed = width * sum(len(b) for b in packed_plan(lengths, batch_size, width, seed, 0))
    padded_fill, packed_fill = sum(lengths) / padded, sum(lengths) / packed
    if packed_fill >= padded_fill + MIN_FILL_GAIN:
        return None
    return (f"length-bucketed batches already fill {padded_fill:.0%} of their positions and "
            f"rows of {width} would fill {packed_fill:.0%}, while costing more attention")


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
