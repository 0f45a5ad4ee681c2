"""The one owner of everything a run writes: adapters, best, checkpoints, metrics, resolved
config, plot, console lines, experiment trackers, and the events a caller subscribes to.

Only a writing process (rank 0 of several) touches files or the console; that is decided here
and nowhere else. Every event goes to metrics.jsonl and to the callback as the same dict.
"""

import os
from collections.abc import Callable
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from pathlib import Path

import mlx.nn as nn
import mlx.optimizers as optim

from mlx_lora.adapters.inject import AdapterSpec
from mlx_lora.console import status
from mlx_lora.formats.atomic import write_text_atomic
from mlx_lora.formats.metrics import (
    METRICS_FILE,
    append_metrics,
    read_metrics,
    truncate_metrics,
)
from mlx_lora.formats.mlx_lm_adapter import CONFIG_FILE, WEIGHTS_FILE, save_adapters
from mlx_lora.formats.output_dir import MARKER, is_ours, remove_our_files
from mlx_lora.formats.run_config import RUN_CONFIG_FILE, write_run_config
from mlx_lora.plot import PLOT_FILE, plot_run
from mlx_lora.train.checkpoint import CHECKPOINTS, STATE, Position, save_checkpoint
from mlx_lora.train.progress import ProgressBar
from mlx_lora.train.sharded import whole_state
from mlx_lora.train.trackers import Trackers

BEST_DIR = "best"
# What a run writes at the top of its directory; a fresh run deletes these (only in a
# directory of ours) and, under checkpoints/ and best/, only what it writes there.
RUN_FILES = (METRICS_FILE, RUN_CONFIG_FILE, PLOT_FILE, WEIGHTS_FILE, CONFIG_FILE)
Callback = Callable[[dict], None]


class RunReport:
    """Writes a run's files and lines; remembers the latest event of each kind.

    A context manager: leaving it closes the experiment trackers, however the run ended.
    """

    def __init__(self, adapter_dir: Path, base_model: str, callback: Callback | None = None,
                 writes: bool = True, unit: str = "tokens"):
        self.adapter_dir = Path(adapter_dir)
        self.unit = unit  # what the objective counts: "trained_<unit>" in events
        self.base_model = base_model
        self.spec: AdapterSpec | None = None  # set once the adapters are in the model
        self.callback, self.writes = callback, writes
        self.bar: ProgressBar | None = None
        self.latest: dict[str, dict] = {}  # event name -> its latest record
        self.trackers = Trackers()  # opened by start(), from the config's report_to
        self.quiet = ExitStack()

    def __enter__(self) -> "RunReport":
        if not self.writes:  # another rank prints: this one's other lines go nowhere too
            devnull = self.quiet.enter_context(open(os.devnull, "w"))
            self.quiet.enter_context(redirect_stdout(devnull))
            self.quiet.enter_context(redirect_stderr(devnull))
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        self.quiet.close()
        self.trackers.close(failed=error_type is not None)

    def say(self, text: str) -> None:
        """One line for the person at the terminal (through the bar while it is drawn)."""
        if not self.writes:
            return
        if self.bar is not None:
            self.bar.message(text)
        else:
            status(text)

    def event(self, record: dict) -> None:
        """A metrics line: appended to metrics.jsonl and handed to the callback."""
        record = {k: v for k, v in record.items() if v is not None}
        self.latest[record["event"]] = record
        if self.writes:
            append_metrics(self.adapter_dir, record)
            self.trackers(record)
        if self.callback is not None:
            self.callback(dict(record))

    def start(self, resolved_config: dict, position: Position) -> None:
        """Prepare the directory: a fresh run drops an older run's files; write the config."""
        if not self.writes:
            return
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        if position.step == 0:
            if is_ours(self.adapter_dir):
                remove_our_files(self.adapter_dir, RUN_FILES,
                                 {CHECKPOINTS: STATE, BEST_DIR: CONFIG_FILE})
            write_text_atomic(self.adapter_dir / MARKER, "a run of mlx-lora writes here\n")
        else:
            truncate_metrics(self.adapter_dir, position.step)
            self.latest = {r["event"]: r for r in read_metrics(self.adapter_dir)}
        write_run_config(self.adapter_dir, resolved_config)
        self.trackers.open(resolved_config, self.adapter_dir, position.step)

    def open_bar(self, total_steps: int, start_step: int) -> None:
        """Start drawing the progress bar."""
        if self.writes:
            self.bar = ProgressBar(total_steps, start_step)

    def show(self, step: int, loss: float, speed: str, memory_gb: float) -> None:
        """Redraw the progress bar."""
        if self.bar is not None:
            self.bar.show(step, loss, speed, memory_gb)

    def close_bar(self) -> None:
        """Stop drawing the progress bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def save_adapters(self, model: nn.Module) -> None:
        """The current adapters at the top of the directory, where mlx-lm loads them."""
        if self.writes:
            save_adapters(self.adapter_dir, model, self.spec, self.base_model)

    def save_best(self, model: nn.Module) -> None:
        """The current adapters as the best so far, in best/."""
        if self.writes:
            save_adapters(self.adapter_dir / BEST_DIR, model, self.spec, self.base_model)

    def save_checkpoint(self, model: nn.Module, optimizer: optim.Optimizer, position: Position,
                        keep: int) -> Path:
        """Resume state for `position`; returns where it is (or would be, on other ranks)."""
        state = whole_state(optimizer)  # every rank takes part when the state is sharded
        if not self.writes:
            return self.adapter_dir / CHECKPOINTS
        return save_checkpoint(
            self.adapter_dir, lambda d: save_adapters(d, model, self.spec, self.base_model),
            state, position, keep)

    def done(self, position: Position) -> None:
        """The final metrics line, from the run's own state, and the loss plot."""
        train, val = self.latest.get("train", {}), self.latest.get("val", {})
        self.event({"event": "done", "step": position.step, "epoch": position.epoch,
                    "loss": train.get("loss"), "val_loss": val.get("val_loss"),
                    f"trained_{self.unit}": position.trained_tokens,
                    "peak_memory_gb": train.get("peak_memory_gb"),
                    "elapsed_s": round(position.elapsed_s, 3)})
        if self.writes:
            self.say(f"loss plot: {plot_run(self.adapter_dir)}")
