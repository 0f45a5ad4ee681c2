"""The batches a run reads: an endless, resumable training stream, and one evaluation pass.

With several processes training together (train/distributed.py), every process plans the
same global batches and reads its own share of each: `part` says which.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mlx_lora.config import TrainConfig
from mlx_lora.data.batching import Batch, batch_plan, eval_plan, make_batch
from mlx_lora.data.packing import make_packed_batch, packed_plan, packed_width, positions
from mlx_lora.data.tokenize import Example


@dataclass(frozen=True)
class Part:
    """Which share of every global batch a process reads: rank `rank` of `size`."""

    rank: int = 0
    size: int = 1


WHOLE = Part()


@dataclass(frozen=True)
class Standin:
    """A rank's batch when its share of a global batch is empty (fewer records or rows than
    ranks): the batch's first item, computed only so that every rank takes part in the step,
    and counted as nothing."""

    batch: Any


def share(make: Callable[[list], Any], items: list, part: Part) -> Any:
    """make(this rank's items of a global batch): every size-th item from its rank on, so
    length-sorted batches give each rank a like mix; a Standin when there are none."""
    mine = items[part.rank::part.size]
    return make(mine) if mine else Standin(make(items[:1]))


def training_batches(examples: list[Example], config: TrainConfig, pack: bool, epoch: int = 0,
                     cursor: int = 0, part: Part = WHOLE) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, cursor after this batch, batch) forever, starting at `epoch`, `cursor`.

    `pack` is the run's decision (data.packing.decide_packing), taken as it is.
    """
    sizes = positions(examples)
    width = packed_width(sizes, config.max_seq_length)
    make = ((lambda rows: make_packed_batch(examples, rows, width)) if pack
            else (lambda ids: make_batch(examples, ids, config.max_seq_length)))
    while True:
        if pack:
            plan = packed_plan(sizes, config.batch_size, width, config.seed, epoch)
        else:
            plan = batch_plan(sizes, config.batch_size, config.seed, epoch)
        for index in range(cursor, len(plan)):
            yield epoch, index + 1, share(make, plan[index], part)
        epoch, cursor = epoch + 1, 0


def eval_batches(examples: list[Example], config: TrainConfig,
                 part: Part = WHOLE) -> Iterator[Batch]:
    """The first val_batches batches (-1: all) of a split, sorted by length to pad little."""
    for indices in eval_plan(positions(examples), config.batch_size, config.val_batches):
        yield share(lambda ids: make_batch(examples, ids, config.max_seq_length), indices, part)
