"""QLoRA's frozen matmuls: MLX's quantized matmul, or the weight dequantized for a float GEMM.

Which is faster depends on the backend, so it is measured, never assumed: on Apple silicon
mx.quantized_matmul is fast; on MLX's CPU backend it is several times slower than
dequantizing the weight and multiplying in float through BLAS. A run times a forward and
backward pass of both on each distinct shape at its own token count, and each frozen
quantized layer takes the faster one.

On the dequantize path the float weight is transient: made for a layer's forward matmul and
made again for its backward one (the input's gradient; the weights are frozen), never kept in
between, so the packed weights stay the only resident copy. A dequantized output head is made
once per loss (model/head.py, objectives/chunked_ce.py), which needs no backward matmul.
Such a layer is the same object with a subclass of MLX's class as its class; its parameters
and their names do not change, so saving, fusing and exports see the same model.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import mlx.core as mx
import mlx.nn as nn

REPEATS = 2  # timed passes per path after the first (which compiles); the fastest counts
SLOWER = 2.0  # a path this many times slower on its first pass is not timed again
MAX_TIMED_OUTPUTS = 16384  # a wider layer (an output head) is timed on this many outputs


@cache
def _matmul(group_size: int, bits: int, mode: str) -> Callable:
    """(x, weight, scales[, biases]) -> x @ dequantize(weight).T; its vjp gives x's gradient."""

    def dequantize(weight, scales, *biases):
        return mx.dequantize(weight, scales, *biases, group_size=group_size, bits=bits, mode=mode)

    # Each dequantize depends on the matmul's other operand: MLX would otherwise schedule every
    # layer's dequantize early, all float weights alive at once (measured), and mx.compile
    # would merge the forward's and the backward's into one, kept alive in between.
    @mx.custom_function
    def matmul(x, weight, *rest):
        return x @ dequantize(mx.depends(weight, x), *rest).T

    @matmul.vjp
    def matmul_vjp(primals, dy, _):
        _, weight, *rest = primals
        dx = dy @ dequantize(mx.depends(weight, dy), *rest)
        return (dx, *(mx.zeros_like(a) for a in primals[1:]))  # frozen: never evaluated

    return matmul


def _quantized(layer: nn.Module) -> tuple[mx.array, ...]:
    biases = layer.get("biases")
    return (layer["weight"], layer["scales"]) + (() if biases is None else (biases,))


def dequantized(layer: nn.Module) -> mx.array:
    """The (output, input) float weight of a quantized linear or embedding."""
    return mx.dequantize(*_quantized(layer), group_size=layer.group_size, bits=layer.bits,
                         mode=layer.mode)


def _dims(layer: nn.Module) -> tuple[int, int]:
    output_dims, packed_dims = layer["weight"].shape
    return packed_dims * 32 // layer.bits, output_dims


def dequantized_matmul(layer: nn.Module, x: mx.array) -> mx.array:
    """x @ W.T for the layer's weight W, dequantized on the fly (no bias)."""
    return _matmul(layer.group_size, layer.bits, layer.mode)(x, *_quantized(layer))


class DequantizingLinear(nn.QuantizedLinear):
    """A QuantizedLinear that multiplies by its weight dequantized (the same parameters)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = dequantized_matmul(self, x)
        return y + self["bias"] if "bias" in self else y


class DequantizingEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose as_linear (a tied output head) multiplies dequantized."""

    def as_linear(self, x: mx.array) -> mx.array:
        return dequantized_matmul(self, x)


DEQUANTIZING = {nn.QuantizedLinear: DequantizingLinear,
                nn.QuantizedEmbedding: DequantizingEmbedding}


@dataclass(frozen=True)
class MatmulChoice:
    """What the run's frozen quantized layers multiply with."""

    setting: str  # recorded: quantized or dequantize when every layer took it, else auto
    line: str | None  # the run's line about it; None for a model with no quantized layer


