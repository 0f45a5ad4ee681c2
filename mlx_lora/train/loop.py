"""The training loop: schedules updates, evaluations, saves and reports."""

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlx_lora.adapters.inject import AdapterSpec
from mlx_lora.config import TrainConfig
from mlx_lora.console import status
from mlx_lora.data.batching import Batch, batch_plan, make_batch, padding_fraction
from mlx_lora.data.packing import (
    make_packed_batch,
    packed_plan,
    packed_width,
    padding_does_as_well,
    positions,
)
from mlx_lora.data.tokenize import Example
from mlx_lora.errors import UserError
from mlx_lora.formats.mlx_lm_adapter import save_adapters
from mlx_lora.train.checkpoint import Position, save_checkpoint
from mlx_lora.train.interrupt import StopRequest
from mlx_lora.train.report import ProgressBar, Window, append_metrics, peak_memory_gb
from mlx_lora.train.step import add_grads, make_eval_step, make_grad_step, make_update
from mlx_lora.train.validation import batch_arrays, should_stop_early, validate


class TrainingDiverged(UserError):
    """The loss or gradient norm stopped being finite; the update was not applied."""


class TrainingInterrupted(Exception):
    """Ctrl-C: a checkpoint was saved; the message says how to resume."""


@dataclass
class Trainee:
    """The model being trained and what the loop needs to write its adapters."""

    model: nn.Module
    spec: AdapterSpec
    base_model: str
    adapter_dir: Path


def total_steps(config: TrainConfig, n_examples: int) -> int:
    """Optimizer updates in the run: iters, or epochs over the training batches."""
    if config.epochs > 0:
        batches_per_epoch = math.ceil(n_examples / config.batch_size)
        return max(1, math.ceil(config.epochs * batches_per_epoch / config.grad_accumulation_steps))
    return config.iters


def training_batches(examples: list[Example], config: TrainConfig,
                     position: Position) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, cursor after this batch, batch) forever, resuming at position.epoch/cursor."""
    sizes = positions(examples)
    width = packed_width(sizes, config.max_seq_length)
    pack = config.pack
    if pack and (why := padding_does_as_well(sizes, config.batch_size, config.max_seq_length,
                                             config.seed)):
        status(f"packing is off: {why}")
        pack = False
    epoch, cursor = position.epoch, position.cursor
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


def fit(trainee: Trainee, optimizer: optim.Optimizer, config: TrainConfig,
        train_set: list[Example], valid_set: list[Example], position: Position) -> Position:
    """Train from `position` to the last step (or an early stop); returns the final position."""
    model = trainee.model
    steps = total_steps(config, len(train_set))
    grad_step, eval_step = make_grad_step(model), make_eval_step(model)
    update = make_update(model, optimizer, config.max_grad_norm)
    batches = training_batches(train_set, config, position)
    bar = ProgressBar(steps, position.step)
    window = Window()
    started = time.perf_counter() - position.elapsed_s
    if valid_set and position.step == 0:  # the starting point, for comparison
        validate(trainee, eval_step, config, valid_set, position, bar.message)
    model.train()
    with StopRequest() as stop:
        try:
            while position.step < steps:
                micro = [next(batches) for _ in range(config.grad_accumulation_steps)]
                loss, n_tokens = accumulate_and_update(
                    grad_step, update, [b for _, _, b in micro], position.step + 1)
                position.step += 1
                position.epoch, position.cursor = micro[-1][0], micro[-1][1]
                position.trained_tokens += n_tokens
                position.elapsed_s = time.perf_counter() - started
                padding = sum(padding_fraction(b) for _, _, b in micro) / len(micro)
                window.add(loss, n_tokens, padding)
                if _after_update(trainee, optimizer, config, valid_set, eval_step, position,
                                 steps, bar, window):
                    break
                if stop.requested:
                    path = save_checkpoint(trainee.adapter_dir, model, optimizer, position,
                                           config.keep_checkpoints)
                    raise TrainingInterrupted(
                        f"interrupted after step {position.step}: saved {path}; "
                        "run the same command with --resume to continue")
        finally:
            bar.close()
    return position


def accumulate_and_update(grad_step, update, micro_batches: list[Batch],
                          step: int) -> tuple[float, int]:
    """One optimizer update over k micro-batches; the loss is normalized by all their tokens."""
    n_tokens = sum(b.n_target_tokens for b in micro_batches)
    inv_n = mx.array(1.0 / max(n_tokens, 1))
    grads, sum_ce = None, mx.array(0.0)
    for batch in micro_batches:
        ce, _, micro_grads = grad_step(*batch_arrays(batch), inv_n)
        grads, sum_ce = add_grads(grads, micro_grads), sum_ce + ce
        mx.eval(grads, sum_ce)
    loss = sum_ce.item() / max(n_tokens, 1)
    if not math.isfinite(loss):
        raise TrainingDiverged(_diverged(step, "loss"))
    norm = update(grads)
    mx.eval(norm)
    if not math.isfinite(norm.item()):
        raise TrainingDiverged(_diverged(step, "gradient norm"))
    return loss, n_tokens


def _diverged(step: int, what: str) -> str:
    return (f"step {step}: the {what} is not finite, so training stopped before applying it; "
            "likely causes: a learning rate too high (try 10x lower), a float16 base "
            "(try a bfloat16 or float32 one), or --max-grad-norm 0 (try 1.0). "
            "The last good checkpoint is intact; --resume continues from it")


def _after_update(trainee: Trainee, optimizer, config: TrainConfig, valid_set, eval_step,
                  position: Position, steps: int, bar: ProgressBar, window: Window) -> bool:
    """Report, validate and save as scheduled; True when early stopping ends the run."""
    step, last = position.step, position.step == steps
    if step % config.steps_per_report == 0 or last:
        summary = window.summary()
        memory = round(peak_memory_gb(), 4)
        bar.show(step, summary["loss"], summary["tokens_per_sec"], memory)
        append_metrics(trainee.adapter_dir, {
            "event": "train", "step": step, "epoch": position.epoch, **summary,
            "learning_rate": optimizer.learning_rate.item(),
            "trained_tokens": position.trained_tokens, "peak_memory_gb": memory,
            "elapsed_s": round(position.elapsed_s, 3)})
        window.reset()
    stop_early = False
    if valid_set and ((config.steps_per_eval and step % config.steps_per_eval == 0) or last):
        eval_started = time.perf_counter()
        validate(trainee, eval_step, config, valid_set, position, bar.message)
        window.start += time.perf_counter() - eval_started  # not training throughput
        stop_early = should_stop_early(config, position)
        if stop_early:
            bar.message(f"early stopping at step {step}: no better validation loss in "
                        f"{config.early_stopping_patience} evaluations")
    if step % config.save_every == 0 or last or stop_early:
        save_adapters(trainee.adapter_dir, trainee.model, trainee.spec, trainee.base_model)
        save_checkpoint(trainee.adapter_dir, trainee.model, optimizer, position,
                        config.keep_checkpoints)
        append_metrics(trainee.adapter_dir, {"event": "save", "step": step,
                                             "epoch": position.epoch})
    return stop_early
