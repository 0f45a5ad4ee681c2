"""Resume state: adapters, optimizer, random state and data position, one directory per step.

A checkpoint is written into a hidden temp directory and renamed into place, so a crash
leaves either the whole checkpoint or none; resume picks the newest complete one.
"""

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lora.errors import UserError
from mlx_lora.formats.atomic import save_safetensors_atomic, write_json_atomic
from mlx_lora.formats.mlx_lm_adapter import WEIGHTS_FILE, read_tensors, set_adapter_weights
from mlx_lora.train.distributed import Ranks, broadcast

CHECKPOINTS = "checkpoints"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


@dataclass
class Position:
    """Where training stands: updates done, epoch, and the next batch within the epoch's plan."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0
    trained_tokens: int = 0
    elapsed_s: float = 0.0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    lowest_loss: float | None = None  # the lowest reported training loss so far


def save_checkpoint(adapter_dir: Path, save_adapters: Callable[[Path], None],
                    optimizer_state: dict, position: Position, keep: int) -> Path:
    """Write a complete checkpoint for `position` and drop all but the newest `keep`.

    save_adapters(dir) writes the adapters and their config, so a checkpoint is also an
    adapter directory that mlx-lm and mlx-lora load. optimizer_state: the optimizer's state
    as one process holds it (train.sharded gathers a sharded one).
    """
    root = Path(adapter_dir) / CHECKPOINTS
    final = root / f"step-{position.step:08d}"
    tmp = root / f".tmp-step-{position.step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_adapters(tmp)
        state = dict(tree_flatten(optimizer_state))
        state["__random_state__"] = mx.random.state[0]
        save_safetensors_atomic(tmp / OPTIMIZER, state)
        write_json_atomic(tmp / STATE, asdict(position))
        if final.exists():  # a rerun of the same step after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left behind when a write failed
    for old in list_checkpoints(adapter_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(adapter_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(adapter_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE).is_file()]
    return sorted(done, key=lambda p: p.name)


def load_checkpoint(path: Path, model: nn.Module, optimizer: optim.Optimizer) -> Position:
    """Restore adapters, optimizer and random state from a checkpoint; return its position."""
    return restore_checkpoint(read_checkpoint(path), model, optimizer)


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents: {"path", "position" (a dict), "adapters", "optimizer"
    (name -> array)}, as restore_checkpoint takes them (on any rank, see train.distributed)."""
    try:
        position = json.loads((path / STATE).read_text())
        Position(**position)  # a field it does not know fails here, naming the file
        state = mx.load(str(path / OPTIMIZER))
        adapters = read_tensors(path / WEIGHTS_FILE)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(
            f"{path}: cannot read checkpoint ({e}); delete it to use an older one"
        ) from None
    return {"path": str(path), "position": position, "adapters": adapters, "optimizer": state}


def resume_position(adapter_dir: Path, model: nn.Module, optimizer: optim.Optimizer,
                    ranks: Ranks) -> tuple[Position, str]:
    """Where a resumed run starts, restored: the newest checkpoint, read by rank 0 and handed
    to every rank (train.distributed); and the line that says so."""
    checkpoints = list_checkpoints(adapter_dir) if ranks.writes else []
    saved = broadcast(ranks, read_checkpoint(checkpoints[-1]) if checkpoints else None)
    if saved is None:
        return Position(), f"no checkpoint in {adapter_dir}/{CHECKPOINTS}: starting from step 0"
    position = restore_checkpoint(saved, model, optimizer)
    return position, f"resuming from {saved['path']} (step {position.step})"


def restore_checkpoint(saved: dict, model: nn.Module, optimizer: optim.Optimizer) -> Position:
    """Put read_checkpoint's adapters, optimizer and random state in place; its position."""
    set_adapter_weights(model, dict(saved["adapters"]), Path(saved["path"]) / WEIGHTS_FILE)
    state = dict(saved["optimizer"])
    high, low = state.pop("__random_state__").tolist()
    mx.random.seed((high << 32) | low)  # sets the key to exactly [high, low]
    optimizer.state = tree_unflatten(list(state.items()))
    return Position(**saved["position"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
