"""The compiled pieces of a training update: gradients of a micro-batch, and the Adam update."""

from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from mlx_lora.console import status
from mlx_lora.errors import UserError
from mlx_lora.train.loss import make_loss
from mlx_lora.train.packed_mask import packing_problem


def make_grad_step(model: nn.Module, on_trace: Callable[[], None] | None = None) -> Callable:
    """(inputs, segments, positions, targets, weights, inv_n) -> (sum_ce, n_tokens, grads).

    The grads are those of sum_ce * inv_n; inv_n is 1 / the target tokens of the whole
    accumulated update, so summing the grads of k micro-batches gives the token-weighted mean
    over all of them. The arrays are those of `loss.make_loss`. on_trace is called each time
    the step is traced, that is compiled: once per distinct shape of its arguments.
    """
    loss = make_loss(model, with_grad=True, say=status)

    def scaled_loss(inputs, segments, positions, targets, weights, inv_n):
        sum_ce, n_tokens = loss(inputs, segments, positions, targets, weights)
        return sum_ce * inv_n, (sum_ce, n_tokens)

    value_and_grad = nn.value_and_grad(model, scaled_loss)
    state = [model.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def grad_step(inputs, segments, positions, targets, weights, inv_n):
        if on_trace is not None:
            on_trace()
        (_, (sum_ce, n_tokens)), grads = value_and_grad(inputs, segments, positions, targets,
                                                        weights, inv_n)
        return sum_ce, n_tokens, grads

    return _refuse_inexact_packing(model, grad_step)


def _refuse_inexact_packing(model: nn.Module, step: Callable) -> Callable:
    """step, refusing packed batches for a model where packing changes the loss.

    A run resolves --pack against the model first (packed_mask.resolve_pack); this keeps any
    other caller from training on a silently wrong loss.
    """
    problem = []  # checked on the first packed batch, outside the compiled step

    def guarded(inputs, segments, *rest):
        if segments is not None:
            if not problem:
                problem.append(packing_problem(model))
            if problem[0]:
                raise UserError(f"packing changes this model's loss ({problem[0]}); "
                                "train with --no-pack")
        return step(inputs, segments, *rest)

    return guarded


def make_update(model: nn.Module, optimizer: optim.Optimizer, max_grad_norm: float) -> Callable:
    """grads -> global gradient norm before clipping; applies clipping and the optimizer step."""
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads):
        if max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
        else:
            norm = global_norm(grads)
        optimizer.update(model, grads)
        return norm

    return update


def global_norm(grads) -> mx.array:
    """The L2 norm of all gradient tensors together."""
    squares = [mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)]
    return mx.sqrt(sum(squares))


def add_grads(total, grads):
    """Sum two gradient trees (None for the first)."""
    return grads if total is None else tree_map(mx.add, total, grads)


def make_eval_step(model: nn.Module) -> Callable:
    """(inputs, segments, positions, targets, weights) -> (sum_ce, n_tokens), compiled."""
    loss = make_loss(model, with_grad=False)

    @partial(mx.compile, inputs=model.state)
    def eval_step(inputs, segments, positions, targets, weights):
        return loss(inputs, segments, positions, targets, weights)

    return eval_step
