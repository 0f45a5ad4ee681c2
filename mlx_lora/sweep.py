"""Hyper-parameter sweeps: every combination of a grid trained in turn, each an ordinary,
resumable run in its own directory, then one table of validation loss, speed and memory.

    OUTPUT/learning_rate=1e-4,rank=8/   a run directory (adapters, metrics.jsonl, config.yaml)
    OUTPUT/sweep.md, sweep.json         the table, best first
    OUTPUT/best.yaml                    the best run's resolved config (train --config takes it)
"""

import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lora.api import Finetune
from mlx_lora.config import ALIASES, FIELDS, TrainConfig, to_dict, unknown_key
from mlx_lora.console import status
from mlx_lora.errors import UserError
from mlx_lora.formats.atomic import write_json_atomic, write_text_atomic
from mlx_lora.formats.metrics import read_metrics
from mlx_lora.formats.output_dir import check_writable, exclusive, foreign_entries
from mlx_lora.formats.run_config import RUN_CONFIG_FILE, changed_settings
from mlx_lora.train.checks import with_run_defaults

TABLE_FILE, JSON_FILE, BEST_FILE = "sweep.md", "sweep.json", "best.yaml"
MARKER = ".mlx-lora-sweep"
OTHER_DATA = "losses on different data do not compare; sweep each data set separately"
# Keys whose values would make the runs' validation losses measure different things, or that
# the sweep owns; the table ranks runs by one number, so it must mean the same in every run.
NOT_SWEPT = {
    "adapter_path": "the sweep gives each run its own directory under --output",
    "model": "losses under different tokenizers do not compare; sweep each model separately",
    **dict.fromkeys(("data", "dataset_config", "valid_split"), OTHER_DATA),
    "train_mode": "losses of different objectives do not compare",
    "mask_prompt": "it changes which tokens the validation loss is over",
    **dict.fromkeys(("valid_fraction", "val_batches"), "it changes the validation set"),
}
# config.yaml keys a run may set on its own: where it writes, and auto choices of how (not
# what) it computes, which it records as it resolved them (packing, attention, QLoRA's matmul,
# the default memory limit).
RUN_DECIDES = ("adapter_path", "pack", "attention", "qlora_matmul", "memory_limit")
BOOLS = {"true": True, "yes": True, "on": True, "1": True,
         "false": False, "no": False, "off": False, "0": False}
SKIP_NOTES = {"done": ": finished before, skipped", "resume": " (continuing where it stopped)",
              "new": ""}

Grid = dict[str, list[tuple[str, Any]]]  # field name -> [(value as written, typed value)]


@dataclass(frozen=True)
class Run:
    """One combination: its directory, the grid values, and how it starts."""

    name: str  # the directory's name: key=text,key=text
    texts: dict[str, str]  # field name -> the value as written
    job: Finetune
    state: str  # "done" (skipped), "resume" (an unfinished run is there) or "new"

    @property
    def adapter_dir(self) -> Path:
        return Path(self.job.config.adapter_path)


@dataclass(frozen=True)
class Row:
    """A finished run's line of the table, from its metrics.jsonl."""

    run: Run
    val_loss: float | None  # the best of its validation evaluations
    rate_key: str | None  # "tokens_per_sec" (or "pairs_per_sec" for preference runs)
    rate: float | None  # the median train event's: the steady rate, not the compiling start
    peak_memory_gb: float | None
    step: int


@dataclass(frozen=True)
class SweepResult:
    """How a sweep ended: the table, best first, once every run has finished."""

    finished: bool
    rows: list[Row]
    table: str  # markdown, as in sweep.md
    best_config: Path | None  # best.yaml; None without validation or when stopped


