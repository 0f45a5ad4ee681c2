"""Adapter directories of either format, mlx-lm's or PEFT's: tell them apart, load, convert."""

from pathlib import Path

import mlx.nn as nn

from mlx_lora import __version__
from mlx_lora.adapters import METHODS
from mlx_lora.adapters.inject import AdapterSpec
from mlx_lora.adapters.protocol import Method
from mlx_lora.config import ExportConfig
from mlx_lora.console import status
from mlx_lora.errors import UserError
from mlx_lora.formats import gguf_adapter, mlx_lm_adapter, peft_adapter
from mlx_lora.formats.atomic import save_safetensors_atomic, write_json_atomic
from mlx_lora.formats.output_dir import check_writable, exclusive
from mlx_lora.formats.run_config import trained_quantization

FORMATS = ("mlx-lm", "peft", "gguf")


def adapter_format(adapter_dir: Path) -> str:
    """"peft" for a directory PEFT wrote, "mlx-lm" for one mlx-lm (or mlx-lora) wrote."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise UserError(f"{path}: no such adapter directory")
    if peft_adapter.is_peft_dir(path):
        return "peft"
    if (path / mlx_lm_adapter.CONFIG_FILE).is_file():
        return "mlx-lm"
    raise UserError(
        f"{path}: not an adapter directory; expected adapter_config.json with "
        f"{mlx_lm_adapter.WEIGHTS_FILE} (mlx-lm) or {peft_adapter.WEIGHTS_FILE} (PEFT)"
    )


def adapter_method(adapter_dir: Path) -> Method | None:
    """The method an adapter directory of either format holds (None: one mlx-lora lacks)."""
    peft = adapter_format(adapter_dir) == "peft"
    config = mlx_lm_adapter.read_adapter_config(adapter_dir)  # PEFT's file has the same name
    if peft:
        return peft_adapter.peft_method(config)
    return METHODS.get(config.get("fine_tune_type", "lora"))


def load_any_adapter(model: nn.Module, adapter_dir: Path) -> AdapterSpec:
    """Inject and load the adapters of an mlx-lm or a PEFT directory, checking every tensor."""
    if adapter_format(adapter_dir) == "peft":
        return peft_adapter.load_peft_adapters(model, Path(adapter_dir))
    check_architecture(model, mlx_lm_adapter.read_adapter_config(adapter_dir), adapter_dir)
    return mlx_lm_adapter.load_adapters(model, Path(adapter_dir))


def check_architecture(model: nn.Module, config: dict, adapter_dir: Path) -> None:
    """Refuse an adapter trained on another architecture, even where its shapes would fit."""
    expected, actual = config.get("model_type"), getattr(model, "model_type", None)
    if expected and actual and expected != actual:
        raise UserError(
            f"{adapter_dir}: the adapter was trained on a {expected} model but this base is "
            f"{actual}; load it onto the base it was trained on ({config.get('model', '?')})"
        )


def export_adapter(adapter_dir: Path, fmt: str, save_path: Path,
                   outtype: str = ExportConfig.outtype,
                   model: str | None = None) -> str:
    """Write the adapter of `adapter_dir` in format `fmt` to `save_path` (for gguf a file, of
    tensor type `outtype`, for the base `model` or the one the adapter names); returns the
    adapter's own format."""
    adapter_dir, save_path = Path(adapter_dir), Path(save_path)
    if fmt not in FORMATS:
        raise UserError(f"format {fmt!r} is not one mlx-lora writes ({', '.join(FORMATS)})")
    source = adapter_format(adapter_dir)
    if save_path.resolve() == adapter_dir.resolve():
        raise UserError(f"{save_path}: the same directory as --adapter-path; pick another")
    if source == fmt:
        raise UserError(f"{adapter_dir} is already in {fmt} format")
    if fmt == "gguf":
        gguf_adapter.check_save_path(save_path)
    else:
        check_writable(save_path, "--save-path")
    with exclusive(save_path, "mlx-lora export"):
        if fmt != "mlx-lm" and (quantization := trained_quantization(adapter_dir)):
            status(f"note: {adapter_dir} was trained on a {quantization[0]}-bit base (QLoRA); "
                   f"{'PEFT' if fmt == 'peft' else 'llama.cpp'} adds it to whatever base it "
                   "is loaded onto")
        if fmt == "gguf":
            gguf_adapter.export_gguf(adapter_dir, source, save_path, outtype, model)
        elif fmt == "peft":
            mlx_lm_to_peft(adapter_dir, save_path)
        else:
            peft_to_mlx_lm(adapter_dir, save_path)
    return source


def mlx_lm_to_peft(adapter_dir: Path, save_path: Path) -> None:
    """Convert an mlx-lm adapter directory to a PEFT one; no base model needed."""
    config = mlx_lm_adapter.read_adapter_config(adapter_dir)
    source = str(adapter_dir / mlx_lm_adapter.CONFIG_FILE)
    method, hyper = mlx_lm_adapter.method_and_hyper(config, source)
    if METHODS[method].peft_type is None:
        hint = ("(its weights replace the base's); `mlx-lora fuse --dequantize` writes a model "
                "directory that transformers loads" if METHODS[method].fusable else
                "(nor can it be fused); use it with mlx-lora generate, eval or serve")
        raise UserError(f"{adapter_dir}: PEFT has no format for a {method} fine-tune {hint}")
    weights = mlx_lm_adapter.read_tensors(adapter_dir / mlx_lm_adapter.WEIGHTS_FILE)
    paths = peft_adapter.paths_of(weights)
    peft_config = peft_adapter.peft_config(
        METHODS[method], paths, hyper, config.get("model"),
        _num_blocks(paths, int(config.get("num_layers", -1))),
    )
    peft_adapter.save_peft(save_path, weights, METHODS[method], peft_config)


def _num_blocks(paths: list[str], num_layers: int) -> int | None:
    """Blocks in the base: mlx-lm's num_layers counts back from the last one."""
    indices = [int(m["index"]) for p in paths if (m := peft_adapter.BLOCK_PATH.fullmatch(p))]
    if num_layers <= 0 or not indices:
        return None
    return min(indices) + num_layers


def peft_to_mlx_lm(peft_dir: Path, save_path: Path) -> None:
    """Convert a PEFT LoRA (or IA3) directory to an mlx-lm one (that mlx_lm.load also reads)."""
    config, method, weights = peft_adapter.read_peft(peft_dir)
    hyper = peft_adapter.peft_hyper(config, str(peft_dir / peft_adapter.CONFIG_FILE), weights)
    paths = peft_adapter.paths_of(weights)
    keys = sorted({m["rest"] if (m := peft_adapter.BLOCK_PATH.fullmatch(p)) else p
                   for p in paths})
    adapter_config = {
        "fine_tune_type": method.name,
        # mlx-lm adapts these keys in every block; blocks without tensors keep lora_b = 0,
        # so the result is exact without knowing how many blocks the base has.
        "num_layers": -1,
        "model": config.get("base_model_name_or_path"),
        **mlx_lm_adapter.hyper_entries(method, hyper, keys),
        "target_paths": paths,
        "mlx_lora_version": __version__,
    }
    save_safetensors_atomic(save_path / mlx_lm_adapter.WEIGHTS_FILE, weights)
    write_json_atomic(save_path / mlx_lm_adapter.CONFIG_FILE, adapter_config)
