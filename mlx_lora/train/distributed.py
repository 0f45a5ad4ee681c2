"""Training on several processes (mlx.launch): which rank this is, sums over the ranks, and
what rank 0 read handed to the others.

Data parallel: every rank holds the whole model and reads its share of each global batch
(data.stream.Part); gradients, losses and unit counts are summed over the ranks before an
update, so every rank makes the update one process makes on the global batch. Whatever ends
or changes the run (a non-finite loss, early stopping, Ctrl-C, a stop request) is decided on
values summed over the ranks, so they all decide alike. Rank 0 alone reads and writes the
output directory (train.report); what it read reaches the others through broadcast(). A
process started alone is rank 0 of 1, and then every function here gives its input back.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import partial
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_lora.data.stream import Part, Standin
from mlx_lora.errors import UserError
from mlx_lora.objectives.protocol import Objective

BUCKET_BYTES = 64 * 2**20  # arrays joined into one all_sum: fewer, larger messages go faster
ARRAY = "__array__"  # marks an array's place in a broadcast skeleton


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes training together."""

    rank: int = 0
    size: int = 1
    group: Any = None  # the mx.distributed.Group of all ranks; None for one process

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files and console lines: rank 0 does."""
        return self.rank == 0

    def sum(self, tree):
        """A tree of arrays summed over the ranks (the same tree on one process)."""
        if self.size == 1:
            return tree
        leaves = []
        tree_map(leaves.append, tree)
        summed = {}
        for bucket in _buckets(leaves):
            joined = mx.concatenate([leaves[i].reshape(-1) for i in bucket])
            total = mx.distributed.all_sum(joined, group=self.group)
            ends = np.cumsum([leaves[i].size for i in bucket])[:-1].tolist()
            for i, piece in zip(bucket, mx.split(total, ends), strict=True):
                summed[i] = piece.reshape(leaves[i].shape)
        order = iter(range(len(leaves)))
        return tree_map(lambda _: summed[next(order)], tree)

    def total(self, count: int) -> int:
        """A whole number summed over the ranks."""
        if self.size == 1:
            return count
        return mx.distributed.all_sum(mx.array(count, mx.int32), group=self.group).item()

    def any(self, flag: bool) -> bool:
        """Whether any rank says True: one rank's Ctrl-C or stop request stops them all."""
        return self.total(int(flag)) > 0

    def gather(self, x: mx.array) -> mx.array:
        """Every rank's x, concatenated in rank order along the first axis."""
        if self.size == 1:
            return x
        return mx.distributed.all_gather(x, group=self.group)


SINGLE = Ranks()


def join_ranks() -> Ranks:
    """The ranks MLX's launcher started (its environment: MLX_RANK and MLX_HOSTFILE, MPI's,
    JACCL's); a single process when there is none."""
    group = mx.distributed.init()
    return SINGLE if group.size() == 1 else Ranks(group.rank(), group.size(), group)


def ranks_line(config, ranks: Ranks) -> str | None:
    """One line saying how the processes share the work; None for one process."""
    if ranks.size == 1:
        return None
    return (f"data parallel over {ranks.size} processes: each reads its share of every batch "
            f"of {config.batch_size}, gradients summed over them before each update")


def check_same_inputs(ranks: Ranks, examples: dict, model) -> None:
    """Refuse to train when a rank tokenized other data, or loaded a model of other shapes,
    than rank 0 (each machine reads its own copy of --data and --model)."""
    if ranks.size == 1:
        return
    digest = hashlib.sha256()
    _feed(digest, examples)
    _feed(digest, [(name, value.shape, str(value.dtype))
                   for name, value in tree_flatten(model.parameters())])
    mine = mx.array(np.frombuffer(digest.digest()[:16], np.int32))
    every = np.array(ranks.gather(mine)).reshape(ranks.size, -1)
    if others := [rank for rank in range(ranks.size) if (every[rank] != every[0]).any()]:
        raise UserError(
            f"rank {', '.join(map(str, others))} read other data or another model than rank 0 "
            "(the same --data and --model, tokenized alike, must be on every machine); copy "
            "rank 0's to the others")


