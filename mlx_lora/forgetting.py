"""The forgetting probe: the loss on general text, of the base and of the adapted model.

A fine-tune whose task loss falls while its loss on general text climbs is forgetting what
the base knew. The general text is any .txt/.jsonl/.json file, or `builtin`: a few KB of
plain English prose the mlx_lora project wrote itself (data/general_text.txt).
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path

import mlx.nn as nn

from mlx_lora.adapters.inject import bypassed
from mlx_lora.config import TrainConfig
from mlx_lora.data.records import Record, read_records
from mlx_lora.data.tokenize import Example, target_tokens, to_examples
from mlx_lora.errors import UserError
from mlx_lora.evaluate import mean_loss
from mlx_lora.model.head import Split
from mlx_lora.model.load import LoadedModel
from mlx_lora.objectives.sft import SFT
from mlx_lora.train.step import make_eval_step
from mlx_lora.train.validation import evaluate_split

BUILTIN = "builtin"
BUILTIN_FILE = Path(__file__).parent / "data" / "general_text.txt"
# Training measures the probe at every evaluation: the first this many target tokens of a
# large file show the trend at the cost of a few validation batches. `eval` reads all of it.
MAX_TRAINING_TOKENS = 65_536


def general_text_file(value: str) -> Path:
    """The file --general-data names; `builtin` is the one mlx-lora ships."""
    path = BUILTIN_FILE if value == BUILTIN else Path(value)
    if not path.is_file():
        raise UserError(f"--general-data {value}: no such file; give a .txt, .jsonl or .json "
                        f"file of general text, or {BUILTIN} (the bare flag) for mlx-lora's own")
    return path


def read_general(value: str) -> tuple[str, list[Record]]:
    """The general text's file name and records, read and checked before any model loads."""
    path = general_text_file(value)
    return path.name, read_records(path)


def general_examples(name: str, records: list[Record], tokenizer, max_seq_length: int,
                     max_tokens: int | None = None) -> list[Example]:
    """The general text as SFT examples, every token a target (a .txt file in chunks of
    max_seq_length, as --data reads one); only the first examples up to max_tokens targets."""
    examples = to_examples(records, tokenizer, max_seq_length, False, name)
    if max_tokens is None:
        return examples
    kept, targets = [], 0
    for example in examples:
        if targets >= max_tokens:
            break
        kept.append(example)
        targets += target_tokens([example])
    return kept


def general_probe(model: nn.Module, split: Split | None, examples: list[Example],
                  config: TrainConfig) -> Callable[[], float]:
    """() -> the model's mean loss per target token on `examples` as it is now, compiled once.

    Always through the SFT objective: whatever the run's objective (DPO, ORPO), general text
    is text. Every batch of the examples counts (they were capped when read).
    """
    step = make_eval_step(model, SFT.make_loss(model, split, with_grad=False))
    every_batch = dataclasses.replace(config, val_batches=-1)
    return lambda: evaluate_split(SFT, step, examples, every_batch)[0]


def measure_forgetting(loaded: LoadedModel, name: str, records: list[Record], batch_size: int,
                       max_seq_length: int) -> dict:
    """The base's and the adapted model's loss on the general text, and the relative increase
    (adapted - base) / base; the base is the same model with its adapters bypassed."""
    model = loaded.model
    model.eval()
    examples = general_examples(name, records, loaded.tokenizer, max_seq_length)
    adapted, tokens = mean_loss(model, examples, batch_size, max_seq_length)
    with bypassed(model):
        base, _ = mean_loss(model, examples, batch_size, max_seq_length)
    return {"general_loss_base": base, "general_loss": adapted,
            "general_loss_increase": (adapted - base) / base, "general_tokens": tokens}
