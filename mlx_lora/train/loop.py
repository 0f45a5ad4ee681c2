"""The training loop: schedules updates, evaluations, saves and reports; nothing else."""

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlx_lora.config import TrainConfig
from mlx_lora.errors import UserError
from mlx_lora.model.head import Split
from mlx_lora.objectives.protocol import Objective
from mlx_lora.train.checkpoint import Position
from mlx_lora.train.distributed import SINGLE, Ranks
from mlx_lora.train.interrupt import StopRequest
from mlx_lora.train.memory_guard import MemoryGuard, MemoryLimitExceeded
from mlx_lora.train.progress import Window, peak_memory_gb
from mlx_lora.train.report import RunReport
from mlx_lora.train.step import add_grads, make_eval_step, make_grad_step, make_update
from mlx_lora.train.validation import should_stop_early, validate

RATE_UNITS = {"tokens": "tok"}  # how the bar abbreviates a unit


class TrainingDiverged(UserError):
    """The loss or gradient norm stopped being finite; the update was not applied."""


@dataclass
class Trainee:
    """What the loop trains, how, and where its output goes (decided once by the run)."""

    model: nn.Module
    objective: Objective
    split: Split | None  # the model's backbone/head split from the run's probe
    pack: bool  # the run's packing decision
    report: RunReport
    vocab_size: int | None  # for telling a diverged, uniform output from a loss still falling
    general: Callable[[], float] | None = None  # the forgetting probe's loss, at evaluations
    ranks: Ranks = SINGLE  # the processes training together (the objective reads this one's share)


def total_steps(config: TrainConfig, n_examples: int) -> int:
    """Optimizer updates in the run: iters, or epochs over the training batches."""
    if config.epochs > 0:
        batches_per_epoch = math.ceil(n_examples / config.batch_size)
        return max(1, math.ceil(config.epochs * batches_per_epoch / config.grad_accumulation_steps))
    return config.iters


def fit(trainee: Trainee, optimizer: optim.Optimizer, config: TrainConfig, train_set: list,
        valid_set: list, position: Position, stop: threading.Event | None = None) -> bool:
    """Train from `position` (updated in place) to the last step or an early stop.

    Returns False when Ctrl-C or `stop` ended it early, after a checkpoint and the adapters
    were saved; True when it ran to its end. Raises MemoryLimitExceeded, after saving them
    too, when a step passed config.memory_limit (train.memory_guard).
    """
    model, objective, report = trainee.model, trainee.objective, trainee.report
    steps = total_steps(config, len(train_set))
    grad_step = make_grad_step(model, objective.make_loss(model, trainee.split, with_grad=True))
    eval_step = make_eval_step(model, objective.make_loss(model, trainee.split, with_grad=False))
    update = make_update(model, optimizer, config.max_grad_norm)
    batches = objective.train_batches(train_set, config, trainee.pack, position.epoch,
                                      position.cursor)
    window = Window(objective.unit)
    started = time.perf_counter() - position.elapsed_s
    report.open_bar(steps, position.step)
    if (valid_set or trainee.general) and position.step == 0:  # the starting point
        validate(model, objective, eval_step, config, valid_set, position, report,
                 trainee.general, trainee.ranks)
    model.train()
    with StopRequest() as interrupt, MemoryGuard(config.memory_limit, trainee.ranks) as guard:
        try:
            while position.step < steps:
                micro = [next(batches) for _ in range(config.grad_accumulation_steps)]
                loss, units, stats = accumulate_and_update(
                    grad_step, update, objective, [b for _, _, b in micro], position.step + 1,
                    trainee.ranks)
                position.step += 1
                position.epoch, position.cursor = micro[-1][0], micro[-1][1]
                position.trained_tokens += units
                position.elapsed_s = time.perf_counter() - started
                if config.clear_cache_threshold and (
                        mx.get_cache_memory() > config.clear_cache_threshold):
                    mx.clear_cache()
                padding = sum(objective.padding(b) for _, _, b in micro) / len(micro)
                window.add(loss, units, padding, stats)
                if _after_update(trainee, optimizer, config, valid_set, eval_step, position,
                                 steps, window):
                    break
                if _stops(trainee, optimizer, config, position, guard,
                          interrupt.requested or (stop is not None and stop.is_set())):
                    return False
        finally:
            report.close_bar()
    return True


def _stops(trainee: Trainee, optimizer, config: TrainConfig, position: Position,
           guard: MemoryGuard, requested: bool) -> bool:
    """After a step: True, with the step saved, when a rank was asked to stop (Ctrl-C, stop);
    MemoryLimitExceeded, with the step saved, when a rank passed the memory limit."""
    over = guard.check(position.step, config)  # the same answer on every rank
    if not over and not trainee.ranks.any(requested):
        return False
    trainee.report.save_adapters(trainee.model)
    trainee.report.save_checkpoint(trainee.model, optimizer, position, config.keep_checkpoints)
    if over:
        raise MemoryLimitExceeded(over)
    return True


