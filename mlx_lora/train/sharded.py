"""Optimizer state sharded over the ranks (ZeRO stage 1): each rank keeps and updates 1/N of it.

Every trainable parameter is flattened, padded to a multiple of N * align elements and cut
into N equal slices; rank r keeps the optimizer state of slice r of each parameter, nothing
else. An update: every rank holds the gradients summed over the ranks (the ring backend has
all_sum and all_gather but no reduce-scatter), updates its slice of each parameter with its
slice of the state, and the ranks all-gather the updated slices into whole parameters. Adam
works element by element, so this is the unsharded update. align keeps 8-bit Adam's blocks
whole within a slice (train/adam8bit.py), so the slices' blocks are the unsharded blocks.

Checkpoints hold the state as an unsharded run holds it (gathered from the ranks), so a run
resumes with any number of ranks, sharded or not. Per-parameter state leaves have at least
one axis; the optimizer's scalars (step, learning rate) are the same on every rank.
"""

from collections.abc import Callable

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_lora.train.distributed import Ranks


class ShardedOptimizer:
    """An optimizer whose state is split over the ranks; it stands where an optim.Optimizer
    does (state, learning_rate, init, apply_gradients)."""

    def __init__(self, make: Callable[[], optim.Optimizer], params: dict, ranks: Ranks,
                 align: int = 1):
        self.inner, self.make, self.ranks, self.align = make(), make, ranks, align
        # Lazy zeros with the parameters' shapes: templates that are never evaluated.
        self.shapes = tree_map(lambda p: mx.zeros(p.shape, mx.float32), params)

    def slice_length(self, size: int) -> int:
        """Elements of a parameter of `size` elements that each rank keeps."""
        unit = self.ranks.size * self.align
        return -(-size // unit) * self.align

    def mine(self, x: mx.array) -> mx.array:
        """This rank's slice of a parameter (or its gradient): flattened, zero-padded."""
        return self._piece(x, self.slice_length(x.size))

    def _piece(self, x: mx.array, length: int) -> mx.array:
        """This rank's `length` elements of x flattened, zero-padded at the end."""
        start = min(self.ranks.rank * length, x.size)
        piece = x.reshape(-1)[start:start + length]
        if piece.size < length:
            piece = mx.concatenate([piece, mx.zeros((length - piece.size,), x.dtype)])
        return piece

    @property
    def state(self) -> dict:
        """This rank's slices of the state (what the compiled update reads and writes)."""
        return self.inner.state

    @state.setter
    def state(self, whole: dict) -> None:
        """Take this rank's slices of a state as an unsharded optimizer holds it."""
        template = dict(tree_flatten(self._template(sliced=True).state))
        self.inner.state = tree_unflatten([
            (key, value if value.ndim == 0 else
             self._piece(value, template[key].size).reshape(template[key].shape))
            for key, value in tree_flatten(whole)])

    @property
    def learning_rate(self) -> mx.array:
        return self.inner.learning_rate

    def init(self, parameters: dict) -> None:
        """Start the state of this rank's slices (a state already set is kept)."""
        self.inner.init(tree_map(self.mine, parameters))

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        """Update this rank's slices; returns the whole updated parameters (in their dtypes),
        gathered from every rank."""
        updated = dict(tree_flatten(self.inner.apply_gradients(
            tree_map(self.mine, gradients), tree_map(self.mine, parameters))))
        flat = tree_flatten(parameters)
        whole = self._gather([updated[key].astype(p.dtype) for key, p in flat],
                             [p for _, p in flat])
        order = iter(whole)
        return tree_map(lambda _: next(order), parameters)

    def _gather(self, slices: list[mx.array], like: list[mx.array]) -> list[mx.array]:
        """Whole parameters from every rank's slices: one all_gather per dtype."""
        whole: dict[int, mx.array] = {}
        for dtype in dict.fromkeys(p.dtype for p in like):  # in an order every rank shares
            chosen = [i for i, p in enumerate(like) if p.dtype == dtype]
            gathered = self.ranks.gather(mx.concatenate([slices[i] for i in chosen]))
            gathered = gathered.reshape(self.ranks.size, -1)  # (ranks, this rank's elements)
            at = 0
            for i in chosen:
                length = slices[i].size
                piece = gathered[:, at:at + length].reshape(-1)[:like[i].size]
                whole[i], at = piece.reshape(like[i].shape), at + length
        return [whole[i] for i in range(len(like))]

    def gathered_state(self) -> dict:
        """The state as an unsharded optimizer holds it, for a checkpoint: on the writing rank;
        the others take part in gathering it and get {} (they keep no second copy)."""
        template = dict(tree_flatten(self._template(sliced=False).state))
        pieces = []
        for key, value in tree_flatten(self.inner.state):
            if value.ndim > 0:
                whole = self.ranks.gather(value.reshape(-1))
                value = whole[:template[key].size].reshape(template[key].shape)
            mx.eval(value)
            if self.ranks.writes:
                pieces.append((key, value))
        return tree_unflatten(pieces) if pieces else {}

    def _template(self, sliced: bool) -> optim.Optimizer:
        """A fresh optimizer of the same kind, its state started lazily (never evaluated) for
        the slices or for whole parameters: the shapes each state leaf has."""
        template = self.make()
        shapes = self.shapes
        if sliced:
            shapes = tree_map(lambda p: mx.zeros((self.slice_length(p.size),)), shapes)
        template.init(shapes)
        return template


def whole_state(optimizer) -> dict:
    """An optimizer's state as one process holds it, for a checkpoint: a sharded one gathered
    (every rank must ask; the writing rank gets it)."""
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer.gathered_state()
    return optimizer.state
