"""DoRA: a fresh layer equals the base, mlx-lm loads our adapters to our logits, and m trains."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from helpers import make_adapter
from mlx.utils import tree_flatten

from mlx_lora import Finetune
from mlx_lora.adapters.inject import inject, make_spec
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.model.adapted import load_adapted
from mlx_lora.model.load import load_base

IDS = mx.array([[3, 17, 42, 99, 250, 7, 311, 64, 128, 5]])


def logits(model) -> np.ndarray:
    return np.array(model(IDS).astype(mx.float32))


@pytest.mark.parametrize("quantize", [0, 4])
def test_fresh_dora_equals_the_base(tiny_llama, quantize):
    loaded = load_base(str(tiny_llama), quantize=quantize)
    before = logits(loaded.model)
    inject(loaded.model, make_spec(loaded.model, "dora", "all-linear", -1, Hyper(4, 8.0)))
    assert np.abs(logits(loaded.model) - before).max() < 1e-5
    names = {k.rsplit(".", 1)[-1] for k, _ in tree_flatten(loaded.model.trainable_parameters())}
    assert names == {"lora_a", "lora_b", "m"}


@pytest.mark.parametrize("base", ["tiny_llama", "tiny_qwen2"])
def test_mlx_lm_loads_our_dora_to_our_logits(base, request, tmp_path):
    model_dir = request.getfixturevalue(base)
    adapter = make_adapter(model_dir, tmp_path / "dora", method="dora")
    ours, _ = load_adapted(str(model_dir), str(adapter))
    theirs, _ = mlx_lm.load(str(model_dir), adapter_path=str(adapter))
    expected = logits(ours.model)
    assert np.abs(logits(theirs) - expected).max() < 1e-4
    base_logits = logits(load_base(str(model_dir)).model)
    assert np.abs(expected - base_logits).max() > 0.05  # the magnitudes and lora_b do something


def test_dora_trains_its_magnitude_from_the_api(tiny_llama, tmp_path):
    rows = [{"prompt": f"Add {a} and {b}.", "completion": f"{a + b}"} for a in range(6)
            for b in range(4)]
    run = Finetune(model=str(tiny_llama), data={"train": rows[:20], "valid": rows[20:]},
                   adapter_path=str(tmp_path / "out"), fine_tune_type="dora", iters=6,
                   batch_size=4, learning_rate=5e-3, steps_per_eval=6, mask_prompt=True)
    result = run.train()
    assert result.finished and result.best_val_loss is not None
    saved = mx.load(str(tmp_path / "out" / "adapters.safetensors"))
    fresh = load_base(str(tiny_llama))
    norms = {f"{name}.m": mx.linalg.norm(module.weight, axis=1)
             for name, module in fresh.model.named_modules() if hasattr(module, "weight")
             and f"{name}.m" in saved}
    assert norms and any(float(mx.abs(saved[k] - v).max()) > 1e-4 for k, v in norms.items())
