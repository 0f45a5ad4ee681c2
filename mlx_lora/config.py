"""Every command's options and their defaults, stated once; the training config's file and flags."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlx_lora.errors import UserError


def _opt(default, help_text, **meta):
    return field(default=default, metadata={"help": help_text, **meta})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; field names are the config keys and the CLI flags."""

    model: str = _opt("", "Base model: a Hugging Face repo id or a local directory.")
    data: str = _opt("", "Directory with train.jsonl [valid.jsonl test.jsonl], or one .jsonl/.txt.")
    adapter_path: str = _opt("adapters", "Output directory for adapters, metrics and checkpoints.")
    quantize: int = _opt(0, "Quantize the frozen base to 4 or 8 bits on load (QLoRA); 0 = no.")
    group_size: int = _opt(64, "Quantization group size.")
    trust_remote_code: bool = _opt(False, "Allow a model's own Python code to run on load.")
    fine_tune_type: str = _opt("lora", "Adapter method.", choices=("lora",))
    rank: int = _opt(8, "LoRA rank r.")
    alpha: float = _opt(16.0, "LoRA alpha; scale = alpha / rank (alpha / sqrt(rank) with rslora).")
    rslora: bool = _opt(False, "Rank-stabilized scale alpha / sqrt(rank).")
    dropout: float = _opt(0.0, "Dropout on the adapter input.")
    targets: str = _opt(
        "all-linear",
        "Modules to adapt: names (q_proj,v_proj), 're:REGEX' on full paths, or all-linear.",
    )
    num_layers: int = _opt(-1, "Adapt only the last N transformer blocks; -1 = all.")
    max_seq_length: int = _opt(2048, "Longer records are truncated to this many tokens.")
    mask_prompt: bool = _opt(False, "Train only on completions / every assistant turn.")
    batch_size: int = _opt(4, "Records per micro-batch.")
    pack: bool = _opt(
        True, "Pack records into rows of up to max-seq-length tokens, each record seeing only "
        "itself (batch-size records per micro-batch on average); skipped, saying why, for a "
        "model where packing would change the loss or data that padding fills as well."
    )
    grad_accumulation_steps: int = _opt(1, "Micro-batches per optimizer update (token-weighted).")
    iters: int = _opt(1000, "Optimizer updates to run (ignored when epochs is set).")
    epochs: float = _opt(0.0, "Passes over the training set; 0 = use iters.")
    optimizer: str = _opt("adamw", "Optimizer.", choices=("adam", "adamw"))
    learning_rate: float = _opt(1e-4, "Peak learning rate.")
    weight_decay: float = _opt(0.0, "Decoupled weight decay (adamw).")
    lr_schedule: str = _opt(
        "constant", "Learning-rate schedule after warmup.", choices=("constant", "cosine", "linear")
    )
    warmup: int = _opt(0, "Linear warmup steps from 0 to the learning rate.")
    max_grad_norm: float = _opt(0.0, "Clip the global gradient norm to this; 0 = no clipping.")
    grad_checkpoint: bool = _opt(False, "Recompute the adapted blocks' activations to save memory.")
    steps_per_report: int = _opt(10, "Log training loss every N updates.")
    steps_per_eval: int = _opt(200, "Validation loss every N updates; 0 = only at the end.")
    val_batches: int = _opt(25, "Validation batches per evaluation; -1 = all.")
    save_every: int = _opt(100, "Save adapters and a resume checkpoint every N updates.")
    keep_checkpoints: int = _opt(2, "Resume checkpoints to keep (the newest).")
    early_stopping_patience: int = _opt(
        0, "Stop after N evaluations without a better validation loss; 0 = never.")
    keep_best: bool = _opt(True, "Keep the best-validation adapters in best/ (needs valid data).")
    seed: int = _opt(0, "Random seed for initialization, dropout and shuffling.")


# mlx-lm's lora YAML keys with no meaning here: accepted so its configs run unchanged.
MLX_LM_IGNORED_KEYS = (
    "train", "test", "test_batches", "wandb", "report_to", "project_name", "config",
    "resume_adapter_file", "hf_dataset", "optimizer_config",
)
MLX_LM_SCHEDULES = {"cosine_decay": "cosine", "linear_schedule": "linear"}

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
DEFAULTS = TrainConfig()


def _same(name: str):
    """A field that means what TrainConfig's field of that name means, with its default."""
    return _opt(FIELDS[name].default, FIELDS[name].metadata["help"])


@dataclass(frozen=True)
class GenerateConfig:
    """`mlx-lora generate` and the API's generate(): how to sample."""

    max_tokens: int = _opt(100, "Tokens to generate.")
    temp: float = _opt(0.0, "Sampling temperature; 0 = greedy.")
    chat: bool = _opt(True, "Wrap the prompt in the tokenizer's chat template when it has one.")


@dataclass(frozen=True)
class EvalConfig:
    """`mlx-lora eval` and the API's evaluate(): what to measure."""

    split: str = _opt("test", "Which split of --data.")
    generate: int = _opt(0, "Exact-match accuracy of greedy generations on the first N prompt/"
                            "completion or chat records; -1 = all, 0 = none.")
    max_seq_length: int = _same("max_seq_length")
    batch_size: int = _opt(FIELDS["batch_size"].default, "Records per batch for the loss.")
    mask_prompt: bool = _same("mask_prompt")


