"""Read data files' records and report every bad one as FILE:LINE: problem (or name[i]: ...)."""

import gzip
import json
import re
from collections.abc import Sequence
from pathlib import Path

from mlx_lora.data.bulk import SHAPES, parse_lines, plain_columns
from mlx_lora.data.columns import Record, RecordColumns
from mlx_lora.data.formats import LABELS, convert, detect
from mlx_lora.data.json_array import array_items, starts_array
from mlx_lora.data.preference import split_pair
from mlx_lora.data.validate import (
    not_a_record,
    record_kind,
    record_problems,
    type_name,
    unicode_problems,
)
from mlx_lora.errors import UserError

MAX_PROBLEMS = 20
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # "\ud800": JSON's way to a lone surrogate


def from_plain_text(record: Record) -> bool:
    """True for the one record of a .txt file, which the tokenizer cuts into chunks."""
    # A JSONL record's source always ends in ":LINE", so only a .txt file's ends in ".txt".
    return record.kind == "text" and record.source.lower().endswith(".txt")


def data_suffix(path: Path) -> str:
    """A data file's type: its suffix, under a .gz if it is compressed ("x.jsonl.gz": .jsonl)."""
    path = Path(path)
    return (Path(path.stem) if path.suffix.lower() == ".gz" else path).suffix.lower()


def plain_records(records: Sequence[Record]) -> Sequence[Record]:
    """The records with each preference pair as its two halves (columns hold no pair)."""
    if isinstance(records, RecordColumns):
        return records
    return [half for r in records
            for half in ((r.chosen, r.rejected) if r.kind == "preference" else (r,))]


def problems_error(problems: list[str]) -> UserError:
    """One UserError listing the problems, one a line, cut off after MAX_PROBLEMS."""
    lines = problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        lines.append(f"... and {len(problems) - MAX_PROBLEMS} more")
    return UserError("\n".join(lines))


def read_records(path: Path, features: dict[str, str] | None = None) -> Sequence[Record]:
    """Read and validate a .jsonl or .txt file; raise one UserError naming every bad line.

    features: our key -> the key the records use instead (mlx-lm's *_feature options).
    """
    records, problems = scan_records(path, features)
    if problems:
        raise problems_error(problems)
    return records


def scan_records(path: Path,
                 features: dict[str, str] | None = None) -> tuple[Sequence[Record], list[str]]:
    """The file's good records and a "FILE:LINE: problem" line per bad one; a file that
    cannot be read as records at all (not UTF-8, empty, broken JSON array) raises."""
    path = Path(path)
    name = path.name
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the file ({e.strerror})") from None
    if path.suffix.lower() == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise UserError(f"{name}: not a readable gzip file ({e})") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as some Windows editors write
        raw = raw[3:]
    text = _decoded(raw, name)
    if not text or text.isspace():  # not text.strip(), which copies the whole file
        raise UserError(f"{name}: the file is empty; it needs at least one record")
    if data_suffix(path) == ".txt":
        return [Record(kind="text", source=name, text=text)], []
    if starts_array(text):
        return _read_array(text, name, features)
    return _read_jsonl(raw, text, name, features)


def _surrogate_escapes(text: str) -> bool:
    """Whether a record may hold a lone surrogate: decoded UTF-8 holds none, only a JSON escape
    can make one."""
    return SURROGATE_ESCAPE.search(text) is not None


