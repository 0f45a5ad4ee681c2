"""The offline demo: a tiny model and task of its own, QLoRA fine-tuning, accuracy before/after."""

import json
import random
import sys
import time
from pathlib import Path

from mlx_lora.config import TrainConfig
from mlx_lora.data.records import find_splits, read_records
from mlx_lora.generation import complete, load_for_inference
from mlx_lora.tiny import make_tiny_model
from mlx_lora.train.run import train

POSITIVE = ["great", "lovely", "superb", "wonderful", "excellent", "delightful", "fantastic",
            "pleasant", "brilliant", "charming", "perfect", "splendid"]
NEGATIVE = ["awful", "terrible", "dreadful", "horrible", "poor", "boring", "bland", "rude",
            "broken", "dirty", "noisy", "disappointing"]
SUBJECTS = ["the food", "the room", "the service", "the film", "the staff", "the music",
            "the view", "the book", "the coffee", "the trip", "the game", "the show"]
TEMPLATES = ["{s} was {w}.", "honestly, {s} was {w}!", "I thought {s} was {w}.",
             "{s} felt {w} to me.", "what a {w} experience: {s}.", "my friends found {s} {w}."]
INSTRUCTION = "Is this review positive or negative? "


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


def accuracy(loaded, records) -> float:
    """Fraction of records whose greedy completion starts with the reference completion."""
    hits = 0
    for record in records:
        answer = complete(loaded, record.prompt, max_tokens=4).strip()
        hits += answer.startswith(record.completion.strip())
    return hits / max(len(records), 1)


def say(text: str) -> None:
    """A demo line on stdout."""
    print(text, flush=True)


def run_demo(output: str, model: str | None = None, data: str | None = None,
             iters: int | None = None) -> None:
    """Build (or take) a model and data, fine-tune with QLoRA, and show what changed."""
    started = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data) if data else write_task(out / "data")
    if model is None:
        texts = [r["prompt"] + " " + r["completion"] for r in task_records(2000, random.Random(1))]
        model = str(make_tiny_model(out / "base_model", vocab_size=384, hidden_size=64,
                                    num_layers=4, intermediate_size=256, texts=texts))
        say(f"built a tiny Llama-style model and tokenizer in {model}")
    test_file = find_splits(str(data_dir)).get("test") or find_splits(str(data_dir)).get("valid")
    test = [r for r in read_records(test_file) if r.kind == "completion"][:60]

    base = load_for_inference(model)
    before = accuracy(base, test) if test else None
    adapter_dir = out / "adapters"
    config = TrainConfig(model=model, data=str(data_dir), adapter_path=str(adapter_dir),
                         quantize=4, rank=8, alpha=16.0, batch_size=8, learning_rate=2e-3,
                         iters=iters or 150, steps_per_report=25, steps_per_eval=50,
                         save_every=50, mask_prompt=True, max_seq_length=128)
    say(f"fine-tuning with QLoRA (4-bit base, rank {config.rank}) for {config.iters} steps")
    train(config, overwrite=True)

    tuned = load_for_inference(model, str(adapter_dir))
    after = accuracy(tuned, test) if test else None
    if test:
        say(f"held-out accuracy on {len(test)} {test_file.name} records: "
            f"before {before:.0%}, after {after:.0%}")
        example = test[0].prompt
        say(f"prompt: {example}")
        say(f"  base model says:  {complete(base, example, max_tokens=8)!r}")
        say(f"  fine-tuned says:  {complete(tuned, example, max_tokens=8)!r}")
    say(f"adapters: {adapter_dir} (load with mlx_lm.load(model, adapter_path=...))")
    say(f"metrics: {adapter_dir / 'metrics.jsonl'}")
    say(f"demo finished in {time.perf_counter() - started:.0f}s")
    sys.stdout.flush()
