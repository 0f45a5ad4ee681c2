"""Experiment trackers (--report-to): a run's train and val numbers as curves in wandb or
TensorBoard, written under the adapter directory.

The libraries are optional extras, imported only when a run names them. RunReport owns the
trackers: it opens them with the resolved config, feeds them the events metrics.jsonl gets,
and closes them however the run ends.
"""

import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mlx_lora.errors import UserError

CURVES = ("train", "val")  # the events whose numbers are logged, at their step
TENSORBOARD_DIR = "tensorboard"


class Tracker(Protocol):
    """One service's run: opened with (adapter_dir, project, config, start_step)."""

    def log(self, scalars: dict[str, float], step: int) -> None: ...
    def close(self, failed: bool) -> None: ...


class WandbRun:
    """A wandb run whose files go to <adapter_dir>/wandb/ (WANDB_MODE=offline: no network)."""

    module, extra = "wandb", "wandb"

    def __init__(self, adapter_dir: Path, project: str, config: dict, start_step: int):
        wandb = library("wandb")
        try:
            self.run = wandb.init(project=project, name=adapter_dir.name, config=config,
                                  dir=str(adapter_dir))
        except wandb.errors.Error as e:  # not logged in, no network: said in one line
            raise UserError(f"--report-to wandb could not start a run: {e} (WANDB_MODE=offline "
                            "keeps the run on this machine)") from None

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TensorBoardRun:
    """Event files in <adapter_dir>/tensorboard/, written by tensorboardX (no torch or TF)."""

    module, extra = "tensorboardX", "tensorboard"

    def __init__(self, adapter_dir: Path, project: str, config: dict, start_step: int):
        # TensorBoard drops what an earlier run here logged from purge_step on: all of it
        # for a fresh run, what followed the checkpoint for a resumed one. The file names
        # hold only the second; the suffix keeps a quick resume from overwriting, in order.
        self.writer = library("tensorboard").SummaryWriter(
            str(adapter_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else 0,
            filename_suffix=f".{time.time_ns()}")
        indented = "\n".join("    " + line for line in json.dumps(config, indent=2).splitlines())
        self.writer.add_text("config", indented, start_step)  # a markdown code block

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


TRACKERS = {"wandb": WandbRun, "tensorboard": TensorBoardRun}


def services(report_to: str, where: str = "--report-to") -> list[str]:
    """The names in a report_to value ("wandb,tensorboard"), each a known one."""
    names = [name.strip().lower() for name in report_to.split(",") if name.strip()]
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"{where}: unknown service '{name}'; the choices are "
                            f"{', '.join(TRACKERS)}, or several joined by commas")
    return list(dict.fromkeys(names))


def library(name: str):
    """The module a service's tracker writes with; missing, a UserError naming the extra."""
    tracker = TRACKERS[name]
    try:
        return importlib.import_module(tracker.module)
    except ImportError:
        raise UserError(f"--report-to {name} needs the {tracker.module} package: "
                        f"pip install 'mlx-lora[{tracker.extra}]'") from None


def check_installed(report_to: str) -> None:
    """Fail now, before any model loads, when a named service's library is missing."""
    for name in services(report_to):
        library(name)


@dataclass
class Trackers:
    """The trackers a run reports to; called with every event dict, like a callback."""

    runs: list[Tracker] = field(default_factory=list)

    def open(self, config: dict, adapter_dir: Path, start_step: int) -> None:
        """Start the runs the resolved config's report_to names (none when it is empty)."""
        adapter_dir = Path(adapter_dir).resolve()  # its name even when given as "."
        project = config["project_name"] or adapter_dir.name
        for name in services(config["report_to"]):
            # appended one by one, so a failure closes those already open
            self.runs.append(TRACKERS[name](adapter_dir, project, config, start_step))

    def __call__(self, record: dict) -> None:
        """A train or val event's numbers as scalars at its step: train/loss, val/val_loss."""
        if record["event"] not in CURVES:
            return
        scalars = {f"{record['event']}/{key}": value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float))
                   and not isinstance(value, bool)}
        for run in self.runs:
            run.log(scalars, record["step"])

    def close(self, failed: bool = False) -> None:
        """Finish every run (marked failed when the run raised)."""
        runs, self.runs = self.runs, []
        for run in runs:
            run.close(failed)
