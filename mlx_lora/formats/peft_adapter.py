"""Hugging Face PEFT's LoRA and IA3 directories (adapter_config.json + adapter_model.safetensors),
both ways (prompt and prefix tuning's: peft_prompt.py).

PEFT names a tensor `base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight`
(out, r): the transposes of our `lora_a` (in, r) and `lora_b` (r, out). Its scale is
lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, as ours. IA3's `.ia3_l`, (out, 1) or
(1, in), is the transpose of ours too. mlx-lm's module paths equal transformers' for the
decoder-only models both load (llama, qwen2, mistral, ...).
"""

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_lora.adapters import METHODS
from mlx_lora.adapters.ia3 import feedforward_paths
from mlx_lora.adapters.inject import AdapterSpec, inject
from mlx_lora.adapters.protocol import Hyper, Method
from mlx_lora.errors import UserError
from mlx_lora.formats import peft_prompt
from mlx_lora.formats.atomic import save_safetensors_atomic, write_json_atomic
from mlx_lora.formats.mlx_lm_adapter import read_tensors
from mlx_lora.model.prefix_cache import KEY

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# The first numbered segment of a path is its block: model.layers.<3>.self_attn.q_proj.
BLOCK_PATH = re.compile(r"(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)")
# PEFT options that change what the adapter computes and that our LoRA cannot carry.
UNSUPPORTED = {
    "lora_bias": "trained LoRA biases", "fan_in_fan_out": "Conv1D layers",
    "modules_to_save": "fully trained modules", "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas", "layer_replication": "layer replication",
    "target_parameters": "adapters on parameters", "trainable_token_indices": "trained tokens",
    "use_qalora": "QA-LoRA", "alora_invocation_tokens": "activated LoRA",
    "use_bdlora": "BD-LoRA",
}
# PEFT inits that change the base weights when the adapter is made, which we cannot redo.
BASE_CHANGING_INITS = ("pissa_niter", "olora", "corda", "loftq", "lora_ga")


def is_peft_dir(path: Path) -> bool:
    """True for a directory PEFT's save_pretrained wrote (its config names a peft_type)."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file() or (path / "adapter_model.bin").is_file():
        return True
    try:
        return "peft_type" in json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def peft_name(name: str, method: Method) -> str:
    """PEFT's name for one of ours: `<path>.lora_a` -> `base_model.model.<path>.lora_A.weight`."""
    if method.virtual is not None:  # prompt, prefix: one tensor, no module path
        return peft_prompt.PEFT_NAME
    path, leaf = name.rsplit(".", 1)
    return f"{PREFIX}{path}.{method.peft_names[leaf]}"


def to_peft_weights(weights: dict[str, mx.array], method: Method) -> dict[str, mx.array]:
    """Our tensors under PEFT's names and layout."""
    if method.virtual is not None:
        return peft_prompt.to_peft_weights(weights)
    out = {}
    for name, value in weights.items():
        if name.rsplit(".", 1)[-1] not in method.peft_names:
            raise UserError(f"tensor '{name}' is not a {method.name} parameter PEFT knows")
        out[peft_name(name, method)] = value.T  # (in, r) -> (r, in) and (r, out) -> (out, r)
    return out


def from_peft_weights(weights: dict[str, mx.array], method: Method,
                      source: str) -> dict[str, mx.array]:
    """PEFT's tensors under our names and layout, in float32; anything else is an error."""
    if method.virtual is not None:
        return peft_prompt.from_peft_weights(weights, method, source)
    ours = {peft: leaf for leaf, peft in method.peft_names.items()}
    out = {}
    for name, value in weights.items():
        path, leaf = _split_peft_name(name, ours)
        if path is None:
            raise UserError(
                f"{source}: tensor '{name}' is not a {method.peft_type} tensor of a linear "
                f"layer ({', '.join(method.peft_names.values())})"
            )
        out[f"{path}.{leaf}"] = value.T.astype(mx.float32)
    return out


def _split_peft_name(name: str, ours: dict[str, str]) -> tuple[str | None, str | None]:
    for peft, leaf in ours.items():
        if name.startswith(PREFIX) and name.endswith("." + peft):
            return name[len(PREFIX):-len(peft) - 1], leaf
    return None, None


