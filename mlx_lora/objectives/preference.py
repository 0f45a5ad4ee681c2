"""DPO and ORPO: preference losses from per-sequence log-probabilities, with no model copy.

The reference of DPO is the model as training starts (the base, plus --resume-adapter-file's
adapter when given; a fresh LoRA adds nothing until it trains). Its log-probabilities are
computed once per pair before the first update and kept with the pair: no second copy of the
weights, no extra forward pass per step. ORPO needs no reference.

Every loss is a sum of per-pair terms, so accumulated micro-batches equal one larger batch.
"""

import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lora.config import TrainConfig
from mlx_lora.console import status
from mlx_lora.data.batching import padding_fraction
from mlx_lora.model.head import Split
from mlx_lora.objectives.pairs import (
    Pair,
    eval_pair_batches,
    make_pair_batch,
    pair_arrays,
    pair_batches,
    pair_lengths,
    read_by_evaluation,
    read_by_training,
    to_pairs,
    with_reference,
)
from mlx_lora.objectives.protocol import LossFn, Objective
from mlx_lora.objectives.sft import token_ce


def sequence_logps(model: nn.Module, split: Split | None, with_grad: bool, inputs, positions,
                   targets, weights, rows) -> mx.array:
    """(R,) log-probability of each row's response: minus the sum of its tokens' cross-entropy."""
    terms = token_ce(model, split, with_grad, inputs, None, positions, targets, weights,
                     per_position=True)  # (P,)
    member = (rows[None, :] == mx.arange(inputs.shape[0])[:, None]).astype(terms.dtype)
    return -(member @ terms)  # (R, P) @ (P,): padding positions weigh 0


def dpo_terms(logps, reference, n_tokens, beta: float, loss_type: str):
    """Per-pair DPO losses and the chosen and rejected rewards, as TRL defines them.

    logps, reference, n_tokens: (2B,), chosen rows first. IPO compares per-token means.
    """
    if loss_type == "ipo":
        logps, reference = logps / n_tokens, reference / n_tokens
    half = logps.shape[0] // 2
    chosen = beta * (logps[:half] - reference[:half])
    rejected = beta * (logps[half:] - reference[half:])
    logits = (chosen - rejected) / beta
    if loss_type == "sigmoid":
        losses = -nn.log_sigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = nn.relu(1 - beta * logits)
    else:  # ipo
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, chosen, rejected


def orpo_terms(logps, reference, n_tokens, weight: float):
    """Per-pair ORPO losses (the chosen response's mean NLL minus weight * log sigmoid of the
    log odds ratio) and the rewards weight * mean log-probability, as TRL defines them."""
    del reference  # ORPO has none
    mean = logps / n_tokens
    half = mean.shape[0] // 2
    chosen, rejected = mean[:half], mean[half:]
    # log(1 - p) for p = exp(mean) < 1; the clamp keeps a certain sequence finite.
    log_odds = ((chosen - rejected) - (_log1m_exp(chosen) - _log1m_exp(rejected)))
    losses = -chosen - weight * nn.log_sigmoid(log_odds)
    return losses, weight * chosen, weight * rejected


def _log1m_exp(x: mx.array) -> mx.array:
    return mx.log1p(-mx.exp(mx.minimum(x, -1e-6)))


def make_preference_loss(terms, model: nn.Module, split: Split | None,
                         with_grad: bool) -> LossFn:
    """(inputs, positions, targets, weights, rows, n_tokens, reference) -> (sum over pairs of
    the loss, sums of the reported statistics)."""

    def loss(inputs, positions, targets, weights, rows, n_tokens, reference):
        logps = sequence_logps(model, split, with_grad, inputs, positions, targets, weights, rows)
        losses, chosen, rejected = terms(logps, reference, n_tokens)
        half = logps.shape[0] // 2
        stats = {"reward_accuracy": (chosen > rejected).astype(mx.float32).sum(),
                 "reward_margin": (chosen - rejected).sum(),
                 "chosen_reward": chosen.sum(), "rejected_reward": rejected.sum(),
                 "chosen_logp": logps[:half].sum(), "rejected_logp": logps[half:].sum()}
        return losses.sum(), stats

    return loss


def reference_pass(model: nn.Module, split: Split | None, pairs: list[Pair],
                   config: TrainConfig, train_batches: int | None) -> list[Pair]:
    """The pairs the run will read with the current model's log-probabilities of both
    responses (eval mode); the rest are left without.

    train_batches: how many training batches the run reads from this split; None for an
    evaluation split (its first config.val_batches evaluation batches).
    """
    started = time.perf_counter()
    if train_batches is None:
        wanted = read_by_evaluation(pairs, config)
    else:
        wanted = read_by_training(pairs, config, train_batches)
    step = mx.compile(partial(sequence_logps, model, split, False), inputs=model.state)
    lengths = pair_lengths(pairs)
    order = sorted(wanted, key=lambda i: lengths[i])
    logps = np.zeros((len(order), 2), np.float32)
    training = model.training
    model.eval()
    for start in range(0, len(order), config.batch_size):
        inputs, positions, targets, weights, rows, _, _ = pair_arrays(make_pair_batch(
            pairs, order[start:start + config.batch_size], config.max_seq_length))
        values = np.array(step(inputs, positions, targets, weights, rows))
        logps[start:start + config.batch_size] = values.reshape(2, -1).T
    model.train(training)
    status(f"reference log-probabilities of the {len(order)} pairs the run reads, computed in "
           f"{time.perf_counter() - started:.1f} s (once; kept with the pairs)")
    return with_reference(pairs, order, logps)


def preference_objective(config: TrainConfig) -> Objective:
    """DPO or ORPO as config.train_mode says, with its settings."""
    if config.train_mode == "dpo":
        terms = partial(dpo_terms, beta=config.beta, loss_type=config.dpo_loss_type)
    else:
        weight = config.beta if config.orpo_lambda == -1 else config.orpo_lambda
        terms = partial(orpo_terms, weight=weight)
    return Objective(
        name=config.train_mode, unit="pairs", examples=to_pairs, train_batches=pair_batches,
        eval_batches=eval_pair_batches, arrays=pair_arrays, count=lambda batch: batch.n_pairs,
        make_loss=partial(make_preference_loss, terms),
        padding=lambda batch: padding_fraction(batch.rows),
        prepare=reference_pass if config.train_mode == "dpo" else None, packable=False)
