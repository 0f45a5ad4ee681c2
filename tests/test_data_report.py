"""`mlx-lora data` as a data-quality report: every finding names its records, the lengths are
the tokenizer's own, and the example shows text as written (stories260K's SentencePiece)."""

import json

import numpy as np
from click.testing import CliRunner

from mlx_lora.cli import cli
from mlx_lora.data.inspect import SplitReport, histogram, report_lines
from mlx_lora.model.load import load_tokenizer_only

LONG = "once upon a time there was a little dog " * 80  # about 700 tokens: past 512


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def report(model, data, *extra):
    result = CliRunner().invoke(cli, ["data", "--model", str(model), "--data", str(data),
                                      *map(str, extra)])
    assert result.exit_code == 0, result.output
    return result.output


def test_findings_name_their_records(stories260k, tmp_path):
    rows = [{"prompt": "Lily had a red ball. ", "completion": "She played with it."},
            {"prompt": "Lily had a red ball. ", "completion": "She played with it."},
            {"prompt": "Tom saw a cat. ", "completion": ""},
            {"prompt": LONG, "completion": "The end."},
            {"prompt": "The sun was hot. ", "completion": LONG}]
    data = write(tmp_path / "train.jsonl", rows)
    found = json.loads(report(stories260k, data, "--max-seq-length", 300, "--mask-prompt",
                              "--json"))
    assert found["context"] == 512
    split = found["splits"][0]
    assert split["records"] == 4 and split["examples"] == 3
    assert split["duplicates"] == {"count": 1, "where": ["train.jsonl:2 = train.jsonl:1"]}
    assert split["refused"]["count"] == 1 and split["refused"]["where"][0].startswith(
        'train.jsonl:3: "completion" is empty')
    assert split["empty_answers"]["where"] == ["train.jsonl:3"]
    assert split["truncated"]["where"] == ["train.jsonl:4", "train.jsonl:5"]
    assert split["over_context"]["where"] == ["train.jsonl:4", "train.jsonl:5"]
    # Cut at 300 tokens, record 4 keeps only prompt: nothing to learn from.
    assert split["no_target"]["where"] == ["train.jsonl:4"]
    # Lengths are the whole records' (BOS + text + EOS), as the tokenizer counts them.
    tokenizer = load_tokenizer_only(str(stories260k))
    want = [len(tokenizer.encode(r["prompt"] + r["completion"])) + 1
            for i, r in enumerate(rows) if i != 2]
    assert split["lengths"] == {"min": min(want), "median": int(np.median(want)),
                                "p95": int(np.percentile(want, 95)), "max": max(want)}
    assert sum(b["count"] for b in split["histogram"]) == 4


def test_terminal_report_and_example_read_as_written(stories260k, tmp_path):
    data = write(tmp_path / "train.jsonl", [
        {"prompt": "Café au lait, s'il vous plaît? ", "completion": "Oui, très bien 🙂"}] * 3)
    text = report(stories260k, data, "--mask-prompt")
    lines = text.splitlines()
    assert lines[0] == "train: train.jsonl: prompt/completion, 3 records"
    assert "  2 exact duplicates of an earlier record: train.jsonl:2 = train.jsonl:1; " \
           "train.jsonl:3 = train.jsonl:1" in lines
    shown = text.split("targets between ⟦ and ⟧:\n")[1].strip()
    # Whole spans decode: no U+FFFD for the multi-byte characters, and the spaces are kept
    # (the one before "Oui" is part of SentencePiece's "▁Oui", a target token).
    assert shown == "<s> Café au lait, s'il vous plaît?⟦ Oui, très bien 🙂</s>⟧"


def test_histogram_bins_are_whole_numbers_that_cover_every_length():
    lengths = [46, 55, 56, 83, 83, 92, 120]
    bins = histogram(lengths)
    assert [b["from"] for b in bins][0] == 46 and bins[-1]["to"] == 120
    assert all(b["to"] + 1 == c["from"] for b, c in zip(bins, bins[1:], strict=False))
    for b in bins:
        assert b["count"] == sum(b["from"] <= n <= b["to"] for n in lengths)


def test_a_model_without_a_stated_context_gets_no_context_line():
    lines = report_lines(SplitReport("train", "train.jsonl: text, 1 records", lengths=[5]), 64,
                         None)
    assert not any("context" in line for line in lines)
    assert all(line.strip() != "0" for line in lines)
