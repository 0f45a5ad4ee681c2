"""Progress while training: the reporting window's loss and speed, and a bar on stderr."""

import math
import sys
import time

import mlx.core as mx


def peak_memory_gb() -> float:
    """Peak memory MLX has allocated in this process, in GB."""
    return mx.get_peak_memory() / 1e9


class Window:
    """Unit-weighted training loss and throughput since the last report (units: target tokens,
    pairs: the objective's)."""

    def __init__(self, unit: str = "tokens"):
        self.unit = unit
        self.reset()

    def reset(self) -> None:
        """Start a new reporting window."""
        self.sum_loss, self.tokens, self.updates, self.padding = 0.0, 0, 0, 0.0
        self.stat_sums: dict[str, float] = {}
        self.start = time.perf_counter()

    def add(self, loss: float, n_tokens: int, padding: float, stats: dict[str, float]) -> None:
        """Count one update; stats are its objective's per-unit means."""
        self.sum_loss += loss * n_tokens
        self.tokens += n_tokens
        self.updates += 1
        self.padding += padding
        for name, value in stats.items():
            self.stat_sums[name] = self.stat_sums.get(name, 0.0) + value * n_tokens

    def summary(self) -> dict:
        """Mean loss and statistics, tokens per second and padding fraction over the window."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        units = max(self.tokens, 1)
        return {
            "loss": self.sum_loss / units,
            **{name: total / units for name, total in self.stat_sums.items()},
            f"{self.unit}_per_sec": self.tokens / seconds,
            "padding_fraction": self.padding / max(self.updates, 1),
        }


class ProgressBar:
    """One line on stderr, redrawn in place on a terminal and printed every report otherwise."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total = total_steps
        self.start_time = time.perf_counter()
        self.start_step = start_step
        self.tty = sys.stderr.isatty()

    def show(self, step: int, loss: float, speed: str, memory_gb: float) -> None:
        """Draw the bar for `step` with the latest loss, speed (e.g. "812 tok/s") and peak
        memory."""
        width = 24
        done = int(width * step / max(self.total, 1))
        rate = (step - self.start_step) / max(time.perf_counter() - self.start_time, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else math.inf
        eta_text = f"{eta:5.0f}s" if math.isfinite(eta) else "    ?"
        text = (f"[{'#' * done}{'.' * (width - done)}] {step}/{self.total} loss {loss:.4f} "
                f"{speed} {memory_gb:.2f} GB eta {eta_text}")
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
