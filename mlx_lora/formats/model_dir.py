"""A model directory that mlx_lm.load serves: written beside its place, then moved in whole."""

import fnmatch
import os
import shutil
import uuid
from pathlib import Path

import mlx.nn as nn
from mlx_lm.utils import save_config, save_model

from mlx_lora.errors import UserError
from mlx_lora.formats.output_dir import check_writable

# What mlx_lm.load and transformers read besides the weights and config.json (a model's
# own code too, as mlx-lm's save copies it; it runs only where the user trusts it).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*",
                   "merges.txt", "*.tiktoken", "tiktoken.model", "chat_template*", "*.jinja",
                   "generation_config.json", "*.py")


def remove_stale_partials(save_path: Path) -> None:
    """Remove what a killed fuse of this path left beside it (we hold its lock: none is live)."""
    for pattern in (f".{save_path.name}.partial-*", f".{save_path.name}.old-*"):
        for stale in save_path.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def check_save_path(save_path: Path, protected: list[Path], overwrite: bool) -> None:
    """Refuse a --save-path that overlaps the inputs, is a file, or holds something (unless
    overwrite)."""
    check_writable(save_path, "--save-path")
    target = save_path.resolve()
    for path in protected:
        path = Path(path).resolve()
        if target == path or target in path.parents or path in target.parents:
            raise UserError(f"--save-path {save_path} overlaps {path}; pick a separate directory")
    if save_path.is_file():
        raise UserError(f"--save-path {save_path} is a file; pick a directory")
    if save_path.is_dir() and any(save_path.iterdir()) and not overwrite:
        raise UserError(f"--save-path {save_path} exists and is not empty; "
                        "pass --overwrite to replace it")
    if overwrite and (others := not_model_files(save_path)):
        raise UserError(f"--save-path {save_path} holds files that are not a model's "
                        f"({', '.join(others[:5])}); --overwrite replaces a model directory "
                        "whole, so pick another --save-path or move them")


def not_model_files(directory: Path) -> list[str]:
    """Names in a directory that a saved model directory would not hold."""
    if not directory.is_dir():
        return []
    model_patterns = ("config.json", "model*.safetensors", "model.safetensors.index.json",
                      *TOKENIZER_FILES)
    return sorted(p.name for p in directory.iterdir()
                  if not any(fnmatch.fnmatch(p.name, pattern) for pattern in model_patterns))


def write_model_dir(save_path: Path, model: nn.Module, config: dict, source: Path,
                    overwrite: bool) -> None:
    """Write weights, config and tokenizer files beside save_path, then move them into place."""
    save_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = save_path.parent / f".{save_path.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_model(tmp, model)
        save_config(dict(config), tmp / "config.json")
        for pattern in TOKENIZER_FILES:
            for file in Path(source).glob(pattern):
                if file.is_file():
                    shutil.copy2(file, tmp / file.name)
        _move_into_place(tmp, save_path, overwrite)
    except (OSError, RuntimeError) as e:  # MLX reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write the fused model to {save_path} ({e}); nothing was "
                        "left behind: free disk space (or fix permissions) and rerun") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, save_path: Path, overwrite: bool) -> None:
    # A directory rename is atomic: save_path is either the old one or the whole new one.
    if not save_path.exists():
        os.rename(tmp, save_path)
        return
    if any(save_path.iterdir()) and not overwrite:
        raise UserError(f"--save-path {save_path} appeared while fusing; pass --overwrite")
    old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
    os.rename(save_path, old)
    os.rename(tmp, save_path)
    shutil.rmtree(old, ignore_errors=True)