def parse_grid(specs: Sequence[str]) -> Grid:
    """`KEY=V1,V2` texts into typed values per TrainConfig field, in the order given."""
    grid: Grid = {}
    for spec in specs:
        raw_key, sep, raw_values = spec.partition("=")
        key = raw_key.strip().replace("-", "_")
        key = ALIASES.get(key, key)
        if not sep or not key:
            raise UserError(f"--grid {spec!r}: expected KEY=VALUE,VALUE (learning_rate=1e-4,3e-4)")
        if key not in FIELDS:
            raise UserError(f"--grid {raw_key.strip()}: {unknown_key(key)}")
        if key in NOT_SWEPT:
            raise UserError(f"--grid {key}: not sweepable: {NOT_SWEPT[key]}")
        if key in grid:
            raise UserError(f"--grid {key} is given twice; list all its values in one --grid")
        texts = [text.strip() for text in raw_values.split(",")]
        values = [(text, parse_value(key, text)) for text in texts]
        typed = [value for _, value in values]
        if len(set(typed)) < len(typed):
            raise UserError(f"--grid {key}={raw_values}: a value is given twice")
        grid[key] = values
    return grid


def parse_value(key: str, text: str) -> Any:
    """One grid value as the field's type (int, float, bool or str), checked."""
    kind = type(FIELDS[key].default)
    where = f"--grid {key}={text}"
    if not text or "/" in text:
        raise UserError(f"{where}: each value names a run's directory, so it must be non-empty "
                        "and hold no '/'")
    try:
        value = BOOLS[text.lower()] if kind is bool else kind(text)
    except (KeyError, ValueError):
        expected = "true or false" if kind is bool else f"an {kind.__name__}" if kind is int \
            else f"a {kind.__name__}"
        raise UserError(f"{where}: {key} takes {expected}") from None
    if kind is float and not math.isfinite(value):
        raise UserError(f"{where}: {key} takes a finite number")
    choices = FIELDS[key].metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{where}: {key} is one of {', '.join(choices)}")
    return value


def plan_runs(config_file: str | None, grid: Grid, output: Path, fixed: dict) -> list[Run]:
    """Every combination's job and state; refuses anything wrong before a run trains."""
    fixed = {ALIASES.get(key, key): value for key, value in fixed.items() if value is not None}
    for key in fixed:
        if key in grid or key == "adapter_path":
            raise UserError(f"--{key.replace('_', '-')} is set, but the sweep sets {key} "
                            f"itself ({NOT_SWEPT.get(key, 'from --grid')}); give it one way")
    runs = []
    for combination in itertools.product(*grid.values()):
        texts = {key: text for key, (text, _) in zip(grid, combination, strict=True)}
        values = {key: value for key, (_, value) in zip(grid, combination, strict=True)}
        name = ",".join(f"{key}={text}" for key, text in texts.items())
        run_dir = output / name
        if foreign := foreign_entries(run_dir):
            raise UserError(f"{run_dir}: holds files mlx-lora did not write ({foreign[0]}, ...); "
                            "move them, or pick another --output")
        state = _state(run_dir)
        try:
            job = Finetune(config=config_file, adapter_path=str(run_dir),
                           resume=state == "resume", **fixed, **values)
        except UserError as e:
            raise UserError(f"--grid {name}: {e}") from None
        _check_same_settings(run_dir, job.config)
        runs.append(Run(name, texts, job, state))
    return runs


def _state(run_dir: Path) -> str:
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "new"
    finished = any(e.get("event") == "done" for e in read_metrics(run_dir))
    return "done" if finished else "resume"  # a resume without a checkpoint starts at step 0


def _check_same_settings(run_dir: Path, config: TrainConfig) -> None:
    """Refuse a run directory whose run had other settings: one table must not mix them."""
    now = to_dict(with_run_defaults(run_dir, config))  # unset targets: as that run resolved them
    changed = changed_settings(run_dir, now, [key for key in now if key not in RUN_DECIDES])
    if changed:
        raise UserError(f"{run_dir}: holds a run with other settings ({'; '.join(changed)}); "
                        "pick another --output, or delete that directory to run it again")


