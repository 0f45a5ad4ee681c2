"""Hugging Face data sets: a Hub id, a directory `datasets` saved, or parquet files, read
through the `datasets` library into the same records a JSONL file gives.

The Hub and a local copy take one path: `datasets` turns either into tables, and from the
first row on they are records like any other, checked and reported as `name:split[i]`.
"""

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from mlx_lora.data.records import Record, records_from_objects
from mlx_lora.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TABLE_SUFFIXES = (".parquet", ".arrow")
VALID_NAMES = ("validation", "valid", "val", "dev")  # what data sets call a validation split
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes
EXTRA = "pip install 'mlx-lora[datasets]'"


@dataclass(frozen=True)
class HubSplits:
    """Which splits of a Hugging Face data set to read (mlx-lm's hf_dataset keys)."""

    config: str = ""  # the data set's configuration (subset), e.g. "main" for gsm8k
    train: str = "train"  # a split name, or `datasets` slicing: "train[:80%]"
    valid: str = ""  # "" = the set's validation split (validation, valid, val, dev) if any
    test: str = ""  # "" = its test split if any


def is_hub_data(data: str) -> bool:
    """True when --data names a Hugging Face data set: a Hub id (no such path here), a
    directory `datasets` saved or holding parquet/arrow tables, or one such table file."""
    path = Path(data)
    if path.is_file():
        return path.suffix.lower() in TABLE_SUFFIXES
    if path.is_dir():
        if _saved(path):
            return True
        has_own = any(p.name.split(".")[0] in ("train", "valid", "test") and
                      p.suffix.lower() not in TABLE_SUFFIXES for p in path.iterdir())
        return not has_own and any(p.suffix.lower() in TABLE_SUFFIXES for p in path.rglob("*"))
    return bool(HUB_ID.match(data))


def read_hub_splits(data: str, splits: HubSplits, features: dict[str, str] | None,
                    wanted: tuple[str, ...] = ("train", "valid", "test"),
                    ) -> dict[str, tuple[str, list[Record]]]:
    """Each wanted split's name for messages and records (those the data set has)."""
    tables = _tables(data, splits, wanted)
    return {split: (f"{data}:{name}", records_from_objects(rows, f"{data}:{name}", features))
            for split, (name, rows) in tables.items()}


def _tables(data: str, splits: HubSplits,
            wanted: tuple[str, ...]) -> dict[str, tuple[str, list[dict]]]:
    """split -> (the data set's name for it, its rows as dicts)."""
    datasets = _import_datasets(data)
    path = Path(data)
    try:
        if _saved(path):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            loaded = datasets.load_dataset(path.suffix.lower().lstrip("."),
                                           data_files={"train": str(path)})
        else:
            loaded = datasets.load_dataset(data, splits.config or None)
    except Exception as e:  # the library's refusal, whatever its type, in one line
        raise UserError(f"{data}: cannot load it as a Hugging Face data set "
                        f"({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(loaded, datasets.Dataset):  # one table saved alone: the training split
        loaded = datasets.DatasetDict({"train": loaded})
    names = _split_names(data, splits, list(loaded))
    return {split: (name, _rows(datasets, data, loaded, name, splits.config))
            for split, name in names.items() if split in wanted}


def _split_names(data: str, splits: HubSplits, available: list[str]) -> dict[str, str]:
    """Our split -> the spec to read: asked for by name, or found by the usual names."""
    valid = splits.valid or next((n for n in VALID_NAMES if n in available), "")
    test = splits.test or ("test" if "test" in available else "")
    names = {split: spec for split, spec in (("train", splits.train), ("valid", valid),
                                             ("test", test)) if spec}
    for split, spec in names.items():
        if spec.split("[")[0] not in available:
            raise UserError(f"{data}: no split '{spec.split('[')[0]}' (it has: "
                            f"{', '.join(available)}); name one with --{split}-split")
    return names


def _rows(datasets, data: str, loaded, spec: str, config: str) -> list[dict]:
    if "[" not in spec:
        return loaded[spec].to_list()
    if Path(data).is_file() or _saved(Path(data)):
        raise UserError(f"{data}: a split slice such as '{spec}' needs a Hub id or a directory "
                        "of data files (not a save_to_disk one); give the split's whole name")
    try:  # `datasets` slices ("train[:80%]") only as it loads; the files are cached by now
        return datasets.load_dataset(data, config or None, split=spec).to_list()
    except Exception as e:
        raise UserError(f"{data}: cannot read split '{spec}' ({type(e).__name__}: "
                        f"{_first_line(e)})") from None


def _saved(path: Path) -> bool:
    """A directory `datasets`' save_to_disk wrote."""
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_MARKERS)


def _import_datasets(data: str):
    try:
        import datasets
    except ImportError:
        raise UserError(f"{data}: reading a Hugging Face data set needs the datasets "
                        f"package: {EXTRA}") from None
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # no bar lines in logs
    return datasets


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
