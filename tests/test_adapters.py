"""Adapter invariants, as one table of methods over float and 4-bit bases (as PEFT's suite
does): one line per method in CASES; every invariant runs on every line it applies to."""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
import yaml
from helpers import (
    addition_rows,
    assert_resume_equals_uninterrupted,
    move_trainable,
    randomize_lora_b,
)
from mlx.utils import tree_flatten
from test_peft import hf_model, require

from mlx_lora.adapters import METHODS
from mlx_lora.adapters.inject import (
    adapter_layers,
    bypassed,
    find_targets,
    inject,
    make_spec,
    parameter_counts,
)
from mlx_lora.adapters.lora import LoRALinear
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.config import TrainConfig, to_dict
from mlx_lora.errors import UserError
from mlx_lora.formats.convert import export_adapter
from mlx_lora.formats.mlx_lm_adapter import load_adapters, save_adapters
from mlx_lora.fuse import fuse, fused_linear
from mlx_lora.model.adapted import load_adapted
from mlx_lora.model.load import load_base
from mlx_lora.model.prefix_cache import prefix_cache

BASES = {"float": 0, "4-bit": 4}
TOKENS = mx.array([[1, 5, 9, 33, 70, 2, 8, 100, 41, 7]])
ROWS = addition_rows(6, 4)


@dataclass(frozen=True)
class Case:
    """A fine-tuning method as the invariants see it (one line of CASES)."""

    fine_tune_type: str
    init: str = "default"
    targets: str = ""  # the method's default
    num_layers: int = -1
    bases: tuple[str, ...] = tuple(BASES)  # the bases it trains on
    atol: float = 0.0  # fresh = base and save/load hold to this (0: bit for bit)
    mlx_lm: bool = True  # mlx-lm loads its adapter directory
    peft: bool = True  # PEFT has a format for it
    fuse: bool = True  # it folds into a plain model (else fuse refuses it)
    fresh_is_base: bool = True  # a fresh adapter equals the base (virtual tokens never do)
    virtual_tokens: int = 0  # prompt, prefix: how many
    adapter_variant: str = "pfeiffer"  # bottleneck adapters' placement (adapter only)


CASES = {
    "lora": Case("lora"),
    "dora": Case("dora", atol=1e-5),  # m / ||W + ...|| recomputes W's norms
    "ia3": Case("ia3", mlx_lm=False),  # mlx-lm has no (IA)^3
    "lora+pissa": Case("lora", init="pissa", atol=1e-5),  # saved as a LoRA of twice the rank
    "full": Case("full", num_layers=1, bases=("float",), peft=False),  # trains W in place
    # Bottleneck adapters: nonlinear, so nothing folds them, and no other tool has a format.
    "adapter": Case("adapter", mlx_lm=False, peft=False, fuse=False),
    "adapter-houlsby": Case("adapter", num_layers=1, mlx_lm=False, peft=False, fuse=False,
                            adapter_variant="houlsby"),
    # Virtual tokens: a fresh set is the model reading random tokens first, never the base.
    "prompt": Case("prompt", mlx_lm=False, fuse=False, fresh_is_base=False, virtual_tokens=4),
    "prefix": Case("prefix", mlx_lm=False, fuse=False, fresh_is_base=False, virtual_tokens=4),
}
TABLE = [pytest.param(case, quantize, id=f"{name}-{base}") for name, case in CASES.items()
         for base, quantize in BASES.items() if base in case.bases]
FLOAT_TABLE = [p for p in TABLE if p.values[1] == 0]


def adapted(path, case: Case, quantize: int, seed=0):
    """The base with the case's adapters in, fresh."""
    loaded = load_base(str(path), quantize=quantize)
    mx.random.seed(seed)
    spec = make_spec(loaded.model, case.fine_tune_type, case.targets, case.num_layers,
                     Hyper(4, 8.0, 0.0, False, case.init, adapter_variant=case.adapter_variant,
                           virtual_tokens=case.virtual_tokens))
    inject(loaded.model, spec)
    return loaded, spec


