"""--config files (YAML or JSON) into TrainConfig keys; mlx-lm's lora YAML keys translated.

Every key is honoured or refused in one line naming it: nothing a user wrote is ignored.
"""

import json
from pathlib import Path
from typing import Any

import yaml

from mlx_lora.config import ALIASES, FIELDS, unknown_key
from mlx_lora.console import status
from mlx_lora.errors import UserError
from mlx_lora.train.trackers import services

# mlx-lm's schedule names -> ours, and where its arguments go in our keys.
MLX_LM_SCHEDULES = {
    "cosine_decay": ("cosine", ("learning_rate", "decay_steps", "end_learning_rate")),
    "linear_schedule": ("linear", ("learning_rate", "end_learning_rate", "decay_steps")),
}
ADAM_KEYS = {"betas": ("adam_beta1", "adam_beta2"), "eps": "adam_epsilon",
             "weight_decay": "weight_decay", "bias_correction": "bias_correction"}
# mlx-lm's hf_dataset block: its keys -> ours ("config" is handled apart: a name or {name}).
HF_DATASET_KEYS = {"path": "data", "train_split": "train_split", "valid_split": "valid_split",
                   "test_split": "test_split", "prompt_feature": "prompt_feature",
                   "completion_feature": "completion_feature", "text_feature": "text_feature",
                   "chat_feature": "chat_feature", "mask_prompt": "mask_prompt"}

# mlx-lm-lora keys with no counterpart here: fine at their no-op value, refused otherwise.
NO_OP_VALUES = {
    "reward_scaling": (1.0, "ORPO reward scaling (mlx-lm-lora does not implement it either)"),
    "delta": (50.0, "dpop loss type (delta is its weight); use dpo_loss_type sigmoid, ipo or "
                    "hinge"),
    "reference_model_path": (None, "separate reference model: the reference is the model DPO "
                                   "starts from (the base, with resume_adapter_file if set)"),
    "judge": (None, "online preference modes"),
    "load_in_mxfp4": (False, "mxfp4 quantization; use quantize: 4"),
}
LOAD_IN_BITS = {"load_in_4bits": 4, "load_in_6bits": 6, "load_in_8bits": 8}  # mlx-lm-lora's


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that states a key twice."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _unique_json_object(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if duplicate := next((k for k in keys if keys.count(k) > 1), None):
        raise ValueError(f"duplicate key '{duplicate}'")
    return dict(pairs)


def read_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config into TrainConfig keys, translating mlx-lm's lora keys."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the config file ({e})") from None
    try:
        raw = (json.loads(text, object_pairs_hook=_unique_json_object) if path.endswith(".json")
               else yaml.load(text, Loader=_UniqueKeyLoader))  # noqa: S506 (a SafeLoader)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except ValueError as e:  # a duplicate JSON key
        raise UserError(f"{path}: {e}; state each key once") from None
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
    raw = {str(key).replace("-", "_"): value for key, value in raw.items()}
    for alias in set(raw) & set(ALIASES):
        if ALIASES[alias] in raw:
            raise UserError(f"{path}: both '{alias}' and '{ALIASES[alias]}' are set; they are "
                            "the same key, keep one")
        raw[ALIASES[alias]] = raw.pop(alias)
    if "hf_dataset" in raw and "data" in raw:
        raise UserError(f"{path}: both 'data' and 'hf_dataset' name the data; keep one")
    values = _logging_keys(raw, path)
    for key, value in raw.items():
        if key == "config" or (key == "train" and value is True):
            continue  # the file's own path; mlx-lm's "do train", which is what train does
        if key == "train":
            raise UserError(f"{path}: train: {value!r} asks mlx-lm not to train; mlx-lora train "
                            "always trains (for a test-only run use mlx-lora eval)")
        if key in NO_OP_VALUES:
            if value != NO_OP_VALUES[key][0]:
                raise UserError(f"{path}: '{key}' is set, but mlx-lora has no "
                                f"{NO_OP_VALUES[key][1]}; remove the key")
        elif key in LOAD_IN_BITS:
            if value:
                values["quantize"] = LOAD_IN_BITS[key]
        elif key == "hf_dataset":
            values.update(_hf_dataset(value, path))
        elif key == "lora_parameters":
            values.update(_lora_parameters(value, path))
        elif key == "lr_schedule" and isinstance(value, dict):
            values.update(_mlx_lm_schedule(value, path))
        elif key == "optimizer_config":
            values.update(_optimizer_config(value, raw.get("optimizer"), path))
        elif key in FIELDS:
            values[key] = value
        else:
            raise UserError(f"{path}: {unknown_key(key)}")
    return values