def target_modules(paths: list[str], num_blocks: int | None) -> dict:
    """PEFT's target_modules (+ layers_to_transform) selecting exactly these module paths."""
    parts = [BLOCK_PATH.fullmatch(p) for p in paths]
    prefixes = {m["prefix"] for m in parts if m}
    if all(parts) and len(prefixes) == 1:
        indices = sorted({int(m["index"]) for m in parts})
        rests = sorted({m["rest"] for m in parts})
        prefix = prefixes.pop()
        if {f"{prefix}.{i}.{r}" for i in indices for r in rests} == set(paths):
            # Names relative to a block read as PEFT users write them; PEFT matches by suffix.
            every_block = num_blocks is not None and indices == list(range(num_blocks))
            return {
                "target_modules": rests,
                "layers_to_transform": None if every_block else indices,
                "layers_pattern": None if every_block else prefix.rsplit(".", 1)[-1],
            }
    # Anything else: full paths, which PEFT matches exactly.
    return {"target_modules": sorted(paths), "layers_to_transform": None, "layers_pattern": None}


def peft_config(method: Method, paths: list[str], hyper: Hyper, base_model: str | None,
                num_blocks: int | None) -> dict:
    """PEFT's adapter_config.json for `method` on `paths`."""
    if method.peft_type == "IA3":
        return _ia3_config(paths, hyper, base_model, num_blocks)
    if method.virtual is not None:
        return peft_prompt.peft_config(method, hyper, base_model)
    alpha = hyper.alpha
    return {
        "peft_type": method.peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": hyper.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "use_rslora": hyper.rslora,
        "lora_dropout": hyper.dropout,
        **target_modules(paths, num_blocks),
        "bias": "none",
        **method.peft_config,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }


def _ia3_config(paths: list[str], hyper: Hyper, base_model: str | None,
                num_blocks: int | None) -> dict:
    """PEFT's IA3 config: the targets and, among them, the feed-forward ones (input scaled)."""
    selection = target_modules(paths, num_blocks)
    targets, feedforward = sorted(paths), sorted(hyper.feedforward)  # full paths: exact
    if selection["layers_to_transform"] is None and selection["target_modules"] != targets:
        # Names relative to a block, where PEFT's suffix test picks the same feed-forward layers
        # (IA3Config has no layers_to_transform, so only for targets in every block).
        names = sorted({BLOCK_PATH.fullmatch(p)["rest"] for p in feedforward})
        if {p for p in paths if p.endswith(tuple(names))} == set(feedforward):
            targets, feedforward = selection["target_modules"], names
    return {
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "target_modules": targets, "feedforward_modules": feedforward, "exclude_modules": None,
        "fan_in_fan_out": False, "modules_to_save": None, "init_ia3_weights": True,
        "inference_mode": True, "revision": None,
    }


def save_peft(peft_dir: Path, weights: dict[str, mx.array], method: Method,
              config: dict) -> None:
    """Write PEFT's two files atomically (weights first: the config is what marks the dir)."""
    peft_dir = Path(peft_dir)
    save_safetensors_atomic(peft_dir / WEIGHTS_FILE, to_peft_weights(weights, method),
                            metadata={"format": "pt"})
    write_json_atomic(peft_dir / CONFIG_FILE, config)


def peft_method(config: dict) -> Method | None:
    """Our method for a PEFT adapter config (None: one mlx-lora does not import)."""
    return next((m for m in METHODS.values() if m.peft_type == config.get("peft_type")
                 and all(bool(config.get(k)) == v for k, v in m.peft_config.items())), None)


def read_peft(peft_dir: Path) -> tuple[dict, Method, dict[str, mx.array]]:
    """A PEFT directory's config, method and weights under our names, validated."""
    peft_dir = Path(peft_dir)
    config_path, weights_path = peft_dir / CONFIG_FILE, peft_dir / WEIGHTS_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{config_path}: cannot read PEFT's adapter config ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    method = peft_method(config)
    if method is None:
        known = ", ".join(sorted({m.peft_type for m in METHODS.values() if m.peft_type}))
        raise UserError(f"{config_path}: peft_type is {config.get('peft_type')!r}; "
                        f"mlx-lora imports {known} adapters")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise UserError(f"{config_path}: {key} is set ({what}); mlx-lora's LoRA cannot "
                            "carry it, so the adapter would not compute the same thing")
    if config.get("bias", "none") != "none":
        raise UserError(f"{config_path}: bias is {config['bias']!r}; only 'none' is supported")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise UserError(f"{config_path}: init_lora_weights is {init!r}, which changed the base "
                        "weights this adapter applies to; save it from PEFT converted to LoRA "
                        "(save_pretrained's path_initial_model_for_weight_conversion)")
    if not weights_path.is_file():
        hint = ""
        if (peft_dir / "adapter_model.bin").is_file():
            hint = (" (adapter_model.bin is a pickle, which mlx-lora never loads; re-save it "
                    "with save_pretrained(..., safe_serialization=True))")
        raise UserError(f"{peft_dir}: no {WEIGHTS_FILE}{hint}")
    raw = read_tensors(weights_path)
    return config, method, from_peft_weights(raw, method, str(weights_path))


