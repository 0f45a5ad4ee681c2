"""Where one training step's time goes: the step in parts, and its ops one by one.

    python benchmarks/profile_step.py [--rows 2] [--width 640] [--loss-positions 1108]

The defaults are an average micro-batch of bench_train's preset (a): the Qwen-shaped model
(hidden 512, 8 layers, vocabulary 151,936) with rank-8 LoRA on every linear, its records
packed into 2 rows of 640 positions, 1,108 of them carrying loss (--mask-prompt: about 370).

Two views, both timed after a warm-up, the best of --repeat runs:
- parts: the compiled gradient step as mlx_lora trains (`make_grad_step`), then the same
  step with the output head's loss replaced by a plain sum of the hidden states (so: body
  only), and the head's chunked loss with its gradient alone. head + body ~ step.
- ops: each kind of op of the step at its real shapes, times the number of times a step runs
  it (forward and backward), as a share of the measured step. MLX has no per-op profiler on
  the CPU, so this is a sum of isolated timings: it names the costly ops, it does not add
  up to the step exactly (the step fuses some elementwise ops and overlaps nothing).
The model FLOPs of the step (bench_train's count, model_flops.py) over its time, against a
float32 2048x2048 GEMM measured in the same run, close it. The last line is one JSON object.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from bench_train import qwen_shaped_model
from model_flops import gemm_peak_gflops, model_flops

from mlx_lora.model.allocator import reuse_freed_memory
from mlx_lora.model.blockwise_attention import choose_attention

RECORD = 277  # positions per packed record: preset (a)'s mean record length


def best_ms(fn, *args, repeat: int = 3) -> float:
    """Fastest of `repeat` evaluated calls, after one warm-up call, in milliseconds."""
    mx.eval(fn(*args))
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        mx.eval(fn(*args))
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def lora_model(model_dir: Path, rank: int = 8):
    """The preset's model with rank-8 LoRA on every linear, its split and loss: as trained."""
    from mlx_lora.adapters.inject import inject, make_spec, resolve_targets
    from mlx_lora.adapters.protocol import Hyper
    from mlx_lora.model.head import split_model
    from mlx_lora.model.load import load_base

    model = load_base(str(model_dir)).model
    spec = make_spec(model, "lora", resolve_targets(model, "lora", ""), -1, Hyper(rank, 2.0 * rank))
    inject(model, spec)
    split, why = split_model(model)
    if split is None:
        raise SystemExit(f"the model does not split: {why}")
    return model, split


