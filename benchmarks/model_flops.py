"""Yardsticks for bench_train.py: a LoRA training step's model FLOPs, counted from the model's
shapes, and what a float32 matmul reaches on this machine."""

import time


def model_flops(config: dict, records: list[tuple[int, int]], rank: int) -> int:
    """Model FLOPs of one LoRA training pass (forward and backward) over `records`, each given
    as (tokens, positions that carry loss), from the shapes in a Hugging Face config.json.

    This is the model's work, not an implementation's, and the same count for every side. A
    record of n tokens has n - 1 input positions. At every input position, every block's
    linears (q, k, v, o, gate, up, down; in x out each) cost 2 x in x out forward and as much
    again for the gradient of their input (frozen weights need no weight gradient); each
    linear's LoRA pair costs 6 x rank x (in + out): forward, input and weight gradients.
    Attention counts the causal half: the (query, key) pairs with key <= query inside a record
    (records packed into one row do not attend to each other), 4 x heads x head_dim per pair
    forward (scores, then the weighted values) and twice that backward. The output head
    (hidden x vocab) runs only at positions that carry loss: 4 x hidden x vocab each, forward
    and the gradient of its input. Not counted: norms, rotary embeddings, activations, the
    softmax and the optimizer (elementwise, under 1% of the total on the Qwen-shaped presets).
    """
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    mlp = config["intermediate_size"]
    linears = [(hidden, heads * head_dim), (hidden, kv_heads * head_dim),
               (hidden, kv_heads * head_dim), (heads * head_dim, hidden),
               (hidden, mlp), (hidden, mlp), (mlp, hidden)]
    per_position = layers * sum(4 * n_in * n_out + 6 * rank * (n_in + n_out)
                                for n_in, n_out in linears)
    per_pair = layers * 12 * heads * head_dim
    per_loss_position = 4 * hidden * config["vocab_size"]
    total = 0
    for tokens, loss_positions in records:
        positions = tokens - 1
        total += (positions * per_position + positions * (positions + 1) // 2 * per_pair
                  + loss_positions * per_loss_position)
    return total


def gemm_peak_gflops(n: int = 2048, warmup: int = 2, repeats: int = 8) -> float:
    """GFLOP/s of one float32 (n, n) @ (n, n) matmul in MLX (2 n^3 FLOPs), the best of
    `repeats` timed runs after `warmup` untimed ones: what this machine's matmul reaches now."""
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    best = float("inf")
    for i in range(warmup + repeats):
        started = time.perf_counter()
        mx.eval(a @ b)
        if i >= warmup:
            best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9
