"""PEFT's prompt-learning directories (PROMPT_TUNING, PREFIX_TUNING): names, config, both ways.

PEFT saves one tensor, `prompt_embeddings`, with no module path: prompt tuning's (N, hidden)
input embeddings, prefix tuning's (N, layers * 2 * kv_heads * head_dim) keys and values (the
MLP's output where it trained with prefix_projection). Ours is the same tensor, under the
virtual module's path (model/prefix_cache.KEY). The config leaves the base's widths and layer
count empty: PEFT fills them from the base it is loaded onto, as it does when it trains.
"""

import mlx.core as mx

from mlx_lora.adapters.protocol import Hyper, Method
from mlx_lora.errors import UserError
from mlx_lora.model.prefix_cache import KEY

PEFT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING")
PEFT_NAME = "prompt_embeddings"
OURS = f"{KEY}.{PEFT_NAME}"


def to_peft_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our virtual tokens' tensor under PEFT's name, as it is."""
    return {PEFT_NAME: weights[OURS]}


def from_peft_weights(weights: dict[str, mx.array], method: Method,
                      source: str) -> dict[str, mx.array]:
    """PEFT's prompt_embeddings under our name, in float32; any other tensor is an error."""
    other = [name for name in weights if name != PEFT_NAME]
    if other or PEFT_NAME not in weights:
        raise UserError(f"{source}: a {method.peft_type} file holds one tensor, "
                        f"'{PEFT_NAME}'; found {', '.join(sorted(weights)) or 'none'}")
    return {OURS: weights[PEFT_NAME].astype(mx.float32)}


def peft_config(method: Method, hyper: Hyper, base_model: str | None) -> dict:
    """PEFT's adapter_config.json for prompt or prefix tuning (inference mode: as trained)."""
    config = {
        "peft_type": method.peft_type, "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model, "revision": None, "inference_mode": True,
        "num_virtual_tokens": hyper.virtual_tokens, "num_transformer_submodules": 1,
        "token_dim": None, "num_attention_heads": None, "num_layers": None,
        "modules_to_save": None,
    }
    if method.peft_type == "PREFIX_TUNING":
        return {**config, "encoder_hidden_size": None, "prefix_projection": False}
    # The trained tensor is what loads; how it started does not matter any more.
    return {**config, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None}


def peft_hyper(config: dict, source: str) -> Hyper:
    """The virtual-token count a PEFT prompt-learning config states, checked."""
    count = config.get("num_virtual_tokens")
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise UserError(f"{source}: num_virtual_tokens must be a positive count, got {count!r}")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise UserError(f"{source}: num_transformer_submodules is "
                        f"{config['num_transformer_submodules']} (an encoder-decoder model's); "
                        "mlx-lora trains decoder-only models")
    return Hyper(0, 0.0, virtual_tokens=count)
