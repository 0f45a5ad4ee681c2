"""Helpers several test modules share (tests/ is on sys.path under pytest)."""

import json
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_lora.adapters.dora import DoRALinear
from mlx_lora.adapters.ia3 import IA3Linear
from mlx_lora.adapters.inject import inject, make_spec
from mlx_lora.adapters.lora import LoRALinear
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.formats.mlx_lm_adapter import save_adapters
from mlx_lora.model.load import load_base


def addition_rows(a_values: int, b_values: int) -> list[dict]:
    """The tests' small task: "Add a and b." -> "a + b", for a < a_values and b < b_values."""
    return [{"prompt": f"Add {a} and {b}.", "completion": f"{a + b}"} for a in range(a_values)
            for b in range(b_values)]


def write_splits(root: Path, splits: dict[str, list[dict]]) -> Path:
    """One JSONL file per split in `root` (train.jsonl, valid.jsonl, ...); returns `root`."""
    for split, rows in splits.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def randomize_lora_b(model, seed: int = 1, std: float = 0.05) -> None:
    """Trained adapters have non-zero lora_b (DoRA a moved magnitude, IA3 scales away from
    one); give every one some."""
    mx.random.seed(seed)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_b = std * mx.random.normal(module.lora_b.shape)
        if isinstance(module, DoRALinear):
            module.m = module.m * (1 + 0.2 * mx.random.normal(module.m.shape))
        if isinstance(module, IA3Linear):
            module.ia3_l = 1 + 4 * std * mx.random.normal(module.ia3_l.shape)


def move_trainable(model, seed: int = 1, std: float = 0.05) -> None:
    """Move every trainable tensor as training would (frozen ones, PiSSA's lora_a0, stay)."""
    mx.random.seed(seed)
    model.load_weights([(k, v + std * mx.random.normal(v.shape)) for k, v in
                        tree_flatten(model.trainable_parameters())], strict=False)


def make_adapter(model_dir: Path, adapter_dir: Path, *, targets="all-linear", num_layers=-1,
                 rank=4, alpha=8.0, rslora=False, seed=0, method="lora",
                 init="default") -> Path:
    """Our adapter with random non-zero lora_b, saved as a training run saves it."""
    mx.random.seed(seed)
    loaded = load_base(str(model_dir))
    spec = make_spec(loaded.model, method, targets, num_layers,
                     Hyper(rank, alpha, 0.0, rslora, init))
    inject(loaded.model, spec)
    randomize_lora_b(loaded.model, seed + 1)
    save_adapters(adapter_dir, loaded.model, spec, str(model_dir))
    return adapter_dir


def assert_resume_equals_uninterrupted(model_dir: Path, data, tmp_path: Path, stop_at: int,
                                       **settings) -> None:
    """Train into whole/; train into part/ stopped after step stop_at and resumed there; the
    final adapters agree to 1e-6."""
    from mlx_lora import Finetune

    def run(name: str, **extra):
        return Finetune(model=str(model_dir), data=data, adapter_path=str(tmp_path / name),
                        **settings, **extra)

    assert run("whole").train().finished
    stop = threading.Event()
    stopped = run("part").train(
        callback=lambda e: stop.set() if e.get("step") == stop_at else None, stop=stop)
    assert not stopped.finished and stopped.step == stop_at
    assert run("part", resume=True).train().finished
    want = mx.load(str(tmp_path / "whole" / "adapters.safetensors"))
    got = mx.load(str(tmp_path / "part" / "adapters.safetensors"))
    for name, value in want.items():
        np.testing.assert_allclose(np.array(got[name]), np.array(value), atol=1e-6,
                                   err_msg=name)
