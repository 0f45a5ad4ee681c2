"""A file holding one JSON array of records (LLaMA-Factory's and Alpaca's .json files), read
with the line each record starts on, so problems can still be reported as FILE:LINE."""

import json


def starts_array(text: str) -> bool:
    """Whether a file's text is one JSON array rather than JSON Lines (decided by content):
    it starts with "[" and its first line alone is no JSON value, or is the only line."""
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return False
    first_line, _, rest = stripped.partition("\n")
    if not rest.strip():
        return True
    try:
        json.loads(first_line)
    except json.JSONDecodeError:
        return True
    return False  # JSON Lines whose first record is an array: reported as such


def array_items(text: str) -> list[tuple[int, object]]:
    """(line, element) for each element of the array; json.JSONDecodeError when not valid."""
    json.loads(text)  # the whole document first: a syntax error with its true line
    decoder = json.JSONDecoder()
    items, line, counted = [], 1, 0
    index = _skip_space(text, text.index("[") + 1)
    while text[index] != "]":
        line += text.count("\n", counted, index)
        counted = index
        value, index = decoder.raw_decode(text, index)
        items.append((line, value))
        index = _skip_space(text, index)
        if text[index] == ",":
            index = _skip_space(text, index + 1)
    return items


def _skip_space(text: str, index: int) -> int:
    while text[index] in " \t\r\n":
        index += 1
    return index