def step_arrays(rows: int, width: int, loss_positions: int, vocab: int):
    """A packed micro-batch: records of RECORD positions side by side, loss spread evenly."""
    inputs = mx.random.randint(0, vocab, (rows, width), key=mx.random.key(1)).astype(mx.int32)
    segments = mx.broadcast_to(mx.arange(width) // RECORD + 1, (rows, width)).astype(mx.int32)
    positions = mx.linspace(0, rows * width - 1, loss_positions).astype(mx.int32)
    targets = mx.random.randint(0, vocab, (loss_positions,), key=mx.random.key(2)).astype(mx.int32)
    return inputs, segments, positions, targets, mx.ones((loss_positions,))


def parts(model, split, arrays) -> dict[str, float]:
    """ms of the compiled gradient step, of its body alone and of its head alone."""
    from mlx_lora.model.packed_mask import segment_caches
    from mlx_lora.objectives.chunked_ce import chunked_ce
    from mlx_lora.objectives.sft import make_loss
    from mlx_lora.train.step import make_grad_step

    inputs, segments, positions, targets, weights = arrays
    inv_n = mx.array(1.0 / positions.shape[0])
    step = make_grad_step(model, make_loss(model, split, with_grad=True))
    hidden_size = split.backbone(inputs[:, :4]).shape[-1]
    probe = mx.random.normal((positions.shape[0], hidden_size), key=mx.random.key(3))

    def body_loss(inputs, segments, positions, targets, weights):
        hidden = split.backbone(inputs, segment_caches(model, segments))
        return (hidden.reshape(-1, hidden.shape[-1])[positions] * probe).sum(), {}

    body = make_grad_step(model, body_loss)
    head = mx.compile(mx.value_and_grad(
        lambda h: chunked_ce(split, h, targets, weights, with_grad=True)))
    return {"step": best_ms(step, *arrays, inv_n),
            "body (forward + backward, LoRA grads)": best_ms(body, *arrays, inv_n),
            "head (chunked loss + its gradient)": best_ms(head, probe)}


def ops(shape: dict, rows: int, width: int, loss_positions: int, rank: int,
        attention_choice: str) -> list[tuple]:
    """(op, ms per call, calls per step) for each kind of op of a step, at its shapes; the
    attention the run chose counts, the other is shown for comparison (0 calls)."""
    from mlx_lora.model.blockwise_attention import CAUSAL_BLOCK_ROWS
    from mlx_lora.objectives.chunked_ce import _exp, _row_reduce, chunk_size

    tokens, hidden, inter = rows * width, shape["hidden"], shape["intermediate"]
    heads, kv_heads = shape["heads"], shape["kv_heads"]
    layers, vocab = shape["layers"], shape["vocab"]
    head_dim = hidden // heads
    key = iter(mx.random.split(mx.random.key(4), 32))

    def normal(*dims):
        return mx.random.normal(dims, key=next(key))

    x, h = normal(tokens, hidden), normal(tokens, inter)
    table = []

    def gemm(m, k, n, calls, what):
        a, b = normal(m, k), normal(k, n)
        table.append((f"GEMM {m}x{k}x{n} ({what})", best_ms(lambda: a @ b), calls * layers))

    kv = kv_heads * head_dim
    # Frozen linears: forward, and the input gradient in the backward pass.
    gemm(tokens, hidden, hidden, 4, "q, o: forward + input grad")
    gemm(tokens, hidden, kv, 2, "k, v forward")
    gemm(tokens, kv, hidden, 2, "k, v input grad")
    gemm(tokens, hidden, inter, 3, "gate, up forward; down input grad")
    gemm(tokens, inter, hidden, 3, "down forward; gate, up input grad")
    # LoRA: x@A, (xA)@B forward; dy@B.T, dz@A.T, and the grads of A and B: six small GEMMs.
    a_in, b_out = normal(hidden, rank), normal(rank, inter)
    lora = [lambda: x @ a_in, lambda: (x @ a_in) @ b_out, lambda: h @ b_out.T,
            lambda: (h @ b_out.T) @ a_in.T, lambda: x.T @ (h @ b_out.T), lambda: (x @ a_in).T @ h]
    table.append((f"LoRA rank {rank}: six small GEMMs of a 512x1536 layer",
                  sum(best_ms(f) for f in lora), 7 * layers))
    weight = mx.ones((hidden,))
    table.append(("rms_norm", best_ms(lambda: mx.fast.rms_norm(x, weight, 1e-6)), 4 * layers))
    rope = nn.RoPE(head_dim, base=1e6)
    q = normal(rows, heads, width, head_dim)
    k, v = normal(rows, kv_heads, width, head_dim), normal(rows, kv_heads, width, head_dim)
    table.append(("RoPE on queries and keys", best_ms(lambda: rope(q)) + best_ms(lambda: rope(k)),
                  2 * layers))
    mask = mx.tril(mx.ones((width, width), dtype=mx.bool_))[None, None]

    def attention(q, k, v, s=0, e=width):  # query rows s:e over keys :e (all: one fused call)
        return mx.fast.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, :e], v[:, :, :e], scale=head_dim**-0.5, mask=mask[..., s:e, :e])

    def causal_blocks(q, k, v):
        return mx.concatenate([attention(q, k, v, s, min(s + CAUSAL_BLOCK_ROWS, width))
                               for s in range(0, width, CAUSAL_BLOCK_ROWS)], axis=2)

    def forward_backward(fn):
        return mx.compile(mx.grad(lambda q, k, v: (fn(q, k, v) * q).sum(), argnums=(0, 1, 2)))

    blocks = attention_choice == "causal-blocks"
    table.append((f"attention forward, fused ({rows}x{heads}x{width}x{width} scores)",
                  best_ms(attention, q, k, v), 0))
    table.append(("attention forward + backward, fused", best_ms(forward_backward(attention),
                                                                 q, k, v), 0 if blocks else layers))
    table.append((f"attention forward + backward, causal blocks of {CAUSAL_BLOCK_ROWS} rows",
                  best_ms(forward_backward(causal_blocks), q, k, v), layers if blocks else 0))
    scores = normal(rows, heads, width, width)
    table.append(("  of which one softmax over the scores",
                  best_ms(lambda: mx.softmax(scores, axis=-1, precise=True)), 0))
    table.append(("SwiGLU silu(gate) * up: forward", best_ms(lambda: nn.silu(h) * h), layers))
    table.append(("SwiGLU: backward", best_ms(mx.grad(lambda h: (nn.silu(h) * h).sum()), h),
                  layers))
    size = chunk_size(vocab)
    chunks = -(-loss_positions // size)
    w, hp, logits = normal(vocab, hidden) * 0.02, normal(size, hidden), normal(size, vocab)
    table.append((f"head GEMM {size}x{hidden}x{vocab} (logits)", best_ms(lambda: hp @ w.T), chunks))
    table.append((f"head GEMM {size}x{vocab}x{hidden} (input grad)", best_ms(lambda: logits @ w),
                  chunks))
    table.append((f"head max over ({size}, {vocab})",
                  best_ms(lambda: _row_reduce(mx.max, logits)), chunks))
    table.append((f"head exp(logits - max) over ({size}, {vocab})",
                  best_ms(mx.compile(lambda x: _exp(x - 1.0)), logits), chunks))
    table.append((f"head sum over ({size}, {vocab})", best_ms(lambda: _row_reduce(mx.sum, logits)),
                  chunks))
    return table


def step_records(rows: int, width: int, loss_positions: int) -> list[tuple[int, int]]:
    """The micro-batch as model_flops counts it: (tokens, loss positions) per record."""
    share = loss_positions / (rows * width)
    lengths = [min(RECORD, width - start) for start in range(0, width, RECORD)] * rows
    return [(n + 1, round(n * share)) for n in lengths]


def model_shape(model) -> dict:
    args = model.args
    return {"hidden": args.hidden_size, "intermediate": args.intermediate_size,
            "heads": args.num_attention_heads, "kv_heads": args.num_key_value_heads,
            "layers": args.num_hidden_layers, "vocab": args.vocab_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--loss-positions", type=int, default=1108)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    model_dir = qwen_shaped_model(Path(tempfile.gettempdir()) / "mlx_lora_bench" / "qwen-512x8")
    reuse_freed_memory()  # as a training run does
    model, split = lora_model(model_dir, args.rank)
    # The attention a run of these rows takes (auto), said as the run says it.
    attention_choice, line = choose_attention(model, list(model.layers), "auto", args.width,
                                              True, None)
    print(line)
    shape = model_shape(model)
    arrays = step_arrays(args.rows, args.width, args.loss_positions, shape["vocab"])
    peak = gemm_peak_gflops()
    timed = parts(model, split, arrays)
    step_ms = timed["step"]
    print("| part | ms | share of the step |\n| --- | ---: | ---: |")
    for name, ms in timed.items():
        print(f"| {name} | {ms:.0f} | {ms / step_ms:.0%} |")
    table = ops(shape, args.rows, args.width, args.loss_positions, args.rank,
                attention_choice)
    print("\n| op | ms per call | calls per step | ms per step | share of the step |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for name, ms, calls in sorted(table, key=lambda row: -row[1] * row[2]):
        print(f"| {name} | {ms:.2f} | {calls} | {ms * calls:.0f} | {ms * calls / step_ms:.0%} |")
    config = json.loads((model_dir / "config.json").read_text())
    gflops = model_flops(config, step_records(args.rows, args.width, args.loss_positions),
                         args.rank) / step_ms / 1e6
    print(json.dumps({"step_ms": round(step_ms, 1),
                      "parts_ms": {name: round(ms, 1) for name, ms in timed.items()},
                      "model_gflops_per_s": round(gflops, 1),
                      "gemm_peak_gflops_per_s": round(peak, 1),
                      "gemm_peak_ratio": round(gflops / peak, 3)}))


if __name__ == "__main__":
    main()
