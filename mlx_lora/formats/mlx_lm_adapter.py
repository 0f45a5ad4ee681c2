"""mlx-lm's adapter directory: adapter_config.json + adapters.safetensors, read and written."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_lora import __version__
from mlx_lora.adapters import METHODS, bottleneck
from mlx_lora.adapters.inject import AdapterSpec, find_targets, inject
from mlx_lora.adapters.pissa import loaded_weights, saved_hyper, saved_weights
from mlx_lora.adapters.protocol import Hyper, Method
from mlx_lora.errors import UserError
from mlx_lora.formats.atomic import save_safetensors_atomic, write_json_atomic
from mlx_lora.model.prefix_cache import KEY

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The trainable tensors under mlx-lm's names: already an adapter file's contents (but
    for PiSSA's layers, saved as the LoRA they equal on the original base: pissa.py)."""
    return saved_weights(model, dict(tree_flatten(model.trainable_parameters())))


def adapter_config(model: nn.Module, spec: AdapterSpec, base_model: str) -> dict:
    """mlx-lm's adapter_config.json, with our own extra keys (mlx-lm ignores them)."""
    keys, num_layers = spec.block_keys(model)
    if spec.table.virtual is not None:  # every block attends to the virtual tokens
        num_layers = spec.num_blocks
    return {
        "fine_tune_type": spec.method,
        "num_layers": num_layers,
        "model": base_model,
        "model_type": getattr(model, "model_type", None),
        **hyper_entries(spec.table, spec.hyper, keys),
        "target_paths": list(spec.paths),
        "mlx_lora_version": __version__,
    }


def hyper_entries(method: Method, hyper: Hyper | None, keys: list[str]) -> dict:
    """The adapter_config.json keys that state a method's hyper-parameters."""
    if hyper is None:  # a full fine-tune: mlx-lm reads only fine_tune_type then
        return {}
    if method.place is not None:  # bottleneck adapters, which mlx-lm cannot load
        return bottleneck.config_entries(hyper)
    if method.virtual is not None:  # prompt, prefix, which mlx-lm cannot load
        return {"num_virtual_tokens": hyper.virtual_tokens}
    if not method.low_rank:  # ia3, which mlx-lm cannot load: which layers scale their input
        return {"feedforward_paths": list(hyper.feedforward)}
    # A PiSSA run is saved as the plain LoRA it equals on the original base (pissa.py).
    pissa = {"init": "pissa"} if hyper.init == "pissa" else {}
    hyper = saved_hyper(hyper) if pissa else hyper
    return {"lora_parameters": {"rank": hyper.rank, "scale": hyper.scale,
                                "dropout": hyper.dropout, "keys": keys},
            "alpha": hyper.alpha, "rslora": hyper.rslora, **pissa}


def save_adapters(adapter_dir: Path, model: nn.Module, spec: AdapterSpec,
                  base_model: str) -> None:
    """Write the adapter weights and config atomically (weights first: config names them)."""
    adapter_dir = Path(adapter_dir)
    save_safetensors_atomic(adapter_dir / WEIGHTS_FILE, adapter_weights(model))
    write_json_atomic(adapter_dir / CONFIG_FILE, adapter_config(model, spec, base_model))


