"""Group examples into length-bucketed, padded batches: (inputs, targets, loss mask)."""

from dataclasses import dataclass

import numpy as np

from mlx_lora.data.tokenize import Example

PAD_MULTIPLE = 32  # pad lengths to a multiple of this so the compiled step sees few shapes
# The loss-carrying positions of a batch are padded to a multiple of this: a new count is a
# new shape (a recompile), a bigger multiple more head work on padding.
POSITION_MULTIPLE = 128
BUCKET_WINDOW = 100  # sort by length within windows of this many batches


@dataclass(frozen=True)
class Batch:
    """One padded micro-batch; padding has id 0 and loss_mask 0."""

    inputs: np.ndarray  # (B, L) int32, ids[:-1]
    targets: np.ndarray  # (B, L) int32, ids[1:]
    loss_mask: np.ndarray  # (B, L) float32, 1.0 where targets[b, t] carries loss
    n_target_tokens: int
    lengths: np.ndarray | None = None  # (B,) int32, real (unpadded) positions per row
    segments: np.ndarray | None = None  # (B, L) int32 for packed rows: 1, 2, ... per record, 0 pad


def round_up(n: int, multiple: int = PAD_MULTIPLE) -> int:
    """n rounded up to a multiple."""
    return -(-n // multiple) * multiple


def batch_plan(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches as example indices: shuffled, bucketed by length, in shuffled order."""
    rng = np.random.default_rng([seed % 2**64, epoch])
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    window = BUCKET_WINDOW * batch_size  # a multiple of batch_size: only the last batch is partial
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        # Similar lengths in one batch waste less padding; the window keeps some randomness.
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_plan(lengths: list[int], batch_size: int, val_batches: int) -> list[list[int]]:
    """One evaluation pass as example indices: sorted by length to pad little, the first
    val_batches batches (-1: all)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    plan = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return plan[:val_batches] if val_batches > 0 else plan


def make_batch(examples: list[Example], indices: list[int], max_seq_length: int) -> Batch:
    """Pad the chosen examples to the batch's longest, rounded up to a multiple of 32."""
    chosen = [examples[i] for i in indices]
    cap = round_up(max_seq_length)
    longest = max(len(e.ids) - 1 for e in chosen)
    # Few distinct L values means few recompilations of the training step.
    width = min(round_up(max(longest, 1)), cap)
    inputs = np.zeros((len(chosen), width), np.int32)
    targets = np.zeros((len(chosen), width), np.int32)
    loss_mask = np.zeros((len(chosen), width), np.float32)
    lengths = np.zeros(len(chosen), np.int32)
    for row, example in enumerate(chosen):
        n = min(len(example.ids) - 1, width)
        inputs[row, :n] = example.ids[:n]
        targets[row, :n] = example.ids[1 : n + 1]
        loss_mask[row, :n] = example.mask[1 : n + 1]
        lengths[row] = n
    return Batch(inputs, targets, loss_mask, int(loss_mask.sum()), lengths)


def padding_fraction(batch: Batch) -> float:
    """Fraction of the (B, L) positions that are padding."""
    if batch.lengths is None:  # a batch built elsewhere: positions without loss count as padding
        return 1.0 - float(batch.loss_mask.mean())
    return 1.0 - float(batch.lengths.sum()) / batch.inputs.size


def loss_positions(loss_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the positions that carry loss, and their weights, padded to a multiple.

    Padding entries point at position 0 with weight 0, so they add nothing to loss or grads.
    """
    flat = loss_mask.reshape(-1)
    chosen = np.flatnonzero(flat)
    size = min(round_up(max(len(chosen), 1), POSITION_MULTIPLE), flat.size)
    positions = np.zeros(size, np.int32)
    weights = np.zeros(size, np.float32)
    positions[: len(chosen)] = chosen
    weights[: len(chosen)] = flat[chosen]
    return positions, weights
