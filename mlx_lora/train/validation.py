"""Validation during training: loss over the valid split, the best adapters, early stopping."""

import mlx.core as mx

from mlx_lora.config import TrainConfig
from mlx_lora.data.batching import Batch, loss_positions, make_batch
from mlx_lora.data.tokenize import Example
from mlx_lora.formats.mlx_lm_adapter import save_adapters
from mlx_lora.train.checkpoint import Position
from mlx_lora.train.report import append_metrics, peak_memory_gb

BEST_DIR = "best"


def evaluate_loss(eval_step, examples: list[Example], config: TrainConfig) -> float | None:
    """Token-weighted mean loss over the first val_batches batches (-1: all) of a split."""
    if not examples:
        return None
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    plan = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    if config.val_batches > 0:
        plan = plan[:config.val_batches]
    sum_ce, n_tokens = mx.array(0.0), mx.array(0.0)
    for indices in plan:  # sorted by length, so padding is small without packing
        batch = make_batch(examples, indices, config.max_seq_length)
        ce, n = eval_step(*batch_arrays(batch))
        sum_ce, n_tokens = sum_ce + ce, n_tokens + n
        mx.eval(sum_ce, n_tokens)
    return (sum_ce / mx.maximum(n_tokens, 1)).item()


def batch_arrays(batch: Batch) -> tuple[mx.array, mx.array | None, mx.array, mx.array, mx.array]:
    """A batch as the loss takes it: (inputs, segments or None, positions, targets, weights).

    Only positions that carry loss reach the output head; their count is rounded up
    (batching.POSITION_MULTIPLE) so the compiled step sees few shapes.
    """
    positions_, weights = loss_positions(batch.loss_mask)
    targets = batch.targets.reshape(-1)[positions_]
    segments = None if batch.segments is None else mx.array(batch.segments)
    return (mx.array(batch.inputs), segments, mx.array(positions_), mx.array(targets),
            mx.array(weights))


def validate(trainee, eval_step, config: TrainConfig, valid_set: list[Example],
             position: Position, say) -> float:
    """Log the validation loss; keep the best adapters; count evaluations without progress."""
    trainee.model.eval()
    val_loss = evaluate_loss(eval_step, valid_set, config)
    trainee.model.train()
    improved = position.best_val_loss is None or val_loss < position.best_val_loss
    if improved:
        position.best_val_loss, position.best_step = val_loss, position.step
        position.evals_since_best = 0
        if config.keep_best:
            save_adapters(trainee.adapter_dir / BEST_DIR, trainee.model, trainee.spec,
                          trainee.base_model)
    else:
        position.evals_since_best += 1
    say(f"step {position.step}: validation loss {val_loss:.4f}"
        + (" (best so far)" if improved else f" (best {position.best_val_loss:.4f} "
                                             f"at step {position.best_step})"))
    append_metrics(trainee.adapter_dir, {
        "event": "val", "step": position.step, "epoch": position.epoch, "val_loss": val_loss,
        "trained_tokens": position.trained_tokens, "peak_memory_gb": round(peak_memory_gb(), 4),
        "elapsed_s": round(position.elapsed_s, 3)})
    return val_loss


def should_stop_early(config: TrainConfig, position: Position) -> bool:
    """True once `early_stopping_patience` evaluations in a row found no better loss."""
    patience = config.early_stopping_patience
    return patience > 0 and position.evals_since_best >= patience
