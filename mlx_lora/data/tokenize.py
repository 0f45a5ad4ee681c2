"""Records to fixed-length-bounded examples: token ids and loss flags, truncated or chunked."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_lora.console import status
from mlx_lora.data.columns import kinds_of
from mlx_lora.data.records import (
    Record,
    from_plain_text,
    problems_error,
    read_records,
)
from mlx_lora.data.template import check_chat_template, render
from mlx_lora.errors import UserError


@dataclass(frozen=True)
class Example:
    """One training sequence: ids (L,) int32 and mask (L,) bool, True where a token is a target."""

    ids: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class TokenizeStats:
    """What happened to the records on the way to examples."""

    n_records: int
    n_truncated: int  # longer than max_seq_length, cut to it
    n_dropped: int  # no token to learn (after truncation)


def tokenize_with_stats(
    records: Sequence[Record], tokenizer, max_seq_length: int, mask_prompt: bool
) -> tuple[list[Example], TokenizeStats]:
    """Examples of the records, with counts of truncated and dropped records."""
    examples, problems = [], []
    n_truncated = n_dropped = 0
    for record in records:
        plain_text = from_plain_text(record)  # chunked whole, not truncated
        try:
            ids, flags = encode(record, tokenizer, mask_prompt,
                                None if plain_text else max_seq_length)
        except UserError as e:  # report every record the template or tokenizer rejects
            problems.append(str(e))
            continue
        if plain_text:
            pieces = chunks(ids, flags, max_seq_length)
        else:
            n_truncated += len(ids) > max_seq_length
            pieces = [(ids[:max_seq_length], flags[:max_seq_length])]
        for piece_ids, piece_flags in pieces:
            example = to_example(piece_ids, piece_flags)
            if example is None:
                n_dropped += 1
            else:
                examples.append(example)
    if problems:
        raise problems_error(problems)
    return examples, TokenizeStats(len(records), n_truncated, n_dropped)


def encode(record: Record, tokenizer, mask_prompt: bool,
           max_tokens: int | None) -> tuple[list[int], list[bool]]:
    """template.render, with the tokenizer's own refusal as a UserError naming the record."""
    try:
        return render(record, tokenizer, mask_prompt, max_tokens)
    except UserError:
        raise  # already says which record and why
    except Exception as e:  # the tokenizer's own refusal, whatever its type
        raise UserError(f"{record.source}: the tokenizer cannot encode this record "
                        f"({type(e).__name__}: {e})") from None


def to_example(ids: list[int], flags: list[bool]) -> Example | None:
    """The example, or None when it has no target: the first token is never one (nothing
    precedes it), so it alone does not count."""
    if len(ids) < 2 or not any(flags[1:]):
        return None
    return Example(np.asarray(ids, np.int32), np.asarray(flags, np.bool_))


def target_tokens(examples: list[Example]) -> int:
    """Tokens that carry loss in the examples (a sequence's first token never does)."""
    return sum(int(e.mask[1:].sum()) for e in examples)


def chunks(ids: list[int], flags: list[bool], size: int):
    """A plain text's ids and flags in pieces of at most `size` tokens."""
    # Consecutive chunks overlap by one token so that every token after the first is a target
    # exactly once (a chunk's first token only serves as input).
    step = max(size - 1, 1)
    for start in range(0, max(len(ids) - 1, 1), step):
        yield ids[start : start + size], flags[start : start + size]


def load_split(path: Path, tokenizer, max_seq_length: int, mask_prompt: bool) -> list[Example]:
    """Read, validate and tokenize one data file; warn on stderr about truncated records."""
    path = Path(path)
    return to_examples(read_records(path), tokenizer, max_seq_length, mask_prompt, path.name)


def to_examples(records: Sequence[Record], tokenizer, max_seq_length: int, mask_prompt: bool,
                name: str) -> list[Example]:
    """Tokenize one split's records (named `name` in messages); warn about truncations."""
    if "preference" in kinds_of(records):
        first = next(r.source for r in records if r.kind == "preference")
        raise UserError(f"{first}: a preference pair (chosen/rejected), which only "
                        "--train-mode dpo or orpo reads (their validation reports reward "
                        "accuracy); for supervised training or eval, write the chosen response "
                        "as a completion")
    check_chat_template(records, tokenizer, name)
    examples, stats = tokenize_with_stats(records, tokenizer, max_seq_length, mask_prompt)
    if stats.n_truncated:
        status(f"warning: {stats.n_truncated} of {stats.n_records} records in {name} "
               f"were longer than --max-seq-length {max_seq_length} and were truncated")
    if not examples:
        hint = " within --max-seq-length" if stats.n_truncated else ""
        raise UserError(
            f"{name}: no record has a token to train on{hint}"
            + (" (with --mask-prompt only completions and assistant turns count)"
               if mask_prompt else "")
        )
    if stats.n_dropped:
        status(f"warning: {stats.n_dropped} sequences from {name} had no token to "
               "train on and were skipped")
    return examples
