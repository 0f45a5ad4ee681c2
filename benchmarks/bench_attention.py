"""Peak memory and step time of one compiled gradient step: fused, blockwise, causal blocks.

    python benchmarks/bench_attention.py [--lengths 256,512,1024,2048] [--layers 4] [--repeats 3]

A random Qwen2-shaped model with preset (a)'s blocks (bench_train.py: hidden 512, 8 heads, 4
KV, MLP 1536), vocabulary 1000 so the head does not matter, LoRA rank 8 on every linear,
float32, batch 1; the step is train/step.py's. The models run in one process, their steps
alternating, so the machine's load falls on all alike. Ratios are against fused. The last line
is one JSON object.
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen2

from mlx_lora.adapters.inject import inject, make_spec
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.model.blockwise_attention import attention_modules, blockwise_attention
from mlx_lora.train.step import make_grad_step

VOCAB = 1000


MODES = ("fused", "blockwise", "causal-blocks")


def grad_step(layers: int, mode: str):
    """The compiled gradient step of a fresh model (the same weights every time)."""
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs(
        model_type="qwen2", hidden_size=512, num_hidden_layers=layers, intermediate_size=1536,
        num_attention_heads=8, rms_norm_eps=1e-6, vocab_size=VOCAB, num_key_value_heads=4))
    inject(model, make_spec(model, "lora", "all-linear", -1, Hyper(8, 16.0, 0.0, False,
                                                                   "default")))
    mx.eval(model.parameters())
    if mode != "fused":
        blockwise_attention(attention_modules(model.layers), recompute=mode == "blockwise")

    def loss(ids):
        logits = model(ids[:, :-1])  # (1, L, V)
        return nn.losses.cross_entropy(logits, ids[:, 1:]).sum(), mx.array(0)

    return make_grad_step(model, loss)


def measure(length: int, layers: int, repeats: int) -> dict:
    """Peak memory above the weights (MiB) and step times (s) of each attention."""
    steps = {mode: grad_step(layers, mode) for mode in MODES}
    ids, inv_n = mx.random.randint(0, VOCAB, (1, length + 1)), mx.array(1.0 / length)
    for step in steps.values():
        mx.eval(step(ids, inv_n))  # compiled, and run once
    times, peaks = {name: [] for name in steps}, {}
    for _ in range(repeats):
        for name, step in steps.items():
            mx.synchronize()
            mx.clear_cache()
            mx.reset_peak_memory()
            before = mx.get_active_memory()
            started = time.perf_counter()
            mx.eval(step(ids, inv_n))
            times[name].append(time.perf_counter() - started)
            peaks[name] = (mx.get_peak_memory() - before) / 2**20
    return {"length": length, "layers": layers,
            **{f"{name}_peak_mib": round(peaks[name]) for name in steps},
            **{f"{name}_step_s": round(statistics.median(times[name]), 3) for name in steps},
            **{f"{name}_memory_ratio": round(peaks[name] / peaks["fused"], 3)
               for name in MODES[1:]},
            **{f"{name}_time_ratio": round(statistics.median(times[name])
                                          / statistics.median(times["fused"]), 3)
               for name in MODES[1:]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,512,1024,2048")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for length in map(int, args.lengths.split(",")):
        rows.append(measure(length, args.layers, args.repeats))
        row = rows[-1]
        print(f"length {length}: fused {row['fused_peak_mib']} MiB; " + "; ".join(
            f"{name} {row[f'{name}_peak_mib']} MiB ({row[f'{name}_memory_ratio']}x), time "
            f"{row[f'{name}_time_ratio']}x" for name in MODES[1:]), flush=True)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
