"""Optimizers and learning-rate schedules."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from mlx_lora.config import TrainConfig


def build_schedule(config: TrainConfig, total_steps: int):
    """Warmup from warmup_init, then constant, or cosine or linear decay to end_learning_rate
    over decay_steps (by default the remaining steps)."""
    peak, end = config.learning_rate, config.end_learning_rate
    decay_steps = config.decay_steps or max(total_steps - config.warmup, 1)
    if config.lr_schedule == "cosine":
        main = optim.cosine_decay(peak, decay_steps, end)
    elif config.lr_schedule == "linear":
        main = optim.linear_schedule(peak, end, decay_steps)
    else:  # constant, as a schedule so it joins a warmup like the others
        main = optim.linear_schedule(peak, peak, 1)
    if config.warmup == 0:
        return main
    warmup = optim.linear_schedule(config.warmup_init, peak, config.warmup)
    return optim.join_schedules([warmup, main], [config.warmup])


def build_optimizer(config: TrainConfig, total_steps: int) -> optim.Optimizer:
    """Adam or AdamW, with bias correction by default, as torch and PEFT users expect.

    With --lora-plus-ratio R (LoRA+, Hayou et al. 2024), lora_b gets its own Adam at R times
    the schedule; the first optimizer's rate is the one reported.
    """
    schedule = build_schedule(config, total_steps)
    if not config.lora_plus_ratio:
        return _adam(config, schedule)
    ratio = config.lora_plus_ratio
    return optim.MultiOptimizer(
        [_adam(config, schedule), _adam(config, lambda step: ratio * schedule(step))],
        [lambda path, _: not path.endswith("." + LORA_PLUS_PARAMETER)])


LORA_PLUS_PARAMETER = "lora_b"  # the factor LoRA+ speeds up


def _adam(config: TrainConfig, schedule) -> optim.Optimizer:
    settings = dict(learning_rate=schedule, betas=[config.adam_beta1, config.adam_beta2],
                    eps=config.adam_epsilon, bias_correction=config.bias_correction)
    if config.optimizer == "adam":
        return optim.Adam(**settings)
    return optim.AdamW(weight_decay=config.weight_decay, **settings)


def init_state(optimizer: optim.Optimizer, model: nn.Module) -> None:
    """Fill in Adam's moments in float32 whatever the weights' dtype (a checkpoint's loaded
    state stays): in bfloat16, v = 0.999 v + 0.001 g^2 rounds back to v, so v never decays."""
    params = model.trainable_parameters()
    optimizer.init(tree_map(lambda p: p.astype(mx.float32), params))