def accumulate_and_update(grad_step, update, objective: Objective, micro_batches: list,
                          step: int, ranks: Ranks = SINGLE) -> tuple[float, int, dict[str, float]]:
    """One optimizer update over k micro-batches, normalized by all their units together.

    On several ranks, the micro-batches are this rank's shares, and units, loss, statistics
    and gradients are summed over the ranks before the update. Returns the mean loss per
    unit, the units, and the objective's statistics per unit.
    """
    units = ranks.total(sum(objective.count(b) for b in micro_batches))
    inv_n = mx.array(1.0 / max(units, 1))
    grads, sum_loss, stat_sums = None, mx.array(0.0), {}
    for batch in micro_batches:
        batch_loss, stats, micro_grads = grad_step(*objective.arrays(batch), inv_n)
        grads, sum_loss = add_grads(grads, micro_grads), sum_loss + batch_loss
        stat_sums = {k: stat_sums.get(k, 0.0) + v for k, v in stats.items()}
        mx.eval(grads, sum_loss, stat_sums)
    grads, sum_loss, stat_sums = ranks.sum((grads, sum_loss, stat_sums))
    loss = sum_loss.item() / max(units, 1)
    if not math.isfinite(loss):
        raise TrainingDiverged(_diverged(step, "loss"))
    norm = update(grads)
    mx.eval(norm)
    if not math.isfinite(norm.item()):
        raise TrainingDiverged(_diverged(step, "gradient norm"))
    return loss, units, {k: v.item() / max(units, 1) for k, v in stat_sums.items()}


def _diverged(step: int, what: str) -> str:
    return (f"step {step}: the {what} is not finite, so training stopped before applying it; "
            "likely causes: a learning rate too high (try 10x lower), a float16 base "
            "(try a bfloat16 or float32 one), or --max-grad-norm 0 (try 1.0). "
            "The last good checkpoint is intact; --resume continues from it")


def _check_not_uniform(loss: float, position: Position, vocab_size: int | None) -> None:
    """A loss that came down and went back to ln(vocab) means uniform output: divergence,
    though every number is finite."""
    lowest = loss if position.lowest_loss is None else min(position.lowest_loss, loss)
    position.lowest_loss = lowest
    if not vocab_size:
        return
    uniform = math.log(vocab_size)
    if lowest < 0.9 * uniform and abs(loss - uniform) < 0.02 * uniform:
        raise TrainingDiverged(
            f"step {position.step}: the training loss went from {lowest:.3f} back to "
            f"{loss:.3f}, which is ln(vocabulary {vocab_size:,}): the model now predicts every "
            "token as equally likely, so training diverged; try a 10x lower learning rate or "
            "--max-grad-norm 1.0, from scratch or from an earlier checkpoint (best/ holds the "
            "adapters with the best validation loss)")


def _after_update(trainee: Trainee, optimizer, config: TrainConfig, valid_set, eval_step,
                  position: Position, steps: int, window: Window) -> bool:
    """Report, validate and save as scheduled; True when early stopping ends the run."""
    model, report = trainee.model, trainee.report
    step, last = position.step, position.step == steps
    if step % config.steps_per_report == 0 or last:
        summary = window.summary()
        memory = round(peak_memory_gb(), 4)
        unit = trainee.objective.unit
        rate = summary[f"{unit}_per_sec"]
        speed = f"{rate:,.0f}" if rate >= 100 else f"{rate:.2f}"
        report.show(step, summary["loss"], f"{speed} {RATE_UNITS.get(unit, unit)}/s", memory)
        _check_not_uniform(summary["loss"], position, trainee.vocab_size)
        report.event({
            "event": "train", "step": step, "epoch": position.epoch, **summary,
            "learning_rate": optimizer.learning_rate.item(),
            f"trained_{unit}": position.trained_tokens, "peak_memory_gb": memory,
            "elapsed_s": round(position.elapsed_s, 3)})
        window.reset()
    stop_early = False
    evaluates = valid_set or trainee.general
    if evaluates and ((config.steps_per_eval and step % config.steps_per_eval == 0) or last):
        eval_started = time.perf_counter()
        validate(model, trainee.objective, eval_step, config, valid_set, position, report,
                 trainee.general, trainee.ranks)
        window.start += time.perf_counter() - eval_started  # not training throughput
        stop_early = should_stop_early(config, position)
        if stop_early:
            report.say(f"early stopping at step {step}: no better validation loss in "
                       f"{config.early_stopping_patience} evaluations")
    if step % config.save_every == 0 or last or stop_early:
        report.save_adapters(model)
        report.save_checkpoint(model, optimizer, position, config.keep_checkpoints)
        report.event({"event": "save", "step": step, "epoch": position.epoch})
    return stop_early