def run_sweep(config_file: str | None, grid_specs: Sequence[str], output: str | Path,
              fixed: dict, stop=None, callback: Callable[[dict], None] | None = None
              ) -> SweepResult:
    """Train every combination not finished yet, then write the table and best.yaml.

    fixed: TrainConfig keys for every run (None values are ignored). stop, callback: as
    Finetune.train takes them, for each run. A stopped run ends the sweep unfinished.
    """
    grid = parse_grid(grid_specs)
    output = Path(output)
    check_writable(output, "--output")
    with exclusive(output, "mlx-lora sweep"):
        if output.is_dir() and any(output.iterdir()) and not (output / MARKER).is_file():
            raise UserError(f"--output {output}: holds files that are not a sweep's; pick an "
                            "empty or new directory")
        runs = plan_runs(config_file, grid, output, fixed)
        write_text_atomic(output / MARKER, "an mlx-lora sweep writes here\n")
        for number, run in enumerate(runs, 1):
            label = ", ".join(f"{key}={text}" for key, text in run.texts.items())
            status(f"run {number} of {len(runs)}: {label}{SKIP_NOTES[run.state]}")
            if run.state != "done" and not run.job.train(callback=callback, stop=stop).finished:
                status(f"sweep stopped in run {number} of {len(runs)} (its checkpoint is "
                       "saved); run the same command again to continue")
                return SweepResult(False, [], "", None)
        return _write_results(output, grid, runs)


def summarize(run: Run) -> Row:
    """The run's best validation loss, median speed and peak memory, from its metrics.jsonl."""
    events = read_metrics(run.adapter_dir)
    vals = [e["val_loss"] for e in events if e.get("event") == "val" and "val_loss" in e]
    train = [e for e in events if e.get("event") == "train"]
    rate_key = next((k for e in train for k in e if k.endswith("_per_sec")), None)
    rates = [e[rate_key] for e in train if rate_key in e]
    memory = [e["peak_memory_gb"] for e in events if "peak_memory_gb" in e]
    return Row(run, min(vals) if vals else None, rate_key,
               statistics.median(rates) if rates else None, max(memory) if memory else None,
               max((e.get("step", 0) for e in events), default=0))


def ranked(rows: list[Row]) -> list[Row]:
    """Lowest validation loss first; runs without validation last, in the order they ran."""
    return sorted(rows, key=lambda r: (r.val_loss is None, r.val_loss or 0.0))


def markdown(rows: list[Row], keys: list[str]) -> str:
    """The table as markdown: one column per grid key, then the measurements."""
    rate_key = next((r.rate_key for r in rows if r.rate_key), "tokens_per_sec")
    head = [*keys, "val loss", rate_key.replace("_per_sec", "/s"), "peak memory (GB)", "steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(keys) + "---:|" * 4]
    for r in rows:
        cells = [*(r.run.texts[k] for k in keys), _number(r.val_loss, ".4f"),
                 _number(r.rate, ",.0f"), _number(r.peak_memory_gb, ".3f"), str(r.step)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _write_results(output: Path, grid: Grid, runs: list[Run]) -> SweepResult:
    rows = ranked([summarize(run) for run in runs])
    table = markdown(rows, list(grid))
    best = rows[0] if rows and rows[0].val_loss is not None else None
    best_path = output / BEST_FILE
    if best is None:
        best_path.unlink(missing_ok=True)  # an older sweep's best is not this one's
    else:
        text = (best.run.adapter_dir / RUN_CONFIG_FILE).read_text(encoding="utf-8")
        write_text_atomic(best_path, f"# the best run of the sweep: {best.run.name} (validation "
                                     f"loss {best.val_loss:.4f})\n{text}")
    write_text_atomic(output / TABLE_FILE, table)
    write_json_atomic(output / JSON_FILE, {
        "grid": {key: [text for text, _ in values] for key, values in grid.items()},
        "best": best and best.run.name,
        "best_config": best and str(best_path),
        "runs": [{"name": r.run.name, "adapter_path": str(r.run.adapter_dir),
                  "values": {key: getattr(r.run.job.config, key) for key in grid},
                  "val_loss": r.val_loss, r.rate_key or "tokens_per_sec": r.rate,
                  "peak_memory_gb": r.peak_memory_gb, "step": r.step} for r in rows]})
    return SweepResult(True, rows, table, best_path if best else None)
