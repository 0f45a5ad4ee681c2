"""A training run from a resolved config: load, read data, inject, resume, fit, save."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import yaml

from mlx_lora.adapters.inject import adapted_blocks, inject, make_spec, parameter_counts
from mlx_lora.blas import slow_blas_warning
from mlx_lora.config import RUN_CONFIG_FILE, TrainConfig, to_dict
from mlx_lora.console import status
from mlx_lora.data.records import find_splits
from mlx_lora.data.tokenize import load_split
from mlx_lora.errors import UserError
from mlx_lora.formats.atomic import write_text_atomic
from mlx_lora.formats.mlx_lm_adapter import save_adapters
from mlx_lora.load import load_base
from mlx_lora.plot import plot_run
from mlx_lora.train.checkpoint import CHECKPOINTS, Position, list_checkpoints, load_checkpoint
from mlx_lora.train.loop import Trainee, fit, total_steps
from mlx_lora.train.optim import build_optimizer
from mlx_lora.train.packed_mask import resolve_pack
from mlx_lora.train.recompute import checkpoint_blocks
from mlx_lora.train.report import METRICS_FILE, append_metrics, read_metrics
from mlx_lora.train.validation import BEST_DIR


def check_adapter_dir(adapter_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory unless told to resume or overwrite."""
    if not adapter_dir.exists():
        return
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: is not a directory; pick another --adapter-path")
    ours = [adapter_dir / METRICS_FILE, adapter_dir / RUN_CONFIG_FILE, adapter_dir / CHECKPOINTS]
    if any(p.exists() for p in ours) and not (resume or overwrite):
        raise UserError(
            f"{adapter_dir}: holds another run's files; pass --resume to continue it, "
            "--overwrite to replace it, or pick another --adapter-path"
        )


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Run training as `config` says; returns the adapter directory."""
    adapter_dir = Path(config.adapter_path)
    check_adapter_dir(adapter_dir, resume, overwrite)
    if warning := slow_blas_warning():
        status(warning)
    loaded = load_base(config.model, quantize=config.quantize, group_size=config.group_size,
                       trust_remote_code=config.trust_remote_code)
    splits = find_splits(config.data)
    train_set = load_split(splits["train"], loaded.tokenizer, config.max_seq_length,
                           config.mask_prompt)
    valid_set = []
    if "valid" in splits:
        valid_set = load_split(splits["valid"], loaded.tokenizer, config.max_seq_length,
                               config.mask_prompt)
    if not train_set:
        raise UserError(f"{splits['train']}: no example with a token to learn from")

    mx.random.seed(config.seed)
    model = loaded.model
    spec = make_spec(model, config.fine_tune_type, config.targets, config.num_layers,
                     config.rank, config.alpha, config.dropout, config.rslora)
    inject(model, spec)
    config = resolve_pack(config, model, status)
    if config.grad_checkpoint:
        checkpoint_blocks([model.layers[i] for i in adapted_blocks(model, spec.paths)])
    trainable, total = parameter_counts(model)
    status(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%) "
        f"in {len(spec.paths)} adapted layers")

    steps = total_steps(config, len(train_set))
    optimizer = build_optimizer(config, steps)
    position = _start_position(adapter_dir, model, optimizer, resume)
    optimizer.init(model.trainable_parameters())
    adapter_dir.mkdir(parents=True, exist_ok=True)
    if position.step == 0:
        _clear_previous_run(adapter_dir)
    resolved = yaml.safe_dump(to_dict(config), sort_keys=False)
    write_text_atomic(adapter_dir / RUN_CONFIG_FILE, resolved)

    status(f"training {steps} steps on {len(train_set)} examples "
        f"({len(valid_set)} for validation) into {adapter_dir}")
    trainee = Trainee(model, spec, config.model, adapter_dir)
    position = fit(trainee, optimizer, config, train_set, valid_set, position)
    save_adapters(adapter_dir, model, spec, config.model)
    append_metrics(adapter_dir, _done_record(adapter_dir, position))
    plot = plot_run(adapter_dir)
    status(f"done: the last adapters (step {position.step}) are in {adapter_dir}")
    if valid_set and config.keep_best:
        status(f"the best adapters (validation loss {position.best_val_loss:.4f} at step "
            f"{position.best_step}) are in {adapter_dir / BEST_DIR}")
    status(f"loss plot: {plot}")
    return adapter_dir


def _clear_previous_run(adapter_dir: Path) -> None:
    """A fresh run (or --overwrite) starts without an older run's metrics or checkpoints."""
    (adapter_dir / METRICS_FILE).unlink(missing_ok=True)
    for name in (CHECKPOINTS, BEST_DIR):
        shutil.rmtree(adapter_dir / name, ignore_errors=True)


def _start_position(adapter_dir: Path, model, optimizer, resume: bool) -> Position:
    if not resume:
        return Position()
    checkpoints = list_checkpoints(adapter_dir)
    if not checkpoints:
        status(f"no checkpoint in {adapter_dir}/checkpoints: starting from step 0")
        return Position()
    position = load_checkpoint(checkpoints[-1], model, optimizer)
    _truncate_metrics(adapter_dir, position.step)
    status(f"resuming from {checkpoints[-1]} (step {position.step})")
    return position


def _truncate_metrics(adapter_dir: Path, step: int) -> None:
    """Drop lines logged after the checkpoint, which the resumed run will log again."""
    kept = [r for r in read_metrics(adapter_dir) if r.get("step", 0) <= step
            and r.get("event") != "done"]
    write_text_atomic(adapter_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))


def _done_record(adapter_dir: Path, position: Position) -> dict:
    metrics = read_metrics(adapter_dir)
    last_train = next((r for r in reversed(metrics) if r["event"] == "train"), {})
    last_val = next((r for r in reversed(metrics) if r["event"] == "val"), {})
    return {"event": "done", "step": position.step, "epoch": position.epoch,
            "loss": last_train.get("loss"), "val_loss": last_val.get("val_loss"),
            "trained_tokens": position.trained_tokens,
            "peak_memory_gb": last_train.get("peak_memory_gb"),
            "elapsed_s": round(position.elapsed_s, 3)}
