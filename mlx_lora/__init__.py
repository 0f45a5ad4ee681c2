"""mlx_lora: LoRA and QLoRA fine-tuning on MLX, with adapters mlx-lm and PEFT load."""

__version__ = "0.1.0"
