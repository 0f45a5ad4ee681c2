"""A run's metrics.jsonl: one JSON object a line, appended as training goes, read back."""

import json
import os
from pathlib import Path

from mlx_lora.formats.atomic import write_text_atomic

METRICS_FILE = "metrics.jsonl"


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


def truncate_metrics(adapter_dir: Path, step: int) -> None:
    """Drop lines logged after `step` (and any "done"), which a resumed run will log again."""
    kept = [r for r in read_metrics(adapter_dir) if r.get("step", 0) <= step
            and r.get("event") != "done"]
    write_text_atomic(Path(adapter_dir) / METRICS_FILE,
                      "".join(json.dumps(r) + "\n" for r in kept))
