"""Fold adapters into the base and save a model directory that mlx_lm.load serves.

A quantized base cannot just be re-quantized after adding the update: a LoRA update is
usually far smaller than the quantization step, so rounding W + delta back to the base's grid
puts most weights where they were and the fine-tune is gone (what mlx-lm's fuse does). So each
adapted layer is kept at the first of (the base's bits, 8 bits, float) at which its update
survives: ||saved - base - delta|| / ||delta|| <= tolerance.
"""

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.utils import dequantize_model, save_config, save_model

from mlx_lora.adapters.inject import adapter_layers
from mlx_lora.adapters.lora import dequantized_weight
from mlx_lora.config import FuseConfig
from mlx_lora.console import status
from mlx_lora.errors import UserError
from mlx_lora.formats.convert import load_any_adapter
from mlx_lora.model.adapted import load_base_for
from mlx_lora.model.quantize import quantize_base

FUSE = FuseConfig()
PROBE_TEXT = "Once upon a time, the quick brown fox jumped over the lazy dog. 1 2 3"
PROBE_TOKENS = 16
# What mlx_lm.load and transformers read besides the weights and config.json (a model's
# own code too, as mlx-lm's save copies it; it runs only where the user trusts it).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*",
                   "merges.txt", "*.tiktoken", "tiktoken.model", "chat_template*", "*.jinja",
                   "generation_config.json", "*.py")


@dataclass(frozen=True)
class LayerChoice:
    """How one adapted layer was saved, and how much of its update that keeps."""

    path: str
    precision: str  # "4-bit", "8-bit", "float16", ...
    error: float  # ||saved - base - delta|| / ||delta||: 0 keeps all of the update, 1 none
    base_bits_error: float | None  # the same for a plain re-quantization at the base's bits


@dataclass(frozen=True)
class FuseResult:
    """Where the fused model went and what the fuse cost."""

    save_path: Path
    layers: tuple[LayerChoice, ...]
    max_logit_diff: float  # fused vs base + adapter, on the probe tokens
    adapter_effect: float  # max |base + adapter - base| on the same logits
    bound: float  # what the fuse promises max_logit_diff stays under


def relative_error(saved: mx.array, base: mx.array, delta: mx.array) -> float:
    """||saved - base - delta|| / ||delta||, in float32."""
    miss = saved.astype(mx.float32) - base - delta
    return (mx.linalg.norm(miss) / mx.maximum(mx.linalg.norm(delta), 1e-30)).item()


def _float_linear(weight: mx.array, like: nn.Module) -> nn.Linear:
    output_dims, input_dims = weight.shape
    linear = nn.Linear(input_dims, output_dims, bias="bias" in like)
    linear.weight = weight
    if "bias" in like:
        linear.bias = like.bias
    return linear


def fused_linear(adapter) -> nn.Linear:
    """A float nn.Linear equal to base + adapter, in the base's compute dtype."""
    dtype = dequantized_weight(adapter.linear).dtype
    return _float_linear(adapter.fused_weight().astype(dtype), adapter.linear)


def fold_quantized(path: str, adapter, tolerance: float) -> tuple[nn.Module, LayerChoice, object]:
    """The adapted quantized layer at the first precision keeping its update, and its config entry.

    The entry is what config.json's "quantization" must say about `path` for mlx-lm to
    rebuild the layer: None (the base's default), a {group_size, bits, mode} dict, or False.
    """
    base = adapter.linear
    w0 = dequantized_weight(base)
    dtype = w0.dtype
    w0 = w0.astype(mx.float32)
    fused = adapter.fused_weight()
    delta = fused - w0
    if not mx.any(delta).item():  # nothing to fold: the base layer stays bit for bit
        return base, LayerChoice(path, f"{base.bits}-bit", 0.0, 0.0), None
    target = _float_linear(fused.astype(dtype), base)
    candidates = [(base.bits, base.group_size, base.mode)]
    if base.bits < 8:
        candidates.append((8, base.group_size, "affine"))
    base_bits_error = None
    for bits, group_size, mode in candidates:
        try:
            layer = nn.QuantizedLinear.from_linear(target, group_size, bits, mode)
        except ValueError:  # e.g. a group size that affine 8-bit does not support
            continue
        error = relative_error(dequantized_weight(layer), w0, delta)
        if bits == base.bits:
            base_bits_error = error
        if error <= tolerance:
            entry = None if bits == base.bits else {"group_size": group_size, "bits": bits,
                                                    "mode": mode}
            return layer, LayerChoice(path, f"{bits}-bit", error, base_bits_error), entry
    error = relative_error(target.weight, w0, delta)
    return target, LayerChoice(path, _dtype_name(dtype), error, base_bits_error), False


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def fold(model: nn.Module, tolerance: float,
         keep_quantized: bool) -> tuple[list[LayerChoice], dict]:
    """Replace every adapter by a plain layer; return the choices and config entries per path.

    keep_quantized: quantized bases stay quantized where the update survives (else float).
    """
    swapped, choices, entries = [], [], {}
    for path, module in adapter_layers(model):
        if keep_quantized and isinstance(module.linear, nn.QuantizedLinear):
            layer, choice, entry = fold_quantized(path, module, tolerance)
            if entry is not None:
                entries[path] = entry
        else:
            layer = fused_linear(module)
            w0 = dequantized_weight(module.linear).astype(mx.float32)
            error = relative_error(layer.weight, w0, module.fused_weight() - w0)
            choice = LayerChoice(path, _dtype_name(layer.weight.dtype), error, None)
        swapped.append((path, layer))
        choices.append(choice)
    model.update_modules(tree_unflatten(swapped))
    return choices, entries


