"""A run's resolved configuration, config.yaml in the adapter directory: written, read back."""

from pathlib import Path

import yaml

from mlx_lora.formats.atomic import write_text_atomic

RUN_CONFIG_FILE = "config.yaml"


def write_run_config(adapter_dir: Path, values: dict) -> None:
    """Write the resolved configuration atomically, keys in the order given."""
    write_text_atomic(Path(adapter_dir) / RUN_CONFIG_FILE, yaml.safe_dump(values, sort_keys=False))


def read_run_config(adapter_dir: Path) -> dict | None:
    """The resolved configuration of an mlx-lora run, or None where there is none to read."""
    try:
        values = yaml.safe_load((Path(adapter_dir) / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return values if isinstance(values, dict) else None


def changed_settings(adapter_dir: Path, now: dict, keys) -> list[str]:
    """"key old -> new" for each of `keys` whose value in the run written there differs from
    `now` (none when no run config is there to compare with)."""
    previous = read_run_config(adapter_dir) or {}
    return [f"{key} {previous[key]!r} -> {now[key]!r}" for key in keys
            if key in previous and previous[key] != now[key]]


def trained_quantization(adapter_dir: Path) -> tuple[int, int] | None:
    """(bits, group_size) the base was quantized to on load in training (QLoRA), if it was."""
    run = read_run_config(adapter_dir)
    try:
        bits, group_size = int(run.get("quantize") or 0), int(run["group_size"])
    except (AttributeError, KeyError, ValueError, TypeError):
        return None  # not written by an mlx-lora run: the base is used as it is
    return (bits, group_size) if bits else None
