"""Validation during training: loss over the valid split (and the general text of the
forgetting probe), the best adapters, early stopping."""

from collections.abc import Callable

import mlx.core as mx

from mlx_lora.config import TrainConfig
from mlx_lora.objectives.protocol import Objective
from mlx_lora.train.checkpoint import Position
from mlx_lora.train.distributed import SINGLE, Ranks
from mlx_lora.train.progress import peak_memory_gb
from mlx_lora.train.report import RunReport


def evaluate_split(objective: Objective, eval_step, examples: list, config: TrainConfig,
                   ranks: Ranks = SINGLE) -> tuple[float, dict[str, float]]:
    """Mean loss and statistics per unit (target token, pair) over the split's evaluation
    batches (each rank's shares of them summed over the ranks)."""
    sum_loss, stat_sums, units = mx.array(0.0), {}, 0
    for batch in objective.eval_batches(examples, config):
        batch_loss, stats = eval_step(*objective.arrays(batch))
        sum_loss, units = sum_loss + batch_loss, units + objective.count(batch)
        stat_sums = {k: stat_sums.get(k, 0.0) + v for k, v in stats.items()}
        mx.eval(sum_loss, stat_sums)
    sum_loss, stat_sums = ranks.sum((sum_loss, stat_sums))
    n = max(ranks.total(units), 1)
    return sum_loss.item() / n, {k: v.item() / n for k, v in stat_sums.items()}


def stats_text(stats: dict[str, float]) -> str:
    """", reward accuracy 0.625, ..." for a console line; empty without statistics."""
    return "".join(f", {name.replace('_', ' ')} {value:.4f}" for name, value in stats.items())


def validate(model, objective: Objective, eval_step, config: TrainConfig, valid_set: list,
             position: Position, report: RunReport,
             general: Callable[[], float] | None = None, ranks: Ranks = SINGLE) -> float | None:
    """Report the validation loss and the general-text loss (each when there is one); keep the
    best adapters; count evaluations without progress."""
    model.eval()
    val_loss, stats = (evaluate_split(objective, eval_step, valid_set, config, ranks)
                       if valid_set else (None, {}))
    general_loss = general() if general else None
    model.train()
    said = []
    if val_loss is not None:
        said.append(_track_best(model, config, val_loss, position, report) + stats_text(stats))
    if general_loss is not None:
        said.append(f"general-text loss {general_loss:.4f}")
    report.say(f"step {position.step}: " + ", ".join(said))
    report.event({
        "event": "val", "step": position.step, "epoch": position.epoch, "val_loss": val_loss,
        **{f"val_{name}": value for name, value in stats.items()},
        "general_loss": general_loss,
        f"trained_{report.unit}": position.trained_tokens,
        "peak_memory_gb": round(peak_memory_gb(), 4),
        "elapsed_s": round(position.elapsed_s, 3)})
    return val_loss


def _track_best(model, config: TrainConfig, val_loss: float, position: Position,
                report: RunReport) -> str:
    """Keep the best adapters and count evaluations without progress; the console's words."""
    improved = position.best_val_loss is None or val_loss < position.best_val_loss
    if improved:
        position.best_val_loss, position.best_step = val_loss, position.step
        position.evals_since_best = 0
        if config.keep_best:
            report.save_best(model)
    else:
        position.evals_since_best += 1
    return f"validation loss {val_loss:.4f}" + (
        " (best so far)" if improved
        else f" (best {position.best_val_loss:.4f} at step {position.best_step})")


def should_stop_early(config: TrainConfig, position: Position) -> bool:
    """True once `early_stopping_patience` evaluations in a row found no better loss."""
    patience = config.early_stopping_patience
    return patience > 0 and position.evals_since_best >= patience