@dataclass(frozen=True)
class FuseConfig:
    """`mlx-lora fuse`: the fused model's location and precision."""

    save_path: str = _opt("fused_model", "Directory for the fused model.")
    dequantize: bool = _opt(False, "Write a float model (transformers loads it too).")
    quantize: int = _opt(0, "Re-quantize every layer to this many bits; 0 = keep the base's "
                            "precision.")
    group_size: int = _same("group_size")
    delta_tolerance: float = _opt(
        0.1, "Keep an adapted layer of a quantized base at its bits only if its update survives "
             "within this relative error; else 8 bits, else float.")


def read_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config into TrainConfig keys, translating mlx-lm's lora keys."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the config file ({e})") from None
    try:
        raw = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(
            f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})"
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config file must be a mapping of keys to values")
    return _translate_mlx_lm_keys(raw, path)


def _translate_mlx_lm_keys(raw: dict, path: str) -> dict[str, Any]:
    values = {}
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        if key in MLX_LM_IGNORED_KEYS:
            continue
        if key == "lora_parameters":
            values.update(_lora_parameters(value, path))
        elif key == "lr_schedule" and isinstance(value, dict):
            values.update(_mlx_lm_schedule(value, path))
        elif key in FIELDS:
            values[key] = value
        else:
            known = ", ".join(sorted(FIELDS))
            raise UserError(f"{path}: unknown key '{key}' (known keys: {known})")
    return values


def _lora_parameters(params: Any, path: str) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise UserError(f"{path}: lora_parameters must be a mapping (rank, scale, dropout, keys)")
    values = {}
    for key in params:
        if key not in ("rank", "scale", "alpha", "dropout", "keys"):
            raise UserError(f"{path}: unknown key 'lora_parameters.{key}'")
    if "rank" in params:
        values["rank"] = params["rank"]
    if "dropout" in params:
        values["dropout"] = params["dropout"]
    if "alpha" in params:
        values["alpha"] = params["alpha"]
    elif "scale" in params:
        # mlx-lm stores the scale itself; alpha = scale * rank gives it back.
        values["alpha"] = float(params["scale"]) * int(params.get("rank", FIELDS["rank"].default))
    if params.get("keys"):
        values["targets"] = ",".join(params["keys"])
    return values


def _mlx_lm_schedule(schedule: dict, path: str) -> dict[str, Any]:
    name = schedule.get("name")
    if name not in MLX_LM_SCHEDULES:
        raise UserError(
            f"{path}: lr_schedule.name '{name}' is not supported "
            f"(use one of {', '.join(MLX_LM_SCHEDULES)}, or lr_schedule: constant|cosine|linear)"
        )
    values = {"lr_schedule": MLX_LM_SCHEDULES[name]}
    if schedule.get("arguments"):
        values["learning_rate"] = schedule["arguments"][0]
    if schedule.get("warmup"):
        values["warmup"] = schedule["warmup"]
    return values


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any],
                 source: str) -> TrainConfig:
    """Merge defaults < config file < flags, check types and ranges, and freeze."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    typed = {key: _coerce(key, value, source) for key, value in merged.items()}
    config = TrainConfig(**typed)
    _check_ranges(config, source)
    return config


def _coerce(key: str, value: Any, source: str) -> Any:
    kind = type(FIELDS[key].default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML reads 1e-4 as a string
            value = float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(
            f"{source}: '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    choices = FIELDS[key].metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{source}: '{key}' must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_ranges(config: TrainConfig, source: str) -> None:
    positive = ("rank", "batch_size", "grad_accumulation_steps", "group_size", "max_seq_length",
                "steps_per_report", "save_every", "keep_checkpoints")
    for key in positive:
        if getattr(config, key) <= 0:
            raise UserError(f"{source}: '{key}' must be positive, got {getattr(config, key)}")
    non_negative = ("iters", "epochs", "learning_rate", "weight_decay", "warmup", "max_grad_norm",
                    "steps_per_eval", "early_stopping_patience")
    for key in non_negative:
        if getattr(config, key) < 0:
            raise UserError(f"{source}: '{key}' must not be negative, got {getattr(config, key)}")
    if not 0.0 <= config.dropout < 1.0:
        raise UserError(f"{source}: 'dropout' must be in [0, 1), got {config.dropout}")
    if config.quantize not in (0, 2, 3, 4, 5, 6, 8):
        raise UserError(f"{source}: 'quantize' must be 0 (off), 4 or 8 (or 2, 3, 5, 6 bits)")
    if config.num_layers == 0 or config.num_layers < -1:
        raise UserError(f"{source}: 'num_layers' must be -1 (all) or a positive count")
    if config.val_batches == 0 or config.val_batches < -1:
        raise UserError(f"{source}: 'val_batches' must be -1 (all) or a positive count")


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved configuration as plain keys, as written to the adapter directory."""
    return dataclasses.asdict(config)
