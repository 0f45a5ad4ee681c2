"""Optimizers and learning-rate schedules."""

import mlx.optimizers as optim

from mlx_lora.config import TrainConfig


def build_schedule(config: TrainConfig, total_steps: int):
    """Warmup from 0, then constant, cosine or linear decay to 0 over the remaining steps."""
    peak = config.learning_rate
    decay_steps = max(total_steps - config.warmup, 1)
    if config.lr_schedule == "cosine":
        main = optim.cosine_decay(peak, decay_steps, 0.0)
    elif config.lr_schedule == "linear":
        main = optim.linear_schedule(peak, 0.0, decay_steps)
    else:  # constant, as a schedule so it joins a warmup like the others
        main = optim.linear_schedule(peak, peak, 1)
    if config.warmup == 0:
        return main
    warmup = optim.linear_schedule(0.0, peak, config.warmup)
    return optim.join_schedules([warmup, main], [config.warmup])


def build_optimizer(config: TrainConfig, total_steps: int) -> optim.Optimizer:
    """Adam or AdamW with bias correction, as torch and PEFT users expect."""
    schedule = build_schedule(config, total_steps)
    if config.optimizer == "adam":
        return optim.Adam(learning_rate=schedule, bias_correction=True)
    return optim.AdamW(
        learning_rate=schedule, weight_decay=config.weight_decay, bias_correction=True
    )