def _feed(digest, value) -> None:
    """Add a value (arrays, dataclasses, sequences, dicts, plain values) to a hash."""
    if isinstance(value, np.ndarray):
        digest.update(str((value.dtype, value.shape)).encode() + value.tobytes())
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            _feed(digest, getattr(value, field.name))
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, dict):
        _feed(digest, sorted(value.items(), key=lambda item: str(item[0])))
    else:
        digest.update(repr(value).encode())


def _buckets(leaves: list[mx.array]) -> list[list[int]]:
    """Indices of the leaves grouped by dtype, in runs of about BUCKET_BYTES."""
    buckets, sizes = {}, {}
    for i, leaf in enumerate(leaves):
        dtype = leaf.dtype
        if dtype not in buckets or sizes[dtype] >= BUCKET_BYTES:
            buckets.setdefault(dtype, []).append([])
            sizes[dtype] = 0
        buckets[dtype][-1].append(i)
        sizes[dtype] += leaf.nbytes
    return [bucket for runs in buckets.values() for bucket in runs]


def broadcast(ranks: Ranks, tree):
    """Rank 0's tree (dicts and lists of arrays and JSON values) on every rank; the others
    pass anything (None), as they have not read what rank 0 has."""
    if ranks.size == 1:
        return tree
    arrays: list[mx.array] = []
    skeleton = _skeleton(tree, arrays) if ranks.writes else None
    skeleton = json.loads(_broadcast_bytes(ranks, json.dumps(skeleton).encode()))
    if not ranks.writes:
        arrays = [mx.zeros(shape, getattr(mx, dtype)) for shape, dtype in _placeholders(skeleton)]
    received = ranks.sum(arrays)  # everyone's zeros plus rank 0's arrays
    mx.eval(received)
    return _fill(skeleton, iter(received))


def _broadcast_bytes(ranks: Ranks, data: bytes) -> bytes:
    size = ranks.total(len(data) if ranks.writes else 0)
    mine = np.frombuffer(data, np.uint8) if ranks.writes else np.zeros(size, np.uint8)
    return bytes(np.array(ranks.sum(mx.array(mine))))


def _skeleton(tree, arrays: list):
    if isinstance(tree, dict):
        return {key: _skeleton(value, arrays) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_skeleton(value, arrays) for value in tree]
    if isinstance(tree, mx.array):
        arrays.append(tree)
        return {ARRAY: [list(tree.shape), str(tree.dtype).split(".")[-1]]}
    return tree


def _placeholders(skeleton) -> list:
    if isinstance(skeleton, dict):
        if ARRAY in skeleton:
            return [skeleton[ARRAY]]
        return [p for value in skeleton.values() for p in _placeholders(value)]
    if isinstance(skeleton, list):
        return [p for value in skeleton for p in _placeholders(value)]
    return []


def _fill(skeleton, arrays):
    if isinstance(skeleton, dict):
        if ARRAY in skeleton:
            return next(arrays)
        return {key: _fill(value, arrays) for key, value in skeleton.items()}
    if isinstance(skeleton, list):
        return [_fill(value, arrays) for value in skeleton]
    return skeleton


def ranked(objective: Objective, ranks: Ranks) -> Objective:
    """The objective as one of several ranks runs it: its batches are this rank's shares of
    the global batches, and a Standin counts no units and adds no loss, statistics or
    gradients (its loss is multiplied by 0, its own batches' by 1)."""
    if ranks.size == 1:
        return objective
    part = Part(ranks.rank, ranks.size)

    def make_loss(model, split, with_grad):
        loss = objective.make_loss(model, split, with_grad)

        def weighted(weight, *arrays):
            sum_loss, stats = loss(*arrays)
            return sum_loss * weight, {name: value * weight for name, value in stats.items()}

        return weighted

    def own(batch):
        return batch.batch if isinstance(batch, Standin) else batch

    return dataclasses.replace(
        objective,
        train_batches=partial(objective.train_batches, part=part),
        eval_batches=partial(objective.eval_batches, part=part),
        arrays=lambda b: (mx.array(0.0 if isinstance(b, Standin) else 1.0),
                          *objective.arrays(own(b))),
        count=lambda b: 0 if isinstance(b, Standin) else objective.count(b),
        padding=lambda b: objective.padding(own(b)),
        make_loss=make_loss)
