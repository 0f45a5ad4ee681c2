"""What a run tells the world: metrics.jsonl lines and a progress bar on stderr."""

import json
import math
import os
import sys
import time
from pathlib import Path

import mlx.core as mx

METRICS_FILE = "metrics.jsonl"


def peak_memory_gb() -> float:
    """Peak memory MLX has allocated in this process, in GB."""
    return mx.get_peak_memory() / 1e9


def append_metrics(adapter_dir: Path, record: dict) -> None:
    """Append one JSON line in a single write, flushed to disk, so a crash never tears a line."""
    line = json.dumps({k: v for k, v in record.items() if v is not None}) + "\n"
    fd = os.open(Path(adapter_dir) / METRICS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_metrics(adapter_dir: Path) -> list[dict]:
    """The metrics lines of a run; a torn last line (from a crash mid-write) is skipped."""
    path = Path(adapter_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class Window:
    """Token-weighted training loss and throughput since the last report."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Start a new reporting window."""
        self.sum_loss, self.tokens, self.updates, self.padding = 0.0, 0, 0, 0.0
        self.start = time.perf_counter()

    def add(self, loss: float, n_tokens: int, padding: float) -> None:
        """Count one update."""
        self.sum_loss += loss * n_tokens
        self.tokens += n_tokens
        self.updates += 1
        self.padding += padding

    def summary(self) -> dict:
        """Mean loss, tokens per second and padding fraction over the window."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return {
            "loss": self.sum_loss / max(self.tokens, 1),
            "tokens_per_sec": self.tokens / seconds,
            "padding_fraction": self.padding / max(self.updates, 1),
        }


class ProgressBar:
    """One line on stderr, redrawn in place on a terminal and printed every report otherwise."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total = total_steps
        self.start_time = time.perf_counter()
        self.start_step = start_step
        self.tty = sys.stderr.isatty()

    def show(self, step: int, loss: float, tokens_per_sec: float, memory_gb: float) -> None:
        """Draw the bar for `step` with the latest loss, speed and peak memory."""
        width = 24
        done = int(width * step / max(self.total, 1))
        rate = (step - self.start_step) / max(time.perf_counter() - self.start_time, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else math.inf
        eta_text = f"{eta:5.0f}s" if math.isfinite(eta) else "    ?"
        text = (f"[{'#' * done}{'.' * (width - done)}] {step}/{self.total} loss {loss:.4f} "
                f"{tokens_per_sec:,.0f} tok/s {memory_gb:.2f} GB eta {eta_text}")
        if self.tty:
            print("\r" + text, end="", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        """Print a line without breaking the bar."""
        print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)

    def close(self) -> None:
        """End the bar's line."""
        if self.tty:
            print(file=sys.stderr, flush=True)
