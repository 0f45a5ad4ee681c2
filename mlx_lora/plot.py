"""A loss plot (SVG, no dependency) of training, validation and general-text loss against step."""

from html import escape
from pathlib import Path

from mlx_lora.errors import UserError
from mlx_lora.formats.atomic import write_text_atomic
from mlx_lora.formats.metrics import METRICS_FILE, read_metrics

PLOT_FILE = "loss.svg"
WIDTH, HEIGHT, MARGIN = 720, 420, 60
SERIES = (("train", "loss", "#1f77b4", "training loss"),
          ("val", "val_loss", "#d62728", "validation loss"),
          # --general-data: task loss falling while this one rises is forgetting
          ("val", "general_loss", "#2ca02c", "general-text loss"))


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high == low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def loss_svg(records: list[dict], title: str) -> str:
    """An SVG line chart of the train, val and general-text losses in metrics records."""
    series = []
    for event, key, color, label in SERIES:
        points = [(r["step"], r[key]) for r in records if r.get("event") == event and key in r]
        if points:
            series.append((points, color, label))
    if not series:
        raise UserError("metrics.jsonl has no loss to plot yet")
    steps = [s for points, _, _ in series for s, _ in points]
    losses = [v for points, _, _ in series for _, v in points]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(losses), max(losses)
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y0 == y1 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))

    def x(step):
        return MARGIN + (step - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)

    def y(loss):
        return HEIGHT - MARGIN - (loss - y0) / (y1 - y0) * (HEIGHT - 2 * MARGIN)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
             f'<text x="{WIDTH / 2}" y="24" text-anchor="middle" font-size="15">'
             f'{escape(title)}</text>',
             f'<text x="{WIDTH / 2}" y="{HEIGHT - 14}" text-anchor="middle">step</text>',
             f'<text x="16" y="{HEIGHT / 2}" transform="rotate(-90 16 {HEIGHT / 2})" '
             f'text-anchor="middle">loss</text>']
    for value in _ticks(y0, y1):
        parts.append(f'<line x1="{MARGIN}" x2="{WIDTH - MARGIN}" y1="{y(value):.1f}" '
                     f'y2="{y(value):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{MARGIN - 6}" y="{y(value) + 4:.1f}" text-anchor="end">'
                     f'{value:.3g}</text>')
    for value in _ticks(x0, x1):
        parts.append(f'<text x="{x(value):.1f}" y="{HEIGHT - MARGIN + 18}" '
                     f'text-anchor="middle">{value:.0f}</text>')
    parts.append(f'<rect x="{MARGIN}" y="{MARGIN}" width="{WIDTH - 2 * MARGIN}" '
                 f'height="{HEIGHT - 2 * MARGIN}" fill="none" stroke="#333"/>')
    for i, (points, color, label) in enumerate(series):
        path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" '
                     'stroke-width="2"/>')
        parts += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5" fill="{color}"/>'
                  for s, v in points]
        ly = MARGIN + 16 + 18 * i
        parts.append(f'<line x1="{WIDTH - MARGIN - 150}" x2="{WIDTH - MARGIN - 126}" '
                     f'y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{WIDTH - MARGIN - 120}" y="{ly}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def plot_run(adapter_dir: Path) -> Path:
    """Write loss.svg into a run's directory from its metrics.jsonl; return its path."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / METRICS_FILE).is_file():
        raise UserError(f"{adapter_dir}: no {METRICS_FILE}; is this a training output directory?")
    path = adapter_dir / PLOT_FILE
    write_text_atomic(path, loss_svg(read_metrics(adapter_dir), f"mlx-lora: {adapter_dir.name}"))
    return path
