"""Fold adapters into the base and save a model directory that mlx_lm.load serves.

A quantized base cannot just be re-quantized after adding the update: a LoRA update is
usually far smaller than the quantization step, so rounding W + delta back to the base's grid
puts most weights where they were and the fine-tune is gone (what mlx-lm's fuse does). So each
adapted layer is kept at the first of (the base's bits, 8 bits, float) at which its update
survives: ||saved - base - delta|| / ||delta|| <= tolerance.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.utils import dequantize_model

from mlx_lora.adapters.inject import adapter_layers
from mlx_lora.adapters.lora import dequantized_weight
from mlx_lora.config import FuseConfig
from mlx_lora.console import status
from mlx_lora.errors import UserError
from mlx_lora.formats.convert import adapter_method, load_any_adapter
from mlx_lora.formats.model_dir import check_save_path, remove_stale_partials, write_model_dir
from mlx_lora.formats.output_dir import exclusive
from mlx_lora.model.adapted import load_base_for
from mlx_lora.model.quantize import quantize_base

FUSE = FuseConfig()
PROBE_TEXT = "Once upon a time, the quick brown fox jumped over the lazy dog. 1 2 3"
PROBE_TOKENS = 16
@dataclass(frozen=True)
class LayerChoice:
    """How one adapted layer was saved, and how much of its update that keeps."""

    path: str
    precision: str  # "4-bit", "8-bit", "float16", ...
    error: float  # ||saved - base - delta|| / ||delta||: 0 keeps all of the update, 1 none
    base_bits_error: float | None  # the same for a plain re-quantization at the target bits


@dataclass(frozen=True)
class FuseResult:
    """Where the fused model went and what the fuse cost."""

    save_path: Path
    layers: tuple[LayerChoice, ...]
    max_logit_diff: float  # fused vs base + adapter, on the probe tokens
    adapter_effect: float  # max |base + adapter - base| on the same logits
    bound: float  # what the fuse promises max_logit_diff stays under
    probe_tokens: int  # how many tokens the logits were compared on


def relative_error(saved: mx.array, base: mx.array, delta: mx.array) -> float:
    """||saved - base - delta|| / ||delta||, in float32."""
    miss = saved.astype(mx.float32) - base - delta
    return (mx.linalg.norm(miss) / mx.maximum(mx.linalg.norm(delta), 1e-30)).item()


def _float_linear(weight: mx.array, bias: mx.array | None) -> nn.Linear:
    output_dims, input_dims = weight.shape
    linear = nn.Linear(input_dims, output_dims, bias=bias is not None)
    linear.weight = weight
    if bias is not None:
        linear.bias = bias
    return linear


def fused_linear(adapter) -> nn.Linear:
    """A float nn.Linear equal to base + adapter, in the base's compute dtype."""
    dtype = dequantized_weight(adapter.linear).dtype
    return _float_linear(adapter.fused_weight().astype(dtype), adapter.fused_bias())


def bit_candidates(bits: int, group_size: int, mode: str) -> list[tuple[int, int, str]]:
    """Precisions to try for an adapted layer, in order: `bits`, then 8 bits (float after)."""
    return [(bits, group_size, mode)] + ([(8, group_size, "affine")] if bits < 8 else [])


def fold(model: nn.Module) -> dict[str, tuple[mx.array, mx.array, nn.Module]]:
    """Replace every adapter by a float layer equal to base + adapter (in the base's dtype).

    Returns, per path, the base weight and the fused weight in float32, and the base layer.
    """
    folded, swapped = {}, []
    for path, module in adapter_layers(model):
        w0 = dequantized_weight(module.linear).astype(mx.float32)
        folded[path] = (w0, module.fused_weight(), module.linear)
        swapped.append((path, fused_linear(module)))
    model.update_modules(tree_unflatten(swapped))
    return folded


