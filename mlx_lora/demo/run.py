"""The offline demo: a tiny model and task of its own, QLoRA fine-tuning, accuracy before/after."""

import json
import random
import time
from pathlib import Path

from mlx_lora.api import Finetune
from mlx_lora.data.records import read_records
from mlx_lora.data.sources import find_splits
from mlx_lora.demo.tiny import make_tiny_model
from mlx_lora.fuse import fuse

POSITIVE = ["great", "lovely", "superb", "wonderful", "excellent", "delightful", "fantastic",
            "pleasant", "brilliant", "charming", "perfect", "splendid"]
NEGATIVE = ["awful", "terrible", "dreadful", "horrible", "poor", "boring", "bland", "rude",
            "broken", "dirty", "noisy", "disappointing"]
SUBJECTS = ["the food", "the room", "the service", "the film", "the staff", "the music",
            "the view", "the book", "the coffee", "the trip", "the game", "the show"]
TEMPLATES = ["{s} was {w}.", "honestly, {s} was {w}!", "I thought {s} was {w}.",
             "{s} felt {w} to me.", "what a {w} experience: {s}.", "my friends found {s} {w}."]
INSTRUCTION = "Is this review positive or negative? "
EVAL_RECORDS = 60  # held-out records whose greedy answers are scored


def task_records(n: int, rng: random.Random) -> list[dict]:
    """Prompt/completion records of the sentiment task."""
    records = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        review = rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), w=word)
        records.append({"prompt": INSTRUCTION + review, "completion": label})
    return records


def write_task(data_dir: Path, seed: int = 0) -> Path:
    """Write train/valid/test.jsonl of the built-in task; the test split is held out."""
    rng = random.Random(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"train": 400, "valid": 40, "test": 60}
    for split, n in sizes.items():
        lines = [json.dumps(r) for r in task_records(n, rng)]
        (data_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return data_dir


def say(text: str) -> None:
    """A demo line on stdout."""
    print(text, flush=True)


def run_demo(output: str, model: str | None = None, data: str | None = None,
             iters: int | None = None) -> None:
    """Build (or take) a model and data, fine-tune with QLoRA, evaluate, fuse and generate."""
    started = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data) if data else write_task(out / "data")
    if model is None:
        texts = [r["prompt"] + " " + r["completion"] for r in task_records(2000, random.Random(1))]
        model = str(make_tiny_model(out / "base_model", vocab_size=384, hidden_size=64,
                                    num_layers=4, intermediate_size=256, texts=texts))
        say(f"built a tiny Llama-style model and tokenizer in {model}")
    splits = find_splits(str(data_dir))
    split = next(s for s in ("test", "valid", "train") if s in splits)
    held_out = splits[split]

    base = Finetune(model, str(data_dir), adapter_path=None, mask_prompt=True,
                    max_seq_length=128)
    before = base.evaluate(split, generate=EVAL_RECORDS)
    adapter_dir = out / "adapters"
    run = Finetune(model, str(data_dir), adapter_path=str(adapter_dir), overwrite=True,
                   quantize=4, rank=8, alpha=16.0, batch_size=8, learning_rate=2e-3,
                   iters=iters or 150, steps_per_report=25, steps_per_eval=50, save_every=50,
                   mask_prompt=True, max_seq_length=128)
    config = run.config
    say(f"fine-tuning with QLoRA (4-bit base, rank {config.rank}) for {config.iters} steps")
    run.train()
    after = run.evaluate(split, generate=EVAL_RECORDS)
    fused_dir = out / "fused_model"
    fuse(model, str(adapter_dir), str(fused_dir), overwrite=True)

    say(f"held-out {held_out.name}: loss {before['loss']:.3f} -> {after['loss']:.3f}, "
        f"exact-match accuracy on {after['generated']} records "
        f"{_percent(before['accuracy'])} -> {_percent(after['accuracy'])}")
    prompt = next((r.prompt for r in read_records(held_out) if r.kind == "completion"), None)
    if prompt:
        fused = Finetune(str(fused_dir), adapter_path=None)
        say(f"prompt: {prompt}")
        say(f"  base model says:   {base.generate(prompt, max_tokens=8)!r}")
        say(f"  fused model says:  {fused.generate(prompt, max_tokens=8)!r}")
    say(f"adapters:    {adapter_dir} (mlx_lm.generate --model {model} --adapter-path "
        f"{adapter_dir})")
    say(f"fused model: {fused_dir} (mlx_lm.server --model {fused_dir})")
    say(f"metrics:     {adapter_dir / 'metrics.jsonl'}, plot: {adapter_dir / 'loss.svg'}")
    say(f"demo finished in {time.perf_counter() - started:.0f}s")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"
