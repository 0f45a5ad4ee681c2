"""Helpers several test modules share (tests/ is on sys.path under pytest)."""

from pathlib import Path

import mlx.core as mx

from mlx_lora.adapters.dora import DoRALinear
from mlx_lora.adapters.inject import inject, make_spec
from mlx_lora.adapters.lora import LoRALinear
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.formats.mlx_lm_adapter import save_adapters
from mlx_lora.model.load import load_base


def randomize_lora_b(model, seed: int = 1, std: float = 0.05) -> None:
    """Trained adapters have non-zero lora_b (and DoRA a moved magnitude); give every one some."""
    mx.random.seed(seed)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_b = std * mx.random.normal(module.lora_b.shape)
        if isinstance(module, DoRALinear):
            module.m = module.m * (1 + 0.2 * mx.random.normal(module.m.shape))


def make_adapter(model_dir: Path, adapter_dir: Path, *, targets="all-linear", num_layers=-1,
                 rank=4, alpha=8.0, rslora=False, seed=0, method="lora") -> Path:
    """Our adapter with random non-zero lora_b, saved as a training run saves it."""
    mx.random.seed(seed)
    loaded = load_base(str(model_dir))
    spec = make_spec(loaded.model, method, targets, num_layers,
                     Hyper(rank, alpha, 0.0, rslora))
    inject(loaded.model, spec)
    randomize_lora_b(loaded.model, seed + 1)
    save_adapters(adapter_dir, loaded.model, spec, str(model_dir))
    return adapter_dir