def choose_precisions(model: nn.Module, folded: dict, candidates_for: Callable,
                      tolerance: float) -> tuple[list[LayerChoice], dict]:
    """Keep each fused layer at the first candidate precision its update survives, else float.

    Returns the choices and, per path, what config.json's "quantization" must say for mlx-lm
    to rebuild the layer: a {group_size, bits, mode} dict, or False (float); nothing where
    the first candidate (the model's default) was kept.
    """
    modules = dict(model.named_modules())
    choices, entries, swapped = [], {}, []
    for path, (w0, fused, base) in folded.items():
        candidates = candidates_for(base)
        if _unchanged_quantized(base, w0, fused, candidates):  # stays bit for bit
            layer, choice = base, LayerChoice(path, f"{base.bits}-bit", 0.0, 0.0)
        else:
            layer, choice = _first_surviving(path, w0, fused, modules[path], candidates,
                                             tolerance)
        if candidates and choice.precision != f"{candidates[0][0]}-bit":
            entries[path] = (False if isinstance(layer, nn.Linear) else
                             {"group_size": layer.group_size, "bits": layer.bits,
                              "mode": layer.mode})
        if layer is not modules[path]:
            swapped.append((path, layer))
        choices.append(choice)
    model.update_modules(tree_unflatten(swapped))
    return choices, entries


def _unchanged_quantized(base: nn.Module, w0: mx.array, fused: mx.array,
                         candidates: list) -> bool:
    """A quantized base layer whose adapter adds nothing, to be kept at its own precision."""
    return (isinstance(base, nn.QuantizedLinear) and bool(candidates)
            and candidates[0] == (base.bits, base.group_size, base.mode)
            and not mx.any(fused != w0).item())


def _first_surviving(path: str, w0: mx.array, fused: mx.array, target: nn.Linear,
                     candidates: list, tolerance: float) -> tuple[nn.Module, LayerChoice]:
    delta = fused - w0
    first_error = None
    for bits, group_size, mode in candidates:
        try:
            layer = nn.QuantizedLinear.from_linear(target, group_size, bits, mode)
        except ValueError:  # e.g. a group size that affine 8-bit does not support
            continue
        error = relative_error(dequantized_weight(layer), w0, delta)
        first_error = error if first_error is None else first_error
        if error <= tolerance:
            return layer, LayerChoice(path, f"{bits}-bit", error, first_error)
    error = relative_error(target.weight, w0, delta)
    return target, LayerChoice(path, _dtype_name(target.weight.dtype), error, first_error)


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def set_precision(model: nn.Module, config: dict, folded: dict, dequantize: bool, quantize: int,
                  group_size: int, tolerance: float) -> tuple[dict, list[LayerChoice]]:
    """The fused model's precision, and the config.json that describes it.

    Unadapted layers keep the base's precision, or all go to float (dequantize) or to
    `quantize` bits; each adapted layer goes to the first precision its update survives.
    """
    config = dict(config)
    if dequantize or quantize:
        dequantize_model(model)
        # A float config has no quantization keys, so transformers loads it too.
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if quantize:
        config["quantization"] = quantize_base(model, quantize, group_size, skip=set(folded))
        choices, entries = choose_precisions(
            model, folded, lambda base: bit_candidates(quantize, group_size, "affine"), tolerance)
    else:
        choices, entries = choose_precisions(model, folded, lambda base: [] if dequantize else (
            bit_candidates(base.bits, base.group_size, base.mode)
            if isinstance(base, nn.QuantizedLinear) else []), tolerance)
    if entries:
        config["quantization"] = {**config["quantization"], **entries}
    return config, choices


def probe_logits(model: nn.Module, ids: list[int]) -> mx.array:
    """Float32 logits (L, V) of one sequence."""
    logits = model(mx.array(ids)[None]).astype(mx.float32)  # (1, L, V)
    mx.eval(logits)
    return logits[0]


