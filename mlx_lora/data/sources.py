"""Where a run's records come from: a data directory or file, or records held in memory."""

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlx_lora.data.columns import Record, select
from mlx_lora.data.hub import HubSplits, is_hub_data, read_hub_splits
from mlx_lora.data.records import data_suffix, read_records, records_from_objects
from mlx_lora.errors import UserError

SPLITS = ("train", "valid", "test")
SUFFIXES = (".jsonl", ".json", ".txt")
DEFAULT_HUB_SPLITS = HubSplits()


def find_splits(data: str) -> dict[str, Path]:
    """Map split names to files: a directory with train.* [valid.* test.*], or one file (train)."""
    path = Path(data)
    if not path.exists():
        raise UserError(
            f"{data}: no such file or directory; --data takes a directory holding train.jsonl "
            "(and optionally valid.jsonl, test.jsonl), a single .jsonl, .json or .txt file, or "
            "a Hugging Face data set (org/name)"
        )
    if not path.is_file() and not path.is_dir():
        raise UserError(f"{data}: neither a regular file nor a directory; --data takes a "
                        "directory holding train.jsonl or a single .jsonl, .json or .txt file")
    if path.is_file():
        if data_suffix(path) not in SUFFIXES:
            raise UserError(
                f"{data}: unsupported file type '{path.suffix}'; use .jsonl (one JSON object "
                "per line), .json (the same, or one array of objects) or .txt (plain text), "
                "each also gzipped (.gz)"
            )
        return {"train": path}
    splits = {}
    for split in SPLITS:
        found = [path / f"{split}{s}{z}" for s in SUFFIXES for z in ("", ".gz")
                 if (path / f"{split}{s}{z}").is_file()]
        if len(found) > 1:
            raise UserError(f"{data}: both {found[0].name} and {found[1].name}; keep only one")
        if found:
            splits[split] = found[0]
    if "train" not in splits:
        present = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise UserError(
            f"{data}: no train.jsonl or train.txt in this directory (found: {present}); "
            "name the training file train.jsonl (JSONL) or train.txt (plain text)"
        )
    return splits


def split_file(data: str, split: str) -> Path:
    """The file of `split` in a data directory, or the one data file given."""
    if Path(data).is_file():
        return Path(data)
    splits = find_splits(data)
    if split not in splits:
        raise UserError(f"{data}: no {split}.jsonl (it has: {', '.join(sorted(splits))}); "
                        "pick one with --split")
    return splits[split]


def hold_out_valid(splits: dict, fraction: float, batch_size: int,
                   seed: int) -> tuple[dict, str | None]:
    """Without a valid split, `fraction` of train's records (at least one batch, when that is
    at most twice the fraction) moved to a valid split, chosen by `seed`; with the line that
    says so (None when nothing was held out)."""
    name, records = splits["train"]
    n_valid = max(batch_size, round(fraction * len(records)))
    if "valid" in splits or fraction <= 0 or n_valid > 2 * fraction * len(records):
        return splits, None
    held = set(np.random.default_rng(seed).permutation(len(records))[:n_valid].tolist())
    train = select(records, [i for i in range(len(records)) if i not in held])
    valid = select(records, sorted(held))
    line = (f"no validation split: holding out {n_valid} of {len(records)} records of {name} "
            f"for validation (--valid-fraction {fraction}, chosen by --seed {seed}; "
            "--valid-fraction 0 keeps them all for training)")
    return {**splits, "train": (name, train), "valid": (f"{name} (held out)", valid)}, line


def read_splits(data, features: dict[str, str] | None = None,
                hub: HubSplits = DEFAULT_HUB_SPLITS) -> dict[str, tuple[str, Sequence[Record]]]:
    """Every split's name for messages and records, read and validated before any model loads.

    `data` is a directory or a .jsonl/.txt file (contract 2), a Hugging Face data set (a Hub
    id, a directory `datasets` wrote or parquet files; `hub` says which splits), a list of
    records (dicts in any supported format: the training split), or a dict of splits
    {"train": [...], "valid": ...}.
    """
    if isinstance(data, (str, os.PathLike)) and is_hub_data(os.fspath(data)):
        return read_hub_splits(os.fspath(data), hub, features)
    if isinstance(data, (str, os.PathLike)):
        return {split: (path.name, read_records(path, features))
                for split, path in find_splits(str(data)).items()}
    if isinstance(data, dict):
        unknown = sorted(set(data) - set(SPLITS))
        if unknown or "train" not in data:
            raise UserError(f"data: a dict of splits needs a 'train' key and only "
                            f"{', '.join(SPLITS)} (found: {', '.join(map(str, data)) or 'none'})")
        return {split: (split, records_from_objects(data[split], split, features))
                for split in SPLITS if split in data}
    return {"train": ("train", records_from_objects(data, "train", features))}
