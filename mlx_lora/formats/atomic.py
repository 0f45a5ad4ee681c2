"""Atomic writes: a temp file in the same directory, then os.replace: a crash tears no file."""

import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from mlx_lora.errors import UserError


def write_atomic(path: Path, write: Callable[[Path], None], suffix: str = ".tmp") -> None:
    """Call write(tmp_path) and move the result over `path` only once it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~umask())  # mkstemp's 0600 -> what open() would give
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as e:  # MLX reports a failed write as RuntimeError
        raise UserError(
            f"{path}: cannot write ({e}); the previous version of the file is kept. "
            "Free disk space (or fix permissions) and rerun with --resume"
        ) from None
    finally:
        tmp_path.unlink(missing_ok=True)


@functools.cache
def umask() -> int:
    """The process's file-creation mask (read once; Linux tells it without changing it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, then restore
        os.umask(mask)
        return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, data: dict) -> None:
    """Write a JSON file atomically, indented for people to read."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_safetensors_atomic(path: Path, arrays: dict[str, mx.array], metadata=None) -> None:
    """Write a safetensors file atomically."""
    # The suffix keeps mx.save_safetensors from appending ".safetensors" to the temp name.
    def write(tmp: Path) -> None:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})

    write_atomic(path, write, suffix=".tmp.safetensors")