def trained(path, case: Case, quantize: int, adapter_dir=None):
    """The case's adapters moved as training moves them, saved as a run saves them."""
    loaded, spec = adapted(path, case, quantize)
    move_trainable(loaded.model)
    if adapter_dir is not None:
        save_adapters(adapter_dir, loaded.model, spec, str(path))
        # A QLoRA run records how it loaded the base; loaders load the base the same way.
        run = TrainConfig(model=str(path), quantize=quantize, adapter_path=str(adapter_dir))
        (adapter_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(run)))
    return loaded, spec


def logits(model) -> mx.array:
    """The model's logits of TOKENS, with its virtual tokens (prompt, prefix) before them."""
    return model(TOKENS, cache=prefix_cache(model))


def assert_close(a, b, atol: float) -> None:
    if atol:
        np.testing.assert_allclose(np.array(a), np.array(b), atol=atol, rtol=0)
    else:
        np.testing.assert_array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("case, quantize", [p for p in TABLE if p.values[0].fresh_is_base])
def test_fresh_adapter_equals_base(tiny_llama, case, quantize):
    base = load_base(str(tiny_llama), quantize=quantize).model(TOKENS)
    loaded, _ = adapted(tiny_llama, case, quantize)
    assert_close(loaded.model(TOKENS), base, case.atol)


@pytest.mark.parametrize("case, quantize", TABLE)
def test_only_adapters_train_and_are_float32(tiny_llama, case, quantize):
    loaded, spec = adapted(tiny_llama, case, quantize)
    trainable = dict(tree_flatten(loaded.model.trainable_parameters()))
    assert trainable and all(k.startswith(tuple(p + "." for p in spec.paths)) for k in trainable)
    names = METHODS[case.fine_tune_type].trainable
    if names:  # a method that wraps layers: exactly its parameters, in each adapted layer
        assert {k.rsplit(".", 1)[-1] for k in trainable} == set(names)
        assert len(trainable) == len(names) * len(spec.paths)
    assert all(v.dtype == mx.float32 for v in trainable.values())
    n_trainable, n_total = parameter_counts(loaded.model)
    assert 0 < n_trainable < n_total


@pytest.mark.parametrize("case, quantize", [
    p for p in TABLE if METHODS[p.values[0].fine_tune_type].layer is not None])
def test_bypassed_is_the_base(tiny_llama, case, quantize):
    base = load_base(str(tiny_llama), quantize=quantize).model(TOKENS)
    loaded, spec = trained(tiny_llama, case, quantize)
    assert [path for path, _ in adapter_layers(loaded.model)] == list(spec.paths)
    with bypassed(loaded.model) as model:  # what the forgetting probe measures the base with
        assert_close(model(TOKENS), base, 0.0)
    assert np.abs(np.array(loaded.model(TOKENS)) - np.array(base)).max() > 1e-3


@pytest.mark.parametrize("case, quantize", TABLE)
def test_save_then_load_is_exact(tiny_llama, tmp_path, case, quantize):
    loaded, spec = trained(tiny_llama, case, quantize, tmp_path)
    fresh = load_base(str(tiny_llama), quantize=quantize)
    assert load_adapters(fresh.model, tmp_path).paths == spec.paths
    assert_close(logits(fresh.model), logits(loaded.model), case.atol)


