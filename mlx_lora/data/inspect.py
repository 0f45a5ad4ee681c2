"""`mlx-lora data`: a data-quality report per split, and one example with its targets.

Each split is read as training reads it, but a bad record is counted and named instead of
stopping the report; then every record is tokenized whole, so lengths, truncations and
records past the model's context are the records' own, not what was kept of them.
"""

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mlx_lora.data.formats import describe
from mlx_lora.data.hub import HubSplits, is_hub_data
from mlx_lora.data.records import Record, from_plain_text, plain_records, scan_records
from mlx_lora.data.sources import DEFAULT_HUB_SPLITS, find_splits, read_splits
from mlx_lora.data.template import check_chat_template
from mlx_lora.data.tokenize import Example, chunks, encode, target_tokens, to_example

SHOWN = 5  # records named per finding; the JSON has them all
HISTOGRAM_BINS = 8
BAR_WIDTH = 30
# A refusal for an empty answer: an empty completion, output or assistant turn.
EMPTY_ANSWER = re.compile(r'"(completion|content|output|response)" is empty')


@dataclass
class SplitReport:
    """What one split holds and what training would make of it."""

    split: str
    reads_as: str  # the one line training says about the file
    records: int = 0
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    lengths: list[int] = field(default_factory=list)  # tokens per example, before truncation
    truncated: list[str] = field(default_factory=list)  # where each finding is (FILE:LINE)
    no_target: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # "this = the earlier one"
    refused: list[str] = field(default_factory=list)  # the problems, one line each
    empty_answers: list[str] = field(default_factory=list)
    over_context: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The report for --json: counts, the length summary and every finding."""
        return {"split": self.split, "reads_as": self.reads_as, "records": self.records,
                "examples": self.examples, "tokens": self.tokens,
                "target_tokens": self.target_tokens, "lengths": length_summary(self.lengths),
                "histogram": histogram(self.lengths),
                **{name: {"count": len(found), "where": found} for name, found in (
                    ("truncated", self.truncated), ("no_target", self.no_target),
                    ("duplicates", self.duplicates), ("refused", self.refused),
                    ("empty_answers", self.empty_answers),
                    ("over_context", self.over_context))}}


def inspect_data(data: str, tokenizer, max_seq_length: int, mask_prompt: bool,
                 features: dict[str, str] | None = None, hub: HubSplits = DEFAULT_HUB_SPLITS,
                 context: int | None = None) -> tuple[list[SplitReport], str | None]:
    """(a report per split, the first training example with its targets marked).

    A preference pair shows as its two halves, only the responses carrying loss, as
    --train-mode dpo and orpo train them. context: the model's max_position_embeddings.
    """
    reports, first = [], None
    for split, (name, records, problems) in _read(data, features, hub).items():
        report = SplitReport(split, describe(name, records) if records else f"{name}: no "
                             "good record", refused=problems)
        report.empty_answers = [p.split(": ")[0] for p in problems if EMPTY_ANSWER.search(p)]
        report.duplicates = _duplicates(records)
        halves = plain_records(records)
        check_chat_template(halves, tokenizer, name)
        pairs = len(halves) > len(records)
        examples = _measure(report, records, halves, tokenizer, max_seq_length,
                            mask_prompt or pairs, context)
        reports.append(report)
        if split == "train" and examples:
            first = show_targets(examples[0], tokenizer)
    return reports, first


def _read(data: str, features, hub: HubSplits) -> dict[str, tuple[str, list, list[str]]]:
    """split -> (name, good records, problems); a Hub data set's rows are checked as
    training checks them (the first bad one stops the report)."""
    if is_hub_data(data):
        return {split: (name, records, []) for split, (name, records)
                in read_splits(data, features, hub).items()}
    return {split: (path.name, *scan_records(path, features))
            for split, path in find_splits(data).items()}


def _measure(report: SplitReport, records: Sequence[Record], halves: Sequence[Record], tokenizer,
             max_seq_length: int, mask_prompt: bool, context: int | None) -> list[Example]:
    """Tokenize every record whole; fill in the report's counts; the examples training gets."""
    report.records = len(records)
    examples = []
    for record in halves:
        ids, flags = encode(record, tokenizer, mask_prompt, None)
        if from_plain_text(record):
            pieces = list(chunks(ids, flags, max_seq_length))
        else:
            pieces = [(ids, flags)]  # measured whole, truncated below
            if len(ids) > max_seq_length:
                report.truncated.append(record.source)
            if context and len(ids) > context:
                report.over_context.append(record.source)
        report.lengths.extend(len(piece_ids) for piece_ids, _ in pieces)
        for piece_ids, piece_flags in pieces:
            example = to_example(piece_ids[:max_seq_length], piece_flags[:max_seq_length])
            if example is None:
                report.no_target.append(record.source)
                continue
            examples.append(example)
            report.tokens += len(example.ids)
            report.target_tokens += target_tokens([example])
    report.examples = len(examples)
    return examples