def peft_hyper(config: dict, source: str, weights: dict[str, mx.array] | None = None,
               with_base: bool = False) -> Hyper:
    """Our hyper-parameters from PEFT's r, lora_alpha, lora_dropout, use_rslora; for IA3 the
    feed-forward layers that its `weights` show; an unconverted PiSSA adapter only `with_base`."""
    if config.get("peft_type") == "IA3":  # no rank or alpha; the shapes say which scale inputs
        return Hyper(0, 0.0, feedforward=feedforward_paths(weights or {}))
    if config.get("peft_type") in peft_prompt.PEFT_TYPES:  # no rank: a virtual-token count
        return peft_prompt.peft_hyper(config, source)
    pissa = str(config.get("init_lora_weights")).lower() == "pissa"
    if pissa and not with_base:
        raise UserError(f"{source}: a PiSSA adapter PEFT saved unconverted applies to a base "
                        "minus its top singular directions, which only the base model gives; "
                        "load it with the base (--model), or save it from PEFT converted to "
                        "LoRA (path_initial_model_for_weight_conversion)")
    try:
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", 8))  # PEFT's default lora_alpha
        dropout = float(config.get("lora_dropout") or 0.0)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"{source}: r / lora_alpha / lora_dropout missing or not numbers ({e})"
        ) from None
    return Hyper(rank, alpha, dropout, bool(config.get("use_rslora", False)),
                 "pissa" if pissa else "default").checked(source)


def paths_of(weights: dict[str, mx.array]) -> list[str]:
    """Module paths that carry adapter tensors, in file order."""
    return list(dict.fromkeys(name.rsplit(".", 1)[0] for name in weights))


def load_peft_adapters(model: nn.Module, peft_dir: Path) -> AdapterSpec:
    """Inject the LoRA a PEFT directory holds and load it; any misfit is an error naming it."""
    peft_dir = Path(peft_dir)
    config, method, weights = read_peft(peft_dir)
    hyper = peft_hyper(config, str(peft_dir / CONFIG_FILE), weights, with_base=True)
    source = str(peft_dir / WEIGHTS_FILE)
    # Virtual tokens (prompt, prefix) are one module put in at the model's top level.
    paths = (KEY,) if method.virtual else _wrapped_paths(model, weights, method, source)
    spec = AdapterSpec(method.name, paths, hyper, len(model.layers))
    inject(model, spec)
    check_weights(model, weights, method, source)
    model.load_weights(list(weights.items()), strict=False)
    return spec


def _wrapped_paths(model: nn.Module, weights: dict[str, mx.array], method: Method,
                   source: str) -> tuple[str, ...]:
    """The paths of the layers the tensors adapt, in the model's order (as find_targets)."""
    modules = dict(model.named_modules())
    for name in weights:
        path = name.rsplit(".", 1)[0]
        if not isinstance(modules.get(path), method.wraps):
            raise UserError(
                f"{source}: tensor '{peft_name(name, method)}' is for module '{path}', which "
                "this model does not have as a linear layer; was the adapter trained on "
                "another base model?"
            )
    wanted = set(paths_of(weights))
    return tuple(p for p in modules if p in wanted)


def check_weights(model: nn.Module, weights: dict[str, mx.array], method: Method,
                  source: str) -> None:
    """Every injected adapter parameter has a tensor of its shape (named as PEFT names it).

    PEFT's file holds the trainable tensors as they are (an unconverted PiSSA adapter's too).
    """
    expected = dict(tree_flatten(model.trainable_parameters()))
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise UserError(
                f"{source}: tensor '{peft_name(name, method)}' has shape "
                f"{tuple(value.T.shape)} but the model needs {tuple(expected[name].T.shape)}; "
                "was the adapter trained on another base model (or with a per-module rank)?"
            )
    absent = [name for name in expected if name not in weights]
    if absent:
        raise UserError(f"{source}: no tensor '{peft_name(absent[0], method)}' "
                        f"(and {len(absent) - 1} more)")