def set_precision(model: nn.Module, config: dict, entries: dict, dequantize: bool,
                  quantize: int, group_size: int) -> dict:
    """Finish the fused model's precision; return the config.json that describes it."""
    config = dict(config)
    if dequantize or quantize:
        dequantize_model(model)
        # A float config has no quantization keys, so transformers loads it too.
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        if quantize:
            config["quantization"] = quantize_base(model, quantize, group_size)
    elif entries:
        config["quantization"] = {**config["quantization"], **entries}
    return config


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
    save_path = Path(save_path)
    local = [Path(model)] if Path(model).exists() else []  # a Hub id resolves on load
    _check_save_path(save_path, [Path(adapter_path), *local], overwrite)
    loaded = load_base_for(model, adapter_path, trust_remote_code)
    _check_save_path(save_path, [loaded.model_path], overwrite)
    net = loaded.model
    probe = list(loaded.tokenizer.encode(PROBE_TEXT))[:PROBE_TOKENS] or [0]
    base_logits = probe_logits(net, probe)
    load_any_adapter(net, Path(adapter_path))
    net.eval()
    adapted_logits = probe_logits(net, probe)
    keep_quantized = not (dequantize or quantize)
    choices, entries = fold(net, tolerance, keep_quantized)
    config = set_precision(net, loaded.config, entries, dequantize, quantize, group_size)
    fused_logits = probe_logits(net, probe)
    write_model_dir(save_path, net, config, loaded.model_path, overwrite)
    effect = mx.abs(adapted_logits - base_logits).max().item()
    result = FuseResult(
        save_path=save_path, layers=tuple(choices),
        max_logit_diff=mx.abs(fused_logits - adapted_logits).max().item(),
        adapter_effect=effect, bound=float("inf") if quantize else tolerance * effect,
    )
    report(result, tolerance, len(probe))
    return result


def report(result: FuseResult, tolerance: float, n_tokens: int) -> None:
    """Tell the person on stderr how each layer was kept and what the fuse cost."""
    counts: dict[str, int] = {}
    for choice in result.layers:
        counts[choice.precision] = counts.get(choice.precision, 0) + 1
    kept = ", ".join(f"{n} at {p}" for p, n in counts.items())
    status(f"fused {len(result.layers)} adapted layers: {kept}")
    naive = sorted(c.base_bits_error for c in result.layers if c.base_bits_error is not None)
    if naive:
        worst = max(c.error for c in result.layers)
        status(f"relative error of the saved updates: at most {worst:.3g} (tolerance "
            f"{tolerance:g}); re-quantizing them all at the base's bits, as mlx_lm.fuse "
            f"does, would miss them by {naive[len(naive) // 2]:.0%} (median)")
    status(f"max |logit diff| fused vs base+adapter on {n_tokens} tokens: "
        f"{result.max_logit_diff:.3g} (the adapter itself moves them by up to "
        f"{result.adapter_effect:.3g})")
    if result.max_logit_diff > result.bound:
        hint = "; --dequantize keeps the update exactly" if naive else ""
        status(f"warning: that is more than {tolerance:g} of the adapter's effect{hint}")


def _check_save_path(save_path: Path, protected: list[Path], overwrite: bool) -> None:
    target = save_path.resolve()
    for path in protected:
        path = Path(path).resolve()
        if target == path or target in path.parents or path in target.parents:
            raise UserError(f"--save-path {save_path} overlaps {path}; pick a separate directory")
    if save_path.is_file():
        raise UserError(f"--save-path {save_path} is a file; pick a directory")
    if save_path.is_dir() and any(save_path.iterdir()) and not overwrite:
        raise UserError(f"--save-path {save_path} exists and is not empty; "
                        "pass --overwrite to replace it")


def write_model_dir(save_path: Path, model: nn.Module, config: dict, source: Path,
                    overwrite: bool) -> None:
    """Write weights, config and tokenizer files beside save_path, then move them into place."""
    save_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = save_path.parent / f".{save_path.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_model(tmp, model)
        save_config(dict(config), tmp / "config.json")
        for pattern in TOKENIZER_FILES:
            for file in Path(source).glob(pattern):
                if file.is_file():
                    shutil.copy2(file, tmp / file.name)
        _move_into_place(tmp, save_path, overwrite)
    except (OSError, RuntimeError) as e:  # MLX reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write the fused model to {save_path} ({e}); nothing was "
                        "left behind: free disk space (or fix permissions) and rerun") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, save_path: Path, overwrite: bool) -> None:
    # A directory rename is atomic: save_path is either the old one or the whole new one.
    if not save_path.exists():
        os.rename(tmp, save_path)
        return
    if any(save_path.iterdir()) and not overwrite:
        raise UserError(f"--save-path {save_path} appeared while fusing; pass --overwrite")
    old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
    os.rename(save_path, old)
    os.rename(tmp, save_path)
    shutil.rmtree(old, ignore_errors=True)
