"""The batches a run reads: an endless, resumable training stream, and one evaluation pass."""

from collections.abc import Iterator

from mlx_lora.config import TrainConfig
from mlx_lora.data.batching import Batch, batch_plan, eval_plan, make_batch
from mlx_lora.data.packing import make_packed_batch, packed_plan, packed_width, positions
from mlx_lora.data.tokenize import Example


def training_batches(examples: list[Example], config: TrainConfig, pack: bool, epoch: int = 0,
                     cursor: int = 0) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, cursor after this batch, batch) forever, starting at `epoch`, `cursor`.

    `pack` is the run's decision (data.packing.decide_packing), taken as it is.
    """
    sizes = positions(examples)
    width = packed_width(sizes, config.max_seq_length)
    while True:
        if pack:
            plan = packed_plan(sizes, config.batch_size, width, config.seed, epoch)
        else:
            plan = batch_plan(sizes, config.batch_size, config.seed, epoch)
        for index in range(cursor, len(plan)):
            batch = (make_packed_batch(examples, plan[index], width) if pack
                     else make_batch(examples, plan[index], config.max_seq_length))
            yield epoch, index + 1, batch
        epoch, cursor = epoch + 1, 0


def eval_batches(examples: list[Example], config: TrainConfig) -> Iterator[Batch]:
    """The first val_batches batches (-1: all) of a split, sorted by length to pad little."""
    for indices in eval_plan(positions(examples), config.batch_size, config.val_batches):
        yield make_batch(examples, indices, config.max_seq_length)
