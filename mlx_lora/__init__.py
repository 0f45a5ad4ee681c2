"""mlx_lora: fine-tune language models on MLX, with adapters mlx-lm and PEFT load."""

from mlx_lora.errors import UserError

__version__ = "0.1.0"
__all__ = ["Finetune", "UserError", "__version__", "export"]


def __getattr__(name: str):
    # Finetune pulls in MLX and mlx-lm: imported on first use, so `mlx-lora --help` stays fast.
    if name in ("Finetune", "export"):
        from mlx_lora import api

        return getattr(api, name)
    raise AttributeError(f"module 'mlx_lora' has no attribute {name!r}")
