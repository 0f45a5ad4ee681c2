"""What a data set becomes before training: counts per split, and one example with its targets."""

from dataclasses import dataclass

from mlx_lora.data.records import Record, plain_records, read_records
from mlx_lora.data.sources import find_splits
from mlx_lora.data.template import check_chat_template
from mlx_lora.data.tokenize import Example, tokenize_with_stats


@dataclass(frozen=True)
class SplitStats:
    """Counts that say whether a split fits the run's settings."""

    split: str
    file: str
    formats: str
    records: int
    truncated: int
    examples: int
    tokens: int
    target_tokens: int
    longest: int


def split_stats(split: str, path, records: list[Record], examples: list[Example],
                truncated: int) -> SplitStats:
    """Summarize one tokenized split."""
    lengths = [len(e.ids) for e in examples]
    return SplitStats(
        split=split, file=str(path), formats=", ".join(sorted({r.kind for r in records})),
        records=len(records), truncated=truncated, examples=len(examples), tokens=sum(lengths),
        target_tokens=int(sum(e.mask[1:].sum() for e in examples)),
        longest=max(lengths, default=0),
    )


def show_targets(example: Example, tokenizer) -> str:
    """The example's text with the tokens that carry loss between ⟦ and ⟧."""
    pieces, inside = [], False
    for position, token in enumerate(example.ids.tolist()):
        target = bool(example.mask[position]) and position > 0
        if target != inside:
            pieces.append("⟦" if target else "⟧")
            inside = target
        pieces.append(tokenizer.decode([token]))
    if inside:
        pieces.append("⟧")
    return "".join(pieces)


def inspect_data(data: str, tokenizer, max_seq_length: int, mask_prompt: bool):
    """(stats per split, the first training example with its targets marked).

    A preference pair shows as its two halves, only the responses carrying loss, as
    --train-mode dpo and orpo train them.
    """
    stats, first = [], None
    for split, path in find_splits(data).items():
        records = read_records(path)
        halves = plain_records(records)
        check_chat_template(halves, tokenizer, path)
        pairs = len(halves) > len(records)
        examples, counts = tokenize_with_stats(halves, tokenizer, max_seq_length,
                                               mask_prompt or pairs)
        stats.append(split_stats(split, path, records, examples, counts.n_truncated))
        if split == "train" and examples:
            first = show_targets(examples[0], tokenizer)
    return stats, first