def _duplicates(records: Sequence[Record]) -> list[str]:
    """"FILE:LINE = FILE:EARLIER" for each record whose content an earlier one has."""
    seen, found = {}, []
    for record in records:
        key = _content(record)
        if key in seen:
            found.append(f"{record.source} = {seen[key]}")
        else:
            seen[key] = record.source
    return found


def _content(record: Record) -> str:
    """What a record says, without where it is."""
    if record.kind == "preference":
        return _content(record.chosen) + "\0" + _content(record.rejected)
    return json.dumps([record.kind, record.text, record.prompt, record.completion,
                       record.messages, record.tools, record.response_start], sort_keys=True)


def report_lines(report: SplitReport, max_seq_length: int, context: int | None) -> list[str]:
    """The report of one split for the terminal."""
    lengths = length_summary(report.lengths)
    lines = [f"{report.split}: {report.reads_as}",
             f"  {report.examples:,} examples, {report.tokens:,} tokens "
             f"({report.target_tokens:,} carry loss)",
             f"  tokens per record: min {lengths['min']:,}, median {lengths['median']:,}, "
             f"p95 {lengths['p95']:,}, max {lengths['max']:,}",
             *(f"    {line}" for line in histogram_lines(report.lengths))]
    findings = [
        (report.refused, "refused (training stops on these; fix or remove them)"),
        (report.empty_answers, "with an empty answer (among the refused)"),
        (report.truncated, f"longer than --max-seq-length {max_seq_length}, truncated"),
        (report.no_target, "with no token to learn from (skipped)"),
        (report.duplicates, "exact duplicates of an earlier record")]
    if context:  # a model that does not say its context has no such line
        findings.insert(3, (report.over_context,
                            f"longer than the model's context ({context:,} tokens)"))
    for found, what in findings:
        lines.append(f"  {len(found):,} {what}" + (f": {_first(found)}" if found else ""))
    return lines


def _first(found: list[str]) -> str:
    shown = "; ".join(found[:SHOWN])
    return shown + (f"; ... ({len(found) - SHOWN:,} more; --json lists all)"
                    if len(found) > SHOWN else "")


def length_summary(lengths: list[int]) -> dict[str, int]:
    """min, median, p95 and max of the token lengths (zeros when there are none)."""
    if not lengths:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    values = np.asarray(lengths)
    return {"min": int(values.min()), "median": int(np.median(values)),
            "p95": int(np.percentile(values, 95)), "max": int(values.max())}


def histogram(lengths: list[int]) -> list[dict[str, int]]:
    """Counts of lengths in equal-width whole-number bins from the shortest to the longest."""
    if not lengths:
        return []
    values = np.asarray(lengths)
    low, high = int(values.min()), int(values.max())
    width = -(-(high - low + 1) // HISTOGRAM_BINS)  # ceiling division
    counts = np.bincount((values - low) // width)
    return [{"from": low + i * width, "to": min(low + (i + 1) * width - 1, high),
             "count": int(n)} for i, n in enumerate(counts)]


def histogram_lines(lengths: list[int]) -> list[str]:
    """The histogram as text bars, one line per bin."""
    bins = histogram(lengths)
    top = max((b["count"] for b in bins), default=0)
    width = len(str(bins[-1]["to"])) if bins else 0
    lines = []
    for b in bins:
        bar = "█" * round(BAR_WIDTH * b["count"] / top)
        lines.append(f"{b['from']:>{width}}-{b['to']:<{width}} {bar:<{BAR_WIDTH}} {b['count']:,}")
    return lines


def show_targets(example: Example, tokenizer) -> str:
    """The example's text with the tokens that carry loss between ⟦ and ⟧.

    Each run of tokens on one side decodes as a whole, so characters made of several tokens
    and SentencePiece's word-initial spaces come out as written.
    """
    ids, targets = example.ids.tolist(), [bool(f) for f in example.mask]
    targets[0] = False  # nothing precedes the first token: never a target
    pieces, start, shown = [], 0, ""
    for end in range(1, len(ids) + 1):
        if end == len(ids) or targets[end] != targets[start]:
            # The text of ids[start:end] as it reads within the whole: decoded alone, a
            # SentencePiece span would lose its leading space.
            upto = tokenizer.decode(ids[:end])
            text, shown = upto[len(shown):], upto
            pieces.append(f"⟦{text}⟧" if targets[start] else text)
            start = end
    return "".join(pieces)
