"""Optimizers and learning-rate schedules."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from mlx_lora.config import TrainConfig
from mlx_lora.train.adam8bit import BLOCK, Adam8bit
from mlx_lora.train.distributed import Ranks
from mlx_lora.train.sharded import ShardedOptimizer


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
    if config.optimizer == "adam-8bit":  # AdamW without decay is Adam, to the bit
        return Adam8bit(weight_decay=0.0, **settings)
    if config.optimizer == "adamw-8bit":
        return Adam8bit(weight_decay=config.weight_decay, **settings)
    return optim.AdamW(weight_decay=config.weight_decay, **settings)


def optimizer_for(config: TrainConfig, total_steps: int, model: nn.Module, ranks: Ranks):
    """build_optimizer's optimizer; with --shard-optimizer on several ranks, its state split
    over them (8-bit Adam's slices in whole blocks)."""
    if not (config.shard_optimizer and ranks.size > 1):
        return build_optimizer(config, total_steps)
    align = BLOCK if config.optimizer.endswith("-8bit") else 1
    return ShardedOptimizer(lambda: build_optimizer(config, total_steps),
                            model.trainable_parameters(), ranks, align)


def state_bytes(optimizer) -> int:
    """Bytes of per-parameter optimizer state this process holds (not the step or rate)."""
    return sum(value.nbytes for _, value in tree_flatten(optimizer.state) if value.ndim > 0)


def state_line(config: TrainConfig, optimizer, model: nn.Module, ranks: Ranks) -> str | None:
    """What the optimizer state costs, against 32-bit Adam on one process; None by default."""
    if not (config.optimizer.endswith("-8bit") or config.shard_optimizer):
        return None
    elements = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    where = "" if ranks.size == 1 else " per rank"
    if isinstance(optimizer, ShardedOptimizer):
        where += f", sharded over {ranks.size}"
    alone = "; --shard-optimizer: no other process to share it with" if (
        config.shard_optimizer and ranks.size == 1) else ""
    return (f"optimizer state: {_size(state_bytes(optimizer))}{where} ({config.optimizer}; "
            f"unsharded 32-bit Adam: {_size(8 * elements)}{alone})")


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def init_state(optimizer: optim.Optimizer, model: nn.Module) -> None:
    """Fill in Adam's moments in float32 whatever the weights' dtype (a checkpoint's loaded
    state stays): in bfloat16, v = 0.999 v + 0.001 g^2 rounds back to v, so v never decays."""
    params = model.trainable_parameters()
    optimizer.init(tree_map(lambda p: p.astype(mx.float32), params))
