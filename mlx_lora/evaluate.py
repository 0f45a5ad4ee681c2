"""Loss, perplexity and exact-match accuracy of greedy generations over one data split."""

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step

from mlx_lora.config import DEFAULTS, EvalConfig
from mlx_lora.data.records import Record, read_records
from mlx_lora.data.template import render
from mlx_lora.data.tokenize import Example, target_tokens, to_examples
from mlx_lora.errors import UserError
from mlx_lora.model.load import LoadedModel
from mlx_lora.model.prefix_cache import generation_cache
from mlx_lora.model.probe import probe_model
from mlx_lora.objectives.sft import SFT
from mlx_lora.train.step import make_eval_step
from mlx_lora.train.validation import evaluate_split

EXTRA_TOKENS = 8  # generated past the reference's length: enough to see it does not stop there
EVAL = EvalConfig()


@dataclass(frozen=True)
class EvalResult:
    """What `mlx-lora eval` reports (and prints as JSON)."""

    split: str
    loss: float  # mean cross-entropy per target token
    perplexity: float
    tokens: int  # target tokens the loss averages over
    records: int
    accuracy: float | None = None  # exact matches / generated, when generations were asked for
    generated: int = 0

    def to_dict(self) -> dict:
        """The fields, for JSON; accuracy only when generations were asked for."""
        fields = asdict(self)
        if self.accuracy is None:
            del fields["accuracy"], fields["generated"]
        return fields


def mean_loss(model: nn.Module, examples: list[Example], batch_size: int,
              max_seq_length: int) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over every target token of the examples, and their count.

    Through the training run's own validation loss, so eval and training agree by construction.
    """
    config = replace(DEFAULTS, batch_size=batch_size, max_seq_length=max_seq_length,
                     val_batches=-1)
    split = probe_model(model, packing=False).split
    eval_step = make_eval_step(model, SFT.make_loss(model, split, with_grad=False))
    loss, _ = evaluate_split(SFT, eval_step, examples, config)
    n_tokens = target_tokens(examples)
    return loss, n_tokens


def generation_task(record: Record, tokenizer) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference ids) for the record's completion or last assistant turn.

    Both come from the same rendering training uses, so the prompt ends exactly where the
    supervised tokens of the last turn begin. None for plain text records.
    """
    if record.kind == "text":
        return None
    ids, flags = render(record, tokenizer, mask_prompt=True)
    end = len(flags)
    while end and not flags[end - 1]:
        end -= 1
    start = end
    while start and flags[start - 1]:
        start -= 1
    reference = ids[start:end]
    while reference and reference[-1] in tokenizer.eos_token_ids:
        reference = reference[:-1]
    return (ids[:start], reference) if start else None


def greedy(model: nn.Module, tokenizer, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation of `prompt`, up to an end-of-sequence token or max_tokens."""
    out = []
    cache = generation_cache(model)  # holding the virtual tokens (prompt, prefix), if any
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                  prompt_cache=cache):
        if int(token) in tokenizer.eos_token_ids:
            break
        out.append(int(token))
    return out


def exact_matches(model: nn.Module, tokenizer, records: list[Record],
                  limit: int) -> tuple[int, int]:
    """(matches, generated) over the first `limit` records with a completion (-1: all)."""
    tasks = [t for r in records if (t := generation_task(r, tokenizer)) is not None]
    tasks = tasks if limit < 0 else tasks[:limit]
    matches = 0
    for prompt, reference in tasks:
        generated = greedy(model, tokenizer, prompt, len(reference) + EXTRA_TOKENS)
        matches += _text(tokenizer, generated) == _text(tokenizer, reference)
    return matches, len(tasks)


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def evaluate(loaded: LoadedModel, data_file: Path, *, split: str = EVAL.split,
             batch_size: int = EVAL.batch_size, max_seq_length: int = EVAL.max_seq_length,
             mask_prompt: bool = EVAL.mask_prompt, generate: int = EVAL.generate) -> EvalResult:
    """Loss and perplexity over all of `data_file`, and accuracy over `generate` records."""
    data_file = Path(data_file)
    return evaluate_records(loaded, read_records(data_file), str(data_file), split=split,
                            batch_size=batch_size, max_seq_length=max_seq_length,
                            mask_prompt=mask_prompt, generate=generate)


def evaluate_records(loaded: LoadedModel, records: list[Record], name: str, *, split: str,
                     batch_size: int, max_seq_length: int, mask_prompt: bool,
                     generate: int) -> EvalResult:
    """evaluate() over records already read; `name` says where they came from in messages."""
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    examples = to_examples(records, tokenizer, max_seq_length, mask_prompt, Path(name).name)
    loss, n_tokens = mean_loss(model, examples, batch_size, max_seq_length)
    accuracy, generated = None, 0
    if generate:
        matches, generated = exact_matches(model, tokenizer, records, generate)
        if generated == 0:
            raise UserError(f"{name}: --generate needs prompt/completion or chat records; "
                            "plain text has no reference answer")
        accuracy = matches / generated
    perplexity = math.exp(loss) if loss < 700 else math.inf
    return EvalResult(split, loss, perplexity, n_tokens, len(records), accuracy, generated)