def _hf_dataset(block: Any, path: str) -> dict[str, Any]:
    """mlx-lm's hf_dataset block (one data set) as our keys."""
    if isinstance(block, list) and len(block) == 1:
        block = block[0]
    if isinstance(block, list):
        raise UserError(f"{path}: hf_dataset lists {len(block)} data sets; mlx-lora trains on "
                        "one (merge them into one data set first)")
    if not isinstance(block, dict) or "path" not in block:
        raise UserError(f"{path}: hf_dataset must be a mapping with at least 'path' (and "
                        f"optionally {', '.join(k for k in HF_DATASET_KEYS if k != 'path')}, "
                        "config)")
    values = {}
    for key, value in block.items():
        if key == "config":
            values["dataset_config"] = _dataset_config(value, path)
        elif key in HF_DATASET_KEYS:
            values[HF_DATASET_KEYS[key]] = value
        else:
            raise UserError(f"{path}: unknown key 'hf_dataset.{key}' (known: "
                            f"{', '.join(HF_DATASET_KEYS)}, config)")
    return values


def _dataset_config(value: Any, path: str) -> str:
    """hf_dataset.config: the configuration's name, alone or as mlx-lm's {name: ...}."""
    if isinstance(value, dict) and set(value) <= {"name"}:
        value = value.get("name", "")
    if not isinstance(value, str):
        raise UserError(f"{path}: hf_dataset.config must be the configuration's name (or "
                        "{name: NAME}); other load_dataset arguments are not supported")
    return value


def _logging_keys(raw: dict, path: str) -> dict[str, Any]:
    """Takes mlx-lm's report_to and project_name out of raw (null is its default), and its
    older `wandb: PROJECT`, which is report_to with wandb added and that project_name."""
    values = {key: raw.pop(key) for key in ("report_to", "project_name") if key in raw}
    values = {key: value for key, value in values.items() if value is not None}
    project = raw.pop("wandb", None)
    if project in (None, ""):
        return values
    if not isinstance(project, str):
        raise UserError(f"{path}: wandb must be a project's name (or use report_to: wandb)")
    if values.get("project_name", project) not in ("", project):
        raise UserError(f"{path}: 'wandb' and 'project_name' name different projects "
                        f"('{project}', '{values['project_name']}'); keep one")
    named = services(f"{values.get('report_to') or ''},wandb", f"{path}: 'report_to'")
    return {**values, "report_to": ",".join(named), "project_name": project}


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
    for key in schedule:
        if key not in ("name", "arguments", "warmup", "warmup_init"):
            raise UserError(f"{path}: unknown key 'lr_schedule.{key}'")
    name = schedule.get("name")
    if name not in MLX_LM_SCHEDULES:
        raise UserError(
            f"{path}: lr_schedule.name '{name}' is not supported "
            f"(use one of {', '.join(MLX_LM_SCHEDULES)}, or lr_schedule: constant|cosine|linear)"
        )
    ours, argument_keys = MLX_LM_SCHEDULES[name]
    arguments = schedule.get("arguments") or []
    if not isinstance(arguments, list) or len(arguments) > len(argument_keys):
        raise UserError(f"{path}: lr_schedule.arguments of {name} are "
                        f"[{', '.join(argument_keys)}] (at most {len(argument_keys)} values)")
    values = {"lr_schedule": ours, **dict(zip(argument_keys, arguments, strict=False))}
    for key in ("warmup", "warmup_init"):
        if schedule.get(key) is not None:
            values[key] = schedule[key]
    return values


def _optimizer_config(config: Any, optimizer: str | None, path: str) -> dict[str, Any]:
    """The chosen Adam's settings from mlx-lm's optimizer_config; others are said, not used."""
    if not isinstance(config, dict):
        raise UserError(f"{path}: optimizer_config must be a mapping of optimizer names")
    chosen = optimizer or ("adam" if config.get("adam") and not config.get("adamw") else "adamw")
    values = {}
    for name, settings in config.items():
        if not settings:
            continue
        if name != chosen:
            status(f"note: {path}: optimizer_config.{name} is not used (the optimizer is "
                   f"{chosen})")
            continue
        if not isinstance(settings, dict):
            raise UserError(f"{path}: optimizer_config.{name} must be a mapping")
        for key, value in settings.items():
            if key not in ADAM_KEYS:
                raise UserError(f"{path}: unknown key 'optimizer_config.{name}.{key}' "
                                f"(known: {', '.join(ADAM_KEYS)})")
            if key == "betas":
                if not isinstance(value, list) or len(value) != 2:
                    raise UserError(f"{path}: optimizer_config.{name}.betas must be [b1, b2]")
                values.update(zip(ADAM_KEYS["betas"], value, strict=True))
            else:
                values[ADAM_KEYS[key]] = value
    return values
