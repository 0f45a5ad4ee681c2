"""Every fine-tuning method on one job: what trains, memory, speed and validation loss.

    python benchmarks/bench_methods.py [--iters 100] [--methods lora,dora,...] [--through api]

The job: stories260K (the real 260K-parameter llama in ../shared/data) on WikiSQL, batch 8,
--max-seq-length 512, the same records and seed for every method, each method at a learning
rate suited to it (listed in METHODS). Each method runs `mlx-lora train` in its own process,
one after another (never two at once); its figures come from that run: trainable parameters
from the line the run prints, peak memory as the largest `peak_memory_gb` and tokens/s as the
median `tokens_per_sec` of its metrics.jsonl, validation loss at step 0 (the base) and at the
end. `--through api` runs the same jobs through the Python API (mlx_lora.Finetune) instead of
the CLI. The last line of stdout is one JSON object with every method's figures.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_train import DATA, ROOT, machine

MODEL = DATA / "tinyllamas-stories260K" / "hf"
WIKISQL = DATA / "mlx-examples-wikisql"
# method -> the flags that select it, with its learning rate (each method's usual range).
METHODS = {
    "lora": ["--fine-tune-type", "lora", "--learning-rate", "1e-3"],
    "dora": ["--fine-tune-type", "dora", "--learning-rate", "1e-3"],
    "lora+": ["--fine-tune-type", "lora", "--lora-plus-ratio", "16", "--learning-rate", "2e-4"],
    "pissa": ["--fine-tune-type", "lora", "--init", "pissa", "--learning-rate", "5e-4"],
    "ia3": ["--fine-tune-type", "ia3", "--learning-rate", "1e-2"],
    "full": ["--fine-tune-type", "full", "--learning-rate", "1e-4"],
    "adapter": ["--fine-tune-type", "adapter", "--learning-rate", "1e-3"],
    "prompt": ["--fine-tune-type", "prompt", "--num-virtual-tokens", "20",
               "--learning-rate", "3e-2"],
    "prefix": ["--fine-tune-type", "prefix", "--num-virtual-tokens", "20",
               "--learning-rate", "1e-2"],
}
TRAINABLE = re.compile(r"trainable parameters: ([\d,]+) of ([\d,]+)")


def main() -> None:
    """Run every method's job in turn and print the summary JSON last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--work-dir", default=None, help="where the runs go (default: a new "
                        "temporary directory)")
    parser.add_argument("--through", choices=("cli", "api"), default="cli")
    parser.add_argument("--api-job", help=argparse.SUPPRESS)  # internal: one API run
    args = parser.parse_args()
    if args.api_job:
        return train_through_api(json.loads(args.api_job))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mlx_lora_bench_methods_"))
    results = {}
    for method in args.methods.split(","):
        adapter_dir = work / f"{method.replace('+', '_plus')}-{args.through}"
        results[method] = run_method(method, args.iters, adapter_dir, args.through)
        print(f"{method}: {json.dumps(results[method])}", file=sys.stderr)
    print(json.dumps({"machine": machine(), "iters": args.iters, "through": args.through,
                      "methods": results}))


def job_flags(method: str, iters: int, adapter_dir: Path) -> list[str]:
    """The CLI flags of one method's job."""
    return ["--model", str(MODEL), "--data", str(WIKISQL), "--adapter-path", str(adapter_dir),
            "--iters", str(iters), "--batch-size", "8", "--max-seq-length", "512",
            "--steps-per-eval", str(iters), "--val-batches", "-1", "--seed", "0",
            *METHODS[method]]


def train_through_api(flags: list[str]) -> None:
    """Run a job given as CLI flags through mlx_lora.Finetune, the flags as its keywords."""
    import mlx_lora

    options = {flag[2:].replace("-", "_"): _number(value)
               for flag, value in zip(flags[::2], flags[1::2], strict=True)}
    mlx_lora.Finetune(overwrite=True, **options).train()


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_method(method: str, iters: int, adapter_dir: Path, through: str) -> dict:
    """Train one method on the job; its figures from what the run printed and wrote."""
    flags = job_flags(method, iters, adapter_dir)
    command = ([sys.executable, "-m", "mlx_lora", "train", "--overwrite", *flags]
               if through == "cli" else
               [sys.executable, __file__, "--api-job", json.dumps(flags)])
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"{method} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    trainable = TRAINABLE.search(run.stdout + run.stderr)
    events = [json.loads(line) for line in (adapter_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [e["val_loss"] for e in events if e["event"] == "val"]
    return {
        "trainable": int(trainable[1].replace(",", "")) if trainable else None,
        "total": int(trainable[2].replace(",", "")) if trainable else None,
        "val_loss_base": round(vals[0], 4),
        "val_loss": round(vals[-1], 4),
        "peak_memory_gb": max(e.get("peak_memory_gb", 0.0) for e in events),
        "tokens_per_sec": round(statistics.median(
            e["tokens_per_sec"] for e in events if e["event"] == "train")),
    }


if __name__ == "__main__":
    main()
