"""QLoRA: quantize a frozen base's linear and embedding layers; what no group fits stays float."""


import mlx.nn as nn

from mlx_lora.console import status
from mlx_lora.errors import UserError


def quantize_base(model: nn.Module, bits: int, group_size: int,
                  skip: frozenset | set = frozenset()) -> dict:
    """Quantize the base in place (affine); return the quantization config in mlx-lm's form.

    Layers whose paths are in `skip` are left as they are, for the caller to decide.

    The dict is what mlx-lm writes to config.json as "quantization": {group_size, bits, mode}
    plus one entry per layer left in float, `"<path>": False`. mlx-lm's load_model returns
    config["quantization"][path] for any path it names, so a model dir saved with this config
    reloads with the same layers in float (mlx-lm's AWQ writes False entries the same way).
    """
    model_rule = getattr(model, "quant_predicate", None)  # mlx-lm's own exclusions (MoE routers)
    quantized, too_narrow, excluded, per_path = [], [], [], {}

    def predicate(path: str, module: nn.Module):
        if path in skip or not hasattr(module, "to_quantized"):  # skipped, or not quantizable
            return False
        width = module.weight.shape[-1]
        if width % group_size:
            too_narrow.append((path, width, module.weight.dtype))
            per_path[path] = False
            return False
        decision = model_rule(path, module) if model_rule is not None else True
        if decision is False:
            excluded.append(path)
            per_path[path] = False
        elif isinstance(decision, dict):
            per_path[path] = decision
        if decision is not False:
            quantized.append(path)
        return decision

    try:
        nn.quantize(model, group_size=group_size, bits=bits, mode="affine",
                    class_predicate=predicate)
    except ValueError as e:
        raise UserError(
            f"cannot quantize to {bits} bits with group size {group_size}: {e}"
        ) from None
    model.freeze()
    status(_summary(len(quantized), too_narrow, len(excluded), bits, group_size))
    return {"group_size": group_size, "bits": bits, "mode": "affine", **per_path}


def _summary(n_quantized: int, too_narrow: list, n_excluded: int, bits: int, group_size: int):
    line = f"quantized {n_quantized} layers to {bits} bits (group size {group_size})"
    if too_narrow:
        path, width, dtype = too_narrow[0]
        dtype_name = str(dtype).rsplit(".", 1)[-1]
        line += (
            f"; {len(too_narrow)} stay in {dtype_name} because {group_size} does not divide "
            f"their input width (e.g. {path}: {width})"
        )
    if n_excluded:
        line += f"; {n_excluded} left in float by the model's own rule"
    return line


def is_quantized(model: nn.Module) -> dict | None:
    """The {group_size, bits, mode} of an already-quantized base, or None for a float one."""
    layers = [
        m for _, m in model.named_modules() if hasattr(m, "bits") and hasattr(m, "group_size")
    ]
    if not layers:
        return None
    # Prefer a linear layer: an embedding may be quantized differently from the rest.
    first = next((m for m in layers if isinstance(m, nn.QuantizedLinear)), layers[0])
    mode = getattr(first, "mode", "affine")
    return {"group_size": first.group_size, "bits": first.bits, "mode": mode}