def _decoded(raw: bytes, name: str) -> str:
    """The file as text, with "\r\n" line ends as "\n"; every line that is not UTF-8 raises."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        problems = []
        for number, line in enumerate(raw.split(b"\n"), start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{name}:{number}: not valid UTF-8 (byte 0x{line[e.start]:02x} "
                                f"at column {e.start + 1}); save the file as UTF-8")
        raise problems_error(problems) from None
    if "\r" in text:
        text = "\n".join(line.removesuffix("\r") for line in text.split("\n"))
    return text


def _read_array(text: str, name: str,
                features: dict[str, str] | None) -> tuple[Sequence[Record], list[str]]:
    try:
        items = array_items(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{name}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
                        ) from None
    if not items:
        raise UserError(f"{name}: the JSON array is empty; it needs at least one record")
    return _scan_file(name, [line for line, _ in items], [obj for _, obj in items], features,
                      _surrogate_escapes(text))


class _NotJSON(str):
    """A line that did not parse, as the problem to report in its place."""


def _read_jsonl(raw: bytes, text: str, name: str,
                features: dict[str, str] | None) -> tuple[Sequence[Record], list[str]]:
    parsed = parse_lines(raw)
    if parsed:  # msgspec refuses a lone surrogate, so none is left to look for
        (numbers, objects), escapes = parsed, False
    else:
        numbers, objects = _parse_each_line(text, name)
        escapes = _surrogate_escapes(text)
    return _scan_file(name, numbers, objects, features, escapes)


def _parse_each_line(text: str, name: str) -> tuple[list[int], list]:
    """(line numbers, values) of the lines that are not blank, a line that is not JSON as the
    problem to report in its place."""
    numbers, objects = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            objects.append(json.loads(line))
        except json.JSONDecodeError as e:
            if not objects and _whole_file_is_json(text):
                raise UserError(f"{name}:{number}: the file is one JSON document; use one JSON "
                                "object per line (JSONL)") from None
            objects.append(_NotJSON(f"not valid JSON ({e.msg} at column {e.colno})"))
        numbers.append(number)
    return numbers, objects


def records_from_objects(objects, name: str,
                         features: dict[str, str] | None = None) -> list[Record]:
    """Validate in-memory records (dicts in any supported format) as a file's lines are.

    Problems are reported as `name[i]: what is wrong`, all of them, in one UserError.
    """
    if not isinstance(objects, (list, tuple)) or not objects:
        raise UserError(f"{name}: expected a non-empty list of records (dicts), found "
                        f"{type_name(objects) if objects is not None else 'nothing'}")
    records, problems = _scan([f"{name}[{i}]" for i in range(len(objects))],
                              _renamed(list(objects), features))
    if problems:
        raise problems_error(problems)
    return records


def _scan_file(name: str, numbers: list[int], objects: list, features: dict[str, str] | None,
               escapes: bool) -> tuple[Sequence[Record], list[str]]:
    """_scan over the values at lines `numbers` of file `name`; a file of plain records
    (bulk.plain_columns) is kept as RecordColumns. escapes=False: the text they were parsed
    from has no surrogate escape, so no string needs the Unicode check."""
    objects = _renamed(objects, features)
    plain = None if escapes else plain_columns(objects)
    if plain:
        return _record_columns(name, numbers, *plain), []
    return _scan([f"{name}:{number}" for number in numbers], objects, escapes)


def _scan(wheres: list[str], objects: list,
          escapes: bool = True) -> tuple[list[Record], list[str]]:
    """Check each object, read at `wheres`: one format for all, each record valid; the good
    records and a problem line per bad one."""
    records, problems = [], []
    first = None  # (format, where) of the first record: the file's format
    for where, obj in zip(wheres, objects, strict=True):
        if isinstance(obj, _NotJSON):
            problems.append(f"{where}: {obj}")
            continue
        shape, record, found = _read_one(obj, where, escapes)
        if shape is not None and first is None:
            first = (shape, where)
        elif shape is not None and shape != first[0]:
            problems.append(f"{where}: {_a(shape)} record, but {_label(first[1])} is "
                            f"{_a(first[0])} record; use one format per file")
            continue
        problems.extend(f"{where}: {p}" for p in found)
        if record is not None:
            records.append(record)
    return records, problems


def _label(where: str) -> str:
    """How a problem line names another record: "line 17" ("FILE:17") or "record 3" ("x[3]")."""
    if where.endswith("]"):
        return "record " + where[where.rindex("[") + 1:-1]
    return "line " + where[where.rindex(":") + 1:]


def _record_columns(name: str, numbers: list[int], kind: str,
                    columns: list[list]) -> RecordColumns:
    """The records of a file that bulk.plain_columns passed, kept as its columns."""
    if kind == "chat":
        columns = [list(map(tuple, columns[0]))]  # the messages as a tuple, as _record keeps them
    return RecordColumns(kind, name, numbers, dict(zip(SHAPES[kind], columns, strict=True)))


def _read_one(obj, where: str,
              escapes: bool = True) -> tuple[str | None, Record | None, list[str]]:
    """(the record's format, the record or None, its problems); a foreign format converted."""
    foreign = detect(obj)
    if foreign:
        obj, problems = convert(obj, foreign)
        if problems:
            return foreign, None, problems
    kind = record_kind(obj)
    if kind is None:
        return None, None, [not_a_record(obj)]
    shape = foreign or kind
    problems = record_problems(kind, obj) or (unicode_problems(obj) if escapes else [])
    if problems and foreign:
        problems = [f"{p} (read as {LABELS[foreign]} -> {LABELS[kind]})" for p in problems]
    if problems:
        return shape, None, problems
    return shape, _record(kind, obj, where, shape), []


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiouAEIOU' else 'a'} {word}"


def _renamed(objects: list, features: dict[str, str] | None) -> list:
    """The records with the user's keys for prompt, completion, text, messages renamed to ours."""
    renames = {theirs: ours for ours, theirs in (features or {}).items() if theirs != ours}
    if not renames:
        return objects
    return [{renames.get(key, key): value for key, value in obj.items()}
            if isinstance(obj, dict) else obj for obj in objects]


def _whole_file_is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _record(kind: str, obj: dict, where: str, origin: str = "") -> Record:
    tools = tuple(obj["tools"]) if obj.get("tools") else None
    if kind == "preference":
        halves, _ = split_pair(obj)
        chosen, rejected = (
            _record(record_kind(half), {**half, "tools": obj.get("tools")}, where)
            for half in (halves.chosen, halves.rejected))
        return Record(kind="preference", source=where, origin=origin,
                      chosen=chosen._replace(response_start=halves.response_start),
                      rejected=rejected._replace(response_start=halves.response_start))
    if kind == "text":
        return Record(kind="text", source=where, text=obj["text"], origin=origin)
    if kind == "completion":
        return Record(kind="completion", source=where, prompt=obj["prompt"],
                      completion=obj["completion"], tools=tools, origin=origin)
    return Record(kind="chat", source=where, messages=tuple(obj["messages"]), tools=tools,
                  origin=origin)