def read_adapter_config(adapter_dir: Path) -> dict:
    """The adapter_config.json of an mlx-lm adapter directory."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{adapter_dir}: no {CONFIG_FILE}; is this an adapter directory?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object of adapter settings")
    return config


def method_and_hyper(config: dict, source: str) -> tuple[str, Hyper | None]:
    """The method and hyper-parameters an mlx-lm adapter config states (None for full)."""
    method = config.get("fine_tune_type", "lora")
    if method not in METHODS:
        raise UserError(f"{source}: fine_tune_type '{method}' is not supported "
                        f"(supported: {', '.join(METHODS)})")
    if METHODS[method].own_weights is not None:
        return method, None  # mlx-lm writes lora_parameters for full too; they mean nothing
    if METHODS[method].place is not None:
        return method, bottleneck.hyper_from_config(config, source)
    if METHODS[method].virtual is not None:  # prompt, prefix: how many virtual tokens
        count = config.get("num_virtual_tokens")
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            raise UserError(f"{source}: num_virtual_tokens must be a positive count, got "
                            f"{count!r}")
        return method, Hyper(0, 0.0, virtual_tokens=count)
    if not METHODS[method].low_rank:  # no rank or scale; ia3: which layers scale their input
        paths = config.get("feedforward_paths") or []
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise UserError(f"{source}: feedforward_paths must be a list of module paths")
        return method, Hyper(0, 0.0, feedforward=tuple(paths))
    try:
        params = config["lora_parameters"]
        rank, scale = int(params["rank"]), float(params["scale"])
        dropout = float(params.get("dropout", 0.0))
        hyper = Hyper(rank, float(config.get("alpha", scale * rank)), dropout,
                      bool(config.get("rslora", False))).checked(source)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{source}: lora_parameters lacks or mangles {e}") from None
    if not abs(hyper.scale - scale) <= 1e-6 * max(1.0, abs(scale)):
        # scale is what mlx-lm reads: it wins
        hyper = Hyper(rank, scale * rank, dropout, False).checked(source)
    return method, hyper


def spec_from_config(model: nn.Module, config: dict, source: str) -> AdapterSpec:
    """Rebuild the AdapterSpec an adapter config describes, for this model."""
    method, hyper = method_and_hyper(config, source)
    own_weights, place = METHODS[method].own_weights, METHODS[method].place
    if place is not None:  # its placement, and its widths checked against this model
        placed, hyper = place(model, hyper, int(config.get("num_layers", -1)))
        paths = config.get("target_paths", placed)
    elif METHODS[method].virtual is not None:  # one module, put in at the top level
        paths = [KEY]
    elif "target_paths" in config:
        paths = list(config["target_paths"])
    elif own_weights is not None:  # mlx-lm's full: the last num_layers blocks
        paths = own_weights(model, int(config.get("num_layers", -1)), False)
    else:  # written by mlx-lm: keys relative to each of the last num_layers blocks
        keys = config["lora_parameters"].get("keys")
        targets = ",".join(keys) if keys else "all-linear"
        paths = find_targets(model, targets, int(config.get("num_layers", -1)))
    return AdapterSpec(method, tuple(paths), hyper, len(model.layers))


def load_adapters(model: nn.Module, adapter_dir: Path) -> AdapterSpec:
    """Inject the adapters a directory describes and load their weights, checking every tensor."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    spec = spec_from_config(model, config, str(adapter_dir / CONFIG_FILE))
    modules = dict(model.named_modules())
    missing = [p for p in spec.paths if p not in modules and spec.table.virtual is None]
    if missing:
        raise UserError(
            f"{adapter_dir}: adapter targets module '{missing[0]}', which this model does not "
            "have; was the adapter trained on another base model?"
        )
    inject(model, spec)
    load_adapter_weights(model, adapter_dir / WEIGHTS_FILE)
    return spec


def read_tensors(path: Path) -> dict[str, mx.array]:
    """An adapter file's tensors; an unreadable file, or a tensor that is not floating point
    or holds NaN or infinity, is an error naming it."""
    try:
        weights = mx.load(str(path))
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(
            f"{path}: cannot read adapter weights ({e}); the file is corrupt or missing"
        ) from None
    for name, value in weights.items():
        if not mx.issubdtype(value.dtype, mx.floating):
            raise UserError(f"{path}: tensor '{name}' holds {value.dtype} values, not floating "
                            "point; this is not an adapter file, or it is damaged")
        if not mx.all(mx.isfinite(value)).item():
            raise UserError(f"{path}: tensor '{name}' holds NaN or infinite values; the adapter "
                            "is unusable (use an earlier checkpoint, or train again)")
    return weights


def load_adapter_weights(model: nn.Module, path: Path) -> None:
    """Load adapter tensors; any unknown, missing or mis-shaped tensor is an error naming it."""
    set_adapter_weights(model, read_tensors(path), path)


def set_adapter_weights(model: nn.Module, weights: dict[str, mx.array], path: Path) -> None:
    """Put read_tensors(path)'s tensors in the model; any unknown, missing or mis-shaped
    tensor is an error naming it."""
    expected = adapter_weights(model)
    for name, value in weights.items():
        if name not in expected:
            raise UserError(f"{path}: tensor '{name}' matches no adapter parameter of this "
                            "model; was the adapter trained on another base model?")
        if value.shape != expected[name].shape:
            raise UserError(
                f"{path}: tensor '{name}' has shape {tuple(value.shape)} but the model needs "
                f"{tuple(expected[name].shape)}; was the adapter trained on another base model?"
            )
    absent = [name for name in expected if name not in weights]
    if absent:
        raise UserError(f"{path}: no tensor for '{absent[0]}' (and {len(absent) - 1} more)")
    # Each in the dtype it trains in: float32 adapters, a full fine-tune's base dtype.
    weights = loaded_weights(model, {k: v.astype(expected[k].dtype) for k, v in weights.items()})
    model.load_weights(list(weights.items()), strict=False)
