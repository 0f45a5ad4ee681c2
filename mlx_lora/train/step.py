"""The compiled pieces of a training update: gradients of a micro-batch, and the Adam update."""

from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from mlx_lora.objectives.protocol import LossFn


def make_grad_step(model: nn.Module, loss: LossFn,
                   on_trace: Callable[[], None] | None = None) -> Callable:
    """(*arrays, inv_n) -> (sum_loss, stats, grads), compiled.

    The grads are those of sum_loss * inv_n; inv_n is 1 / the units (target tokens, pairs) of
    the whole accumulated update, so summing the grads of k micro-batches gives the mean over
    all of them. on_trace is called each time the step is traced, that is compiled: once per
    distinct shape of its arguments.
    """

    def scaled_loss(*args):
        *arrays, inv_n = args
        sum_loss, stats = loss(*arrays)
        return sum_loss * inv_n, (sum_loss, stats)

    value_and_grad = nn.value_and_grad(model, scaled_loss)
    state = [model.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def grad_step(*args):
        if on_trace is not None:
            on_trace()
        (_, (sum_loss, stats)), grads = value_and_grad(*args)
        return sum_loss, stats, grads

    return grad_step


def make_update(model: nn.Module, optimizer: optim.Optimizer, max_grad_norm: float) -> Callable:
    """grads -> global gradient norm before clipping; applies clipping and the optimizer step."""
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads):
        # Clipping and Adam in float32 (Adam's state is, see optim.init_state); each weight
        # keeps its dtype, so a bfloat16 base trained in full stays bfloat16.
        grads = tree_map(lambda g: g.astype(mx.float32), grads)
        if max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
        else:
            norm = global_norm(grads)
        params = model.trainable_parameters()
        updated = optimizer.apply_gradients(grads, params)
        model.update(tree_map(lambda new, old: new.astype(old.dtype), updated, params))
        return norm

    return update


def global_norm(grads) -> mx.array:
    """The L2 norm of all gradient tensors together."""
    squares = [mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)]
    return mx.sqrt(sum(squares))


def add_grads(total, grads):
    """Sum two gradient trees (None for the first)."""
    return grads if total is None else tree_map(mx.add, total, grads)


def make_eval_step(model: nn.Module, loss: LossFn) -> Callable:
    """(*arrays) -> (sum_loss, stats), compiled."""

    @partial(mx.compile, inputs=model.state)
    def eval_step(*arrays):
        return loss(*arrays)

    return eval_step
