"""Read data files' records and report every bad one as FILE:LINE: problem (or name[i]: ...)."""

import dataclasses
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

from mlx_lora.data.formats import LABELS, closest_format, convert, detect
from mlx_lora.data.json_array import array_items, starts_array
from mlx_lora.data.preference import is_preference, split_pair
from mlx_lora.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
MAX_PROBLEMS = 20
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # "\ud800": JSON's way to a lone surrogate


@dataclass(frozen=True)
class Record:
    """One training record as read; `source` is "FILE:LINE" (just "FILE" for a .txt file)."""

    kind: str  # "text" | "completion" | "chat" | "preference"
    source: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple | None = None  # the message dicts as read
    tools: tuple | None = None
    response_start: int = 0  # chat: messages before this index are context, with no loss
    chosen: "Record | None" = None  # preference: the two halves, sharing the prompt
    rejected: "Record | None" = None
    origin: str = ""  # the format it was read in: "chat", "completion", ..., "alpaca"


def from_plain_text(record: Record) -> bool:
    """True for the one record of a .txt file, which the tokenizer cuts into chunks."""
    # A JSONL record's source always ends in ":LINE", so only a .txt file's ends in ".txt".
    return record.kind == "text" and record.source.lower().endswith(".txt")


def data_suffix(path: Path) -> str:
    """A data file's type: its suffix, under a .gz if it is compressed ("x.jsonl.gz": .jsonl)."""
    path = Path(path)
    return (Path(path.stem) if path.suffix.lower() == ".gz" else path).suffix.lower()


def plain_records(records: list[Record]) -> list[Record]:
    """The records with each preference pair as its two halves."""
    return [half for r in records
            for half in ((r.chosen, r.rejected) if r.kind == "preference" else (r,))]


def problems_error(problems: list[str]) -> UserError:
    """One UserError listing the problems, one a line, cut off after MAX_PROBLEMS."""
    lines = problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        lines.append(f"... and {len(problems) - MAX_PROBLEMS} more")
    return UserError("\n".join(lines))


def read_records(path: Path, features: dict[str, str] | None = None) -> list[Record]:
    """Read and validate a .jsonl or .txt file; raise one UserError naming every bad line.

    features: our key -> the key the records use instead (mlx-lm's *_feature options).
    """
    records, problems = scan_records(path, features)
    if problems:
        raise problems_error(problems)
    return records


def scan_records(path: Path,
                 features: dict[str, str] | None = None) -> tuple[list[Record], list[str]]:
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
    lines, problems = _decode_lines(raw, name)
    if problems:
        raise problems_error(problems)
    if not any(line.strip() for line in lines):
        raise UserError(f"{name}: the file is empty; it needs at least one record")
    if data_suffix(path) == ".txt":
        return [Record(kind="text", source=name, text="\n".join(lines))], []
    text = "\n".join(lines)
    # Decoded UTF-8 holds no lone surrogate; only a JSON escape can make one.
    escapes = SURROGATE_ESCAPE.search(text) is not None
    if starts_array(text):
        return _read_array(text, name, features, escapes)
    return _read_jsonl(lines, name, features, escapes)


def _read_array(text: str, name: str, features: dict[str, str] | None,
                escapes: bool) -> tuple[list[Record], list[str]]:
    try:
        items = array_items(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{name}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
                        ) from None
    if not items:
        raise UserError(f"{name}: the JSON array is empty; it needs at least one record")
    return _scan([(f"{name}:{line}", f"line {line}", obj) for line, obj in items], features,
                 escapes)


