"""Full fine-tuning: every weight of the last num_layers blocks trains in place (mlx-lm's "full").

Nothing wraps the base: the chosen modules are unfrozen, so their own parameters are the
trainable ones and, under the model's own names, already the adapters.safetensors that
mlx-lm's load_adapters reads for fine_tune_type "full". train_embeddings adds the weights
outside the blocks: token embeddings, final norm and output head (one matrix when tied).
"""

import mlx.nn as nn

from mlx_lora.adapters.protocol import Method


def trained_modules(model: nn.Module, num_layers: int, train_embeddings: bool) -> list[str]:
    """Paths of the last num_layers blocks (-1: all), then the top-level modules with weights."""
    index = {id(block): i for i, block in enumerate(model.layers)}
    first = 0 if num_layers == -1 else max(len(index) - num_layers, 0)
    blocks = sorted((index[id(m)], path) for path, m in model.named_modules()
                    if index.get(id(m), -1) >= first)
    paths = [path for _, path in blocks]
    return paths + (_outside_blocks(model, index) if train_embeddings else [])


def _outside_blocks(model: nn.Module, block_ids) -> list[str]:
    """Modules outside every block that hold arrays of their own (embedding, norm, head)."""
    inside = tuple(path + "." for path, m in model.named_modules() if id(m) in block_ids)
    return sorted(
        path for path, module in model.named_modules()
        if path and id(module) not in block_ids and not path.startswith(inside)
        and any(not isinstance(v, (dict, list)) for v in module.parameters().values()))


FULL = Method(
    name="full",
    layer=None,
    wraps=(),
    trainable=(),  # all of the chosen modules' own parameters
    peft_type=None,  # PEFT adapters add to frozen weights; a full fine-tune replaces them
    peft_names={},
    own_weights=trained_modules,
)