def time_paths(layer: nn.Module, tokens: int) -> dict[str, float]:
    """Seconds of a compiled forward and backward (x's gradient) through the layer's weight on
    each path, for `tokens` rows."""
    input_dims, output_dims = _dims(layer)
    timed = min(output_dims, MAX_TIMED_OUTPUTS)  # past this, both grow linearly in outputs
    arrays = [a[:timed] for a in _quantized(layer)]
    dtype = layer["scales"].dtype
    x_key, dy_key = mx.random.split(mx.random.key(0))  # a key of its own: the run's is untouched
    x = mx.random.normal((tokens, input_dims), key=x_key).astype(dtype)
    dy = mx.random.normal((tokens, timed), key=dy_key).astype(dtype)
    quantization = {"group_size": layer.group_size, "bits": layer.bits, "mode": layer.mode}
    forwards = {
        "quantized": lambda x: mx.quantized_matmul(x, *arrays, transpose=True, **quantization),
        "dequantize": lambda x: _matmul(layer.group_size, layer.bits, layer.mode)(x, *arrays),
    }
    steps = {path: mx.compile(lambda x, dy, forward=forward: mx.vjp(forward, [x], [dy]))
             for path, forward in forwards.items()}
    seconds = {path: _seconds(step, x, dy) for path, step in steps.items()}  # compiles, too
    # Compiling one matmul takes milliseconds: a path whose first pass took SLOWER times the
    # other's is decided without timing it again.
    close = SLOWER * min(seconds.values())
    for path, step in steps.items():
        if seconds[path] < close:
            seconds[path] = min(_seconds(step, x, dy) for _ in range(REPEATS))
    return {path: value * output_dims / timed for path, value in seconds.items()}


def _seconds(step: Callable, *args) -> float:
    started = time.perf_counter()
    mx.eval(step(*args))
    return time.perf_counter() - started


def choose_matmul(model: nn.Module, setting: str, tokens: int, head: nn.Module | None = None,
                  head_tokens: int = 0, timer=time_paths) -> MatmulChoice:
    """Put each frozen quantized layer on the quantized or the dequantize path, as `setting`
    says (auto: the faster, timed by `timer` once per distinct shape).

    tokens: rows of a training step's matmuls; head: the output head, whose matmul sees
    head_tokens rows at a time (a chunk of the loss), when it is quantized.
    """
    layers = [(m, tokens) for m in model.modules()
              if type(m) is nn.QuantizedLinear and m is not head]
    if head is not None and type(head) in DEQUANTIZING:
        layers.append((head, min(tokens, head_tokens)))
    if not layers:
        return MatmulChoice(setting, None)
    started = time.perf_counter()
    timings: dict[tuple, dict[str, float]] = {}  # shape -> seconds per path
    taken = {"quantized": [], "dequantize": []}  # path -> the timings of its layers
    for layer, rows in layers:
        if setting == "auto":
            shape = (rows, *_dims(layer), layer.bits, layer.group_size, layer.mode,
                     layer["scales"].dtype)
            if shape not in timings:
                timings[shape] = timer(layer, rows)
            seconds = timings[shape]
            path = min(seconds, key=seconds.get)
        else:
            seconds, path = None, setting
        if path == "dequantize":
            layer.__class__ = DEQUANTIZING[type(layer)]
        taken[path].append(seconds)
    return MatmulChoice(_recorded(setting, taken), _line(setting, taken, len(timings),
                                                          time.perf_counter() - started))


def _recorded(setting: str, taken: dict[str, list]) -> str:
    paths = [path for path, layers in taken.items() if layers]
    return paths[0] if len(paths) == 1 else setting


def _line(setting: str, taken: dict[str, list], n_shapes: int, elapsed: float) -> str:
    counts = (f"dequantize-then-GEMM for {len(taken['dequantize'])} layers, "
              f"quantized for {len(taken['quantized'])}")
    if setting != "auto":
        return f"qlora matmul: {counts} (--qlora-matmul {setting})"
    all_quantized = sum(s["quantized"] for layers in taken.values() for s in layers)
    chosen = sum(s[path] for path, layers in taken.items() for s in layers)
    return (f"qlora matmul: {counts} ({n_shapes} shapes timed in {elapsed:.0f}s; "
            f"{all_quantized / chosen:.1f}x the speed of quantized for all)")


def quantized_again(model: nn.Module) -> None:
    """Put every layer back on MLX's quantized matmul (for generation: a few rows per call)."""
    for module in model.modules():
        for base, dequantizing in DEQUANTIZING.items():
            if type(module) is dequantizing:
                module.__class__ = base
