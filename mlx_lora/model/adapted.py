"""A base model loaded as an adapter was trained on it, with that adapter (any format) on."""

from pathlib import Path

from mlx_lora.adapters.inject import AdapterSpec
from mlx_lora.console import status
from mlx_lora.formats.convert import load_any_adapter
from mlx_lora.formats.run_config import trained_quantization
from mlx_lora.model.load import LoadedModel, load_base


def load_base_for(model: str, adapter_path: str | None,
                  trust_remote_code: bool = False) -> LoadedModel:
    """The base as the adapter was trained on it: quantized on load if the run was QLoRA."""
    quantization = trained_quantization(adapter_path) if adapter_path else None
    if quantization is None:
        return load_base(model, trust_remote_code=trust_remote_code)
    bits, group_size = quantization
    status(f"{adapter_path} was trained on a {bits}-bit base (QLoRA, group size "
           f"{group_size}): loading {model} the same way")
    return load_base(model, quantize=bits, group_size=group_size,
                     trust_remote_code=trust_remote_code)


def load_adapted(model: str, adapter_path: str | None,
                 trust_remote_code: bool = False) -> tuple[LoadedModel, AdapterSpec | None]:
    """The base as the adapter was trained on, with the adapter (any format) on, in eval mode."""
    loaded = load_base_for(model, adapter_path, trust_remote_code)
    return loaded, adapt_for_inference(loaded, adapter_path)


def adapt_for_inference(loaded: LoadedModel, adapter_path: str | None) -> AdapterSpec | None:
    """Put the adapter (any format; none for None) into a loaded base and set eval mode."""
    spec = load_any_adapter(loaded.model, Path(adapter_path)) if adapter_path else None
    loaded.model.eval()
    return spec