def fuse(model: str, adapter_path: str, save_path: str = FUSE.save_path, *,
         dequantize: bool = FUSE.dequantize, quantize: int = FUSE.quantize,
         group_size: int = FUSE.group_size, tolerance: float = FUSE.delta_tolerance,
         overwrite: bool = False, trust_remote_code: bool = False) -> FuseResult:
    """Fuse `adapter_path` into `model` and write the result to `save_path`."""
    if dequantize and quantize:
        raise UserError("--dequantize and --quantize exclude each other; pick one")
    check_fusable(Path(adapter_path))
    save_path = Path(save_path)
    local = [Path(model)] if Path(model).exists() else []  # a Hub id resolves on load
    check_save_path(save_path, [Path(adapter_path), *local], overwrite)
    with exclusive(save_path, "mlx-lora fuse"):
        remove_stale_partials(save_path)
        result = _fuse(model, adapter_path, save_path, dequantize, quantize, group_size,
                       tolerance, overwrite, trust_remote_code)
    report(result, tolerance)
    return result


def check_fusable(adapter_path: Path) -> None:
    """Refuse, before anything loads, an adapter that no plain model can hold."""
    method = adapter_method(adapter_path)
    if method is not None and not method.fusable:
        what = ("puts virtual tokens before every sequence" if method.virtual else
                "adds a nonlinear function of the hidden states")
        raise UserError(f"{adapter_path}: {method.name} {what}, which no weight of the base can "
                        "hold, so it cannot be fused; use it as it is (mlx-lora generate, eval "
                        "or serve)")


def _fuse(model: str, adapter_path: str, save_path: Path, dequantize: bool, quantize: int,
          group_size: int, tolerance: float, overwrite: bool,
          trust_remote_code: bool) -> FuseResult:
    loaded = load_base_for(model, adapter_path, trust_remote_code)
    check_save_path(save_path, [loaded.model_path], overwrite)
    net = loaded.model
    probe = list(loaded.tokenizer.encode(PROBE_TEXT))[:PROBE_TOKENS] or [0]
    base_logits = probe_logits(net, probe)
    load_any_adapter(net, Path(adapter_path))
    net.eval()
    adapted_logits = probe_logits(net, probe)
    folded = fold(net)
    config, choices = set_precision(net, loaded.config, folded, dequantize, quantize,
                                    group_size, tolerance)
    fused_logits = probe_logits(net, probe)
    write_model_dir(save_path, net, config, loaded.model_path, overwrite)
    effect = mx.abs(adapted_logits - base_logits).max().item()
    result = FuseResult(
        save_path=save_path, layers=tuple(choices),
        max_logit_diff=mx.abs(fused_logits - adapted_logits).max().item(),
        adapter_effect=effect, bound=float("inf") if quantize else tolerance * effect,
        probe_tokens=len(probe),
    )
    return result


def report(result: FuseResult, tolerance: float) -> None:
    """Tell the person on stderr how each layer was kept and what the fuse cost."""
    counts: dict[str, int] = {}
    for choice in result.layers:
        counts[choice.precision] = counts.get(choice.precision, 0) + 1
    kept = ", ".join(f"{n} at {p}" for p, n in counts.items())
    status(f"fused {len(result.layers)} adapted layers: {kept}" if result.layers else
           "no adapter layer to fold: the fine-tune's trained weights replace the base's")
    naive = sorted(c.base_bits_error for c in result.layers if c.base_bits_error is not None)
    if naive:
        worst = max(c.error for c in result.layers)
        status(f"relative error of the saved updates: at most {worst:.3g} (tolerance "
            f"{tolerance:g}); re-quantizing them all at the target bits, as mlx_lm.fuse "
            f"does, would miss them by {naive[len(naive) // 2]:.0%} (median)")
    status(f"max |logit diff| fused vs base+adapter on {result.probe_tokens} tokens: "
        f"{result.max_logit_diff:.3g} (the adapter itself moves them by up to "
        f"{result.adapter_effect:.3g})")
    if result.max_logit_diff > result.bound:
        hint = "; --dequantize keeps the update exactly" if naive else ""
        status(f"warning: that is more than {tolerance:g} of the adapter's effect{hint}")