def _decode_lines(raw: bytes, name: str) -> tuple[list[str], list[str]]:
    lines, problems = [], []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(line.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as e:
            problems.append(
                f"{name}:{number}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column "
                f"{e.start + 1}); save the file as UTF-8"
            )
    return lines, problems


class _NotJSON(str):
    """A line that did not parse, as the problem to report in its place."""


def _read_jsonl(lines: list[str], name: str, features: dict[str, str] | None,
                escapes: bool) -> tuple[list[Record], list[str]]:
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            items.append((where, f"line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            if not items and _whole_file_is_json("\n".join(lines)):
                raise UserError(
                    f"{where}: the file is one JSON document; use one JSON object per line (JSONL)"
                ) from None
            items.append((where, "", _NotJSON(f"not valid JSON ({e.msg} at column {e.colno})")))
    return _scan(items, features, escapes)


def records_from_objects(objects, name: str,
                         features: dict[str, str] | None = None) -> list[Record]:
    """Validate in-memory records (dicts in any supported format) as a file's lines are.

    Problems are reported as `name[i]: what is wrong`, all of them, in one UserError.
    """
    if not isinstance(objects, (list, tuple)) or not objects:
        raise UserError(f"{name}: expected a non-empty list of records (dicts), found "
                        f"{_type_name(objects) if objects is not None else 'nothing'}")
    items = [(f"{name}[{i}]", f"record {i}", obj) for i, obj in enumerate(objects)]
    records, problems = _scan(items, features)
    if problems:
        raise problems_error(problems)
    return records


def _scan(items: list[tuple[str, str, object]], features: dict[str, str] | None,
          escapes: bool = True) -> tuple[list[Record], list[str]]:
    """Check (where, label, object) items: one format for all, each record valid; the good
    records and a problem line per bad one. escapes=False: the text they were parsed from has
    no surrogate escape, so no string needs the Unicode check."""
    records, problems = [], []
    first = None  # (format, label) of the first record: the file's format
    for where, label, obj in items:
        if isinstance(obj, _NotJSON):
            problems.append(f"{where}: {obj}")
            continue
        shape, record, record_problems = _read_one(_renamed(obj, features), where, escapes)
        if shape is not None and first is None:
            first = (shape, label)
        elif shape is not None and shape != first[0]:
            problems.append(f"{where}: {_a(shape)} record, but {first[1]} is {_a(first[0])} "
                            "record; use one format per file")
            continue
        problems.extend(f"{where}: {p}" for p in record_problems)
        if record is not None:
            records.append(record)
    return records, problems


def _read_one(obj, where: str,
              escapes: bool = True) -> tuple[str | None, Record | None, list[str]]:
    """(the record's format, the record or None, its problems); a foreign format converted."""
    foreign = detect(obj)
    if foreign:
        obj, problems = convert(obj, foreign)
        if problems:
            return foreign, None, problems
    kind = _kind(obj)
    if kind is None:
        return None, None, [_not_a_record(obj)]
    shape = foreign or kind
    problems = CHECKS[kind](obj) or (_not_unicode(obj) if escapes else [])
    if problems and foreign:
        problems = [f"{p} (read as {LABELS[foreign]} -> {LABELS[kind]})" for p in problems]
    if problems:
        return shape, None, problems
    return shape, _record(kind, obj, where, shape), []


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiouAEIOU' else 'a'} {word}"


def _not_unicode(obj) -> list[str]:
    """A record holding a lone surrogate (valid JSON, "\\ud800", but no text) cannot be encoded."""
    try:
        _encode_strings(obj)
    except UnicodeEncodeError as e:
        return [f"holds text that is not valid Unicode ({e.reason}: {e.object[e.start:e.end]!a})"
                "; fix or remove that escape"]
    return []


def _encode_strings(obj) -> None:
    """Encode every string (keys too) of a JSON value as UTF-8; a walk, as it is 8x faster than
    encoding the whole record as JSON, a third of the time of reading a file of small records."""
    if isinstance(obj, str):
        obj.encode("utf-8")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _encode_strings(key)
            _encode_strings(value)
    elif isinstance(obj, list):
        for value in obj:
            _encode_strings(value)


def _renamed(obj, features: dict[str, str] | None):
    """The record with the user's keys for prompt, completion, text, messages renamed to ours."""
    if not features or not isinstance(obj, dict):
        return obj
    renames = {theirs: ours for ours, theirs in features.items() if theirs != ours}
    return {renames.get(key, key): value for key, value in obj.items()}


def _whole_file_is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _kind(obj) -> str | None:
    # The same precedence as mlx-lm: prompt/completion, then messages, then text.
    if not isinstance(obj, dict):
        return None
    if is_preference(obj):
        return "preference"
    if "prompt" in obj or "completion" in obj:
        return "completion"
    if "messages" in obj:
        return "chat"
    if "text" in obj:
        return "text"
    return None


def _not_a_record(obj) -> str:
    if isinstance(obj, list):
        return "a JSON array, not an object; use one JSON object per line (JSONL)"
    if not isinstance(obj, dict):
        return f"expected a JSON object, found {_type_name(obj)}"
    found = ", ".join(sorted(obj)) or "no keys"
    return (f'no "text", "prompt"/"completion", "messages" or "chosen"/"rejected" key '
            f"(found: {found}); {closest_format(obj)}")


def _type_name(value) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_string(obj: dict, key: str) -> list[str]:
    if key not in obj:
        return [f'no "{key}"']
    value = obj[key]
    if not isinstance(value, str):
        return [f'"{key}" must be a string, found {_type_name(value)}']
    if not value.strip():
        return [f'"{key}" is empty']
    return []


def _check_text(obj: dict) -> list[str]:
    return _check_string(obj, "text")


def _check_completion(obj: dict) -> list[str]:
    return _check_string(obj, "prompt") + _check_string(obj, "completion") + _check_tools(obj)


def _check_chat(obj: dict) -> list[str]:
    messages = obj["messages"]
    if not isinstance(messages, list):
        return [f'"messages" must be an array of messages, found {_type_name(messages)}']
    if not messages:
        return ['"messages" is empty']
    problems = []
    for i, message in enumerate(messages):
        problems.extend(_check_message(message, f"messages[{i}]"))
    if not problems and not any(m["role"] == "assistant" for m in messages):
        problems.append('no "assistant" message; there is nothing to train on')
    return problems + _check_tools(obj)


def _check_message(message, label: str) -> list[str]:
    if not isinstance(message, dict):
        return [f"{label} must be an object with \"role\" and \"content\", found "
                f"{_type_name(message)}"]
    if "role" not in message:
        return [f'{label} has no "role"']
    role = message["role"]
    if role not in ROLES:
        allowed = ", ".join(ROLES)
        return [f"{label} has an unknown role {json.dumps(role)} (use one of: {allowed})"]
    if "tool_calls" in message and message["tool_calls"] is not None:
        if role != "assistant":
            return [f'{label} has "tool_calls" but role "{role}"; only assistant turns call tools']
        calls_problems = _check_tool_calls(message["tool_calls"], label)
        if calls_problems:
            return calls_problems
        # A turn that only calls tools may have no content at all.
        if message.get("content") in (None, ""):
            return []
    if "content" not in message:
        return [f'{label} has no "content"']
    content = message["content"]
    if not isinstance(content, str):
        return [f'{label} "content" must be a string, found {_type_name(content)}']
    if not content.strip():
        return [f'{label} "content" is empty']
    return []


def _check_tool_calls(calls, label: str) -> list[str]:
    if not isinstance(calls, list) or not calls:
        return [f'{label} "tool_calls" must be a non-empty array']
    for j, call in enumerate(calls):
        where = f"{label}.tool_calls[{j}]"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict):
            return [f'{where} must be an object with a "function"']
        name = function.get("name")
        if not isinstance(name, str) or not name:
            return [f'{where} has no function "name"']
        arguments = function.get("arguments", {})
        if not isinstance(arguments, (dict, str)):
            return [f'{where} "arguments" must be an object or a string, found '
                    f"{_type_name(arguments)}"]
    return []


def _check_tools(obj: dict) -> list[str]:
    tools = obj.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        return ['"tools" must be an array of tool (function schema) objects']
    return []


def _check_preference(obj: dict) -> list[str]:
    halves, problems = split_pair(obj)
    if problems:
        return problems
    return [f"{name}: {problem}" for name, half in (("chosen", halves.chosen),
                                                    ("rejected", halves.rejected))
            for problem in CHECKS[_kind(half)](half)] + _check_tools(obj)


CHECKS = {"text": _check_text, "completion": _check_completion, "chat": _check_chat,
          "preference": _check_preference}


def _record(kind: str, obj: dict, where: str, origin: str = "") -> Record:
    tools = tuple(obj["tools"]) if obj.get("tools") else None
    if kind == "preference":
        halves, _ = split_pair(obj)
        chosen, rejected = (
            _record(_kind(half), {**half, "tools": obj.get("tools")}, where)
            for half in (halves.chosen, halves.rejected))
        return Record(kind="preference", source=where, origin=origin,
                      chosen=dataclasses.replace(chosen, response_start=halves.response_start),
                      rejected=dataclasses.replace(rejected,
                                                   response_start=halves.response_start))
    if kind == "text":
        return Record(kind="text", source=where, text=obj["text"], origin=origin)
    if kind == "completion":
        return Record(kind="completion", source=where, prompt=obj["prompt"],
                      completion=obj["completion"], tools=tools, origin=origin)
    return Record(kind="chat", source=where, messages=tuple(obj["messages"]), tools=tools,
                  origin=origin)