def mlx_lm_model(model_dir, adapter_dir, quantize: int):
    """mlx-lm's own load of base + adapter, on the same 4-bit base where QLoRA trained."""
    if not quantize:
        return mlx_lm.load(str(model_dir), adapter_path=str(adapter_dir))[0]
    model, _ = mlx_lm.load(str(model_dir))  # mlx-lm quantizes nothing on its own
    nn.quantize(model, 64, 4, class_predicate=lambda p, m: isinstance(
        m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % 64 == 0)
    return mlx_lm.utils.load_adapters(model, str(adapter_dir))


@pytest.mark.parametrize("case, quantize", [p for p in TABLE if p.values[0].mlx_lm])
def test_mlx_lm_loads_our_adapters_with_equal_logits(tiny_llama, tmp_path, case, quantize):
    loaded, _ = trained(tiny_llama, case, quantize, tmp_path)
    ours = np.array(loaded.model(TOKENS))
    theirs = np.array(mlx_lm_model(tiny_llama, tmp_path, quantize)(TOKENS))
    assert np.abs(ours - theirs).max() < 1e-5
    base = np.array(load_base(str(tiny_llama), quantize=quantize).model(TOKENS))
    assert np.abs(ours - base).max() > 1e-3  # the adapters do change the output


@pytest.mark.parametrize("case, quantize", [p for p in TABLE if p.values[0].fuse])
def test_fused_equals_adapted(tiny_llama, tmp_path, case, quantize):
    trained(tiny_llama, case, quantize, tmp_path / "adapter")
    result = fuse(str(tiny_llama), str(tmp_path / "adapter"), str(tmp_path / "fused"))
    fused, _ = mlx_lm.load(str(tmp_path / "fused"))
    adapted_model, _ = load_adapted(str(tiny_llama), str(tmp_path / "adapter"))
    diff = np.abs(np.array(fused(TOKENS)) - np.array(adapted_model.model(TOKENS))).max()
    # a quantized base keeps each update within the fuse's tolerance (see fuse.py)
    assert diff <= (result.bound if quantize else 1e-5)
    assert result.adapter_effect > 1e-2  # the adapter does change the logits


@pytest.mark.parametrize("case, quantize", [p for p in TABLE if not p.values[0].fuse])
def test_fuse_refuses_what_no_plain_model_holds(tiny_llama, tmp_path, case, quantize):
    trained(tiny_llama, case, quantize, tmp_path / "adapter")
    with pytest.raises(UserError, match="cannot be fused"):
        fuse(str(tiny_llama), str(tmp_path / "adapter"), str(tmp_path / "fused"))
    assert not (tmp_path / "fused").exists()


@pytest.mark.parametrize("case, quantize", TABLE)
def test_resume_equals_uninterrupted(tiny_llama, tmp_path, case, quantize):
    assert_resume_equals_uninterrupted(
        tiny_llama, {"train": ROWS[:20], "valid": ROWS[20:]}, tmp_path, 3,
        fine_tune_type=case.fine_tune_type, init=case.init, targets=case.targets,
        num_layers=case.num_layers, adapter_variant=case.adapter_variant, quantize=quantize,
        iters=6, batch_size=4, learning_rate=1e-2, steps_per_eval=3, save_every=3,
        lr_schedule="cosine", warmup=2, mask_prompt=True)


@pytest.mark.parametrize("case, quantize", [p for p in FLOAT_TABLE if p.values[0].peft])
def test_peft_gives_our_logits(tiny_llama, tmp_path, case, quantize):
    torch, peft = require("torch"), require("peft")
    loaded, _ = trained(tiny_llama, case, quantize, tmp_path / "ours")
    export_adapter(tmp_path / "ours", "peft", tmp_path / "peft")
    model = peft.PeftModel.from_pretrained(hf_model(tiny_llama), tmp_path / "peft")
    with torch.no_grad():
        theirs = model(torch.tensor(np.array(TOKENS))).logits.numpy()
    theirs = theirs[:, -TOKENS.shape[1]:]  # PEFT's prompt tuning gives the virtual tokens' too
    assert np.abs(theirs - np.array(logits(loaded.model))).max() < 1e-4  # DESIGN.md's bound


@pytest.mark.parametrize("case, quantize", [p for p in FLOAT_TABLE if not p.values[0].peft])
def test_peft_export_refuses_what_peft_has_no_format_for(tiny_llama, tmp_path, case, quantize):
    trained(tiny_llama, case, quantize, tmp_path / "ours")
    with pytest.raises(UserError, match="PEFT has no format for"):
        export_adapter(tmp_path / "ours", "peft", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_mlx_lm_reads_our_keys_and_num_layers(tiny_llama, tmp_path):
    case = Case("lora", targets="q_proj,v_proj,down_proj", num_layers=1)
    for quantize in BASES.values():
        loaded, spec = adapted(tiny_llama, case, quantize)
        randomize_lora_b(loaded.model)
        save_adapters(tmp_path / str(quantize), loaded.model, spec, str(tiny_llama))
        theirs = mlx_lm_model(tiny_llama, tmp_path / str(quantize), quantize)
        assert np.abs(np.array(loaded.model(TOKENS)) - np.array(theirs(TOKENS))).max() < 1e-5


@pytest.mark.parametrize("quantize", BASES.values(), ids=BASES.keys())
def test_save_then_load_keeps_a_selection_mlx_lm_cannot_state(tiny_llama, tmp_path, quantize):
    loaded, spec = adapted(tiny_llama, Case("lora", targets="re:.*layers\\.0\\..*_proj"),
                           quantize)
    randomize_lora_b(loaded.model)
    save_adapters(tmp_path, loaded.model, spec, str(tiny_llama))
    fresh = load_base(str(tiny_llama), quantize=quantize)
    assert load_adapters(fresh.model, tmp_path).paths == spec.paths
    np.testing.assert_array_equal(np.array(fresh.model(TOKENS)), np.array(loaded.model(TOKENS)))


def test_fused_layer_equals_adapted_layer():
    base = nn.Linear(64, 32)
    layer = LoRALinear.from_base(base, Hyper(rank=4, alpha=8.0))
    layer.lora_b = mx.random.normal(layer.lora_b.shape)
    x = mx.random.normal((3, 64))
    np.testing.assert_allclose(np.array(fused_linear(layer)(x)), np.array(layer(x)), atol=1e-5)


def test_targets_by_name_regex_all_linear_and_num_layers(tiny_llama):
    model = load_base(str(tiny_llama)).model
    every = find_targets(model, "all-linear", -1)
    assert len(every) == 7 * len(model.layers) and "lm_head" not in every
    assert find_targets(model, "q_proj,v_proj", -1) == [
        p for p in every if p.endswith(("q_proj", "v_proj"))]
    last = find_targets(model, "all-linear", 1)
    assert last and all(p.startswith(f"model.layers.{len(model.layers) - 1}.") for p in last)
    assert find_targets(model, r"re:model\.layers\.0\.mlp\..*", -1) == [
        p for p in every if p.startswith("model.layers.0.mlp.")]
    assert find_targets(model, "lm_head", -1) == ["lm_head"]


@pytest.mark.parametrize("targets, message", [
    ("nonexistent_proj", "matches no linear layer"),
    ("re:(", "bad regular expression"),
])
def test_bad_targets_say_what_exists(tiny_llama, targets, message):
    model = load_base(str(tiny_llama)).model
    with pytest.raises(UserError, match=message):
        find_targets(model, targets, -1)


def test_rank_larger_than_layer_is_refused(tiny_llama):
    model = load_base(str(tiny_llama)).model
    spec = make_spec(model, "lora", "q_proj", -1, Hyper(rank=4096, alpha=16.0))
    with pytest.raises(UserError, match="rank 4096 is larger than layer"):
        inject(model, spec)


def test_rslora_scale(tiny_llama):
    model = load_base(str(tiny_llama)).model
    spec = make_spec(model, "lora", "q_proj", -1, Hyper(rank=16, alpha=8.0, rslora=True))
    assert spec.hyper.scale == pytest.approx(8.0 / 4.0)

