"""One rank of test_distributed's sharded-optimizer check: every rank makes the same parameters
and gradients, and updates them both with a ShardedOptimizer and with the same optimizer
unsharded (a plain MLX computation in this process); prints one JSON line of what it found."""

import json

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from mlx_lora.config import TrainConfig
from mlx_lora.train.adam8bit import BLOCK
from mlx_lora.train.distributed import join_ranks
from mlx_lora.train.optim import build_optimizer, state_bytes
from mlx_lora.train.sharded import ShardedOptimizer

# Odd sizes (not multiples of 2 or of a block), a bfloat16 weight as full fine-tuning has,
# and lora_a / lora_b names for LoRA+'s second optimizer.
SHAPES = {"embed": (37, 5), "norm": {"weight": (3,)},
          "layers": [{"lora_a": (64, 8), "lora_b": (8, 300)}, {"w": (513,)}]}
CASES = {"adamw": dict(optimizer="adamw", weight_decay=0.1),
         "adamw-8bit": dict(optimizer="adamw-8bit", weight_decay=0.1),
         "adam-8bit lora+": dict(optimizer="adam-8bit", lora_plus_ratio=4.0)}


def tree(seed: int):
    keys = iter(mx.random.split(mx.random.key(seed), 16))
    made = tree_map(lambda shape: mx.random.normal(shape, key=next(keys)), SHAPES,
                    is_leaf=lambda x: isinstance(x, tuple))
    made["layers"][1]["w"] = made["layers"][1]["w"].astype(mx.bfloat16)
    return made


def largest_difference(a, b) -> float:
    a, b = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float(mx.abs(a[k].astype(mx.float32) - b[k].astype(mx.float32)).max())
               for k in a)


def steps(optimizer, params, first: int, last: int):
    for step in range(first, last):
        grads = tree_map(lambda g: g.astype(mx.float32), tree(100 + step))
        updated = optimizer.apply_gradients(grads, params)  # each weight keeps its dtype:
        params = tree_map(lambda new, old: new.astype(old.dtype), updated, params)  # step.py
        mx.eval(params, optimizer.state)
    return params


def run_case(settings: dict, ranks) -> dict:
    config = TrainConfig(learning_rate=1e-2, **settings)
    make = lambda: build_optimizer(config, 10)  # noqa: E731
    align = BLOCK if config.optimizer.endswith("-8bit") else 1
    params = tree(0)
    as_float = tree_map(lambda p: p.astype(mx.float32), params)
    plain, sharded = make(), ShardedOptimizer(make, params, ranks, align)
    plain.init(as_float)
    sharded.init(as_float)
    plain_params, sharded_params = steps(plain, params, 0, 4), steps(sharded, params, 0, 4)
    whole = sharded.gathered_state()
    found = {"params": largest_difference(plain_params, sharded_params),
             "bytes": state_bytes(sharded), "plain_bytes": state_bytes(plain)}
    if ranks.writes:
        found["state"] = largest_difference(plain.state, whole)
    # A run resumed from the whole state (a checkpoint), sharded again: it goes on alike.
    resumed = ShardedOptimizer(make, params, ranks, align)
    resumed.state = plain.state
    resumed.init(as_float)
    found["resumed"] = largest_difference(steps(plain, plain_params, 4, 6),
                                          steps(resumed, sharded_params, 4, 6))
    return found


def main() -> None:
    ranks = join_ranks()
    found = {name: run_case(settings, ranks) for name, settings in CASES.items()}
    print(json.dumps({"rank": ranks.rank, "size": ranks.size, "cases": found}), flush=True)


if __name__ == "__main__":
    main()
