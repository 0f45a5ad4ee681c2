"""Reading and validating data files: every bad record named as FILE:LINE: problem."""

import json

import pytest

from mlx_lora.data import bulk
from mlx_lora.data.columns import RecordColumns, kinds_of, select
from mlx_lora.data.records import (
    Record,
    from_plain_text,
    read_records,
    records_from_objects,
)
from mlx_lora.data.sources import find_splits
from mlx_lora.data.template import check_chat_template
from mlx_lora.errors import UserError

USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello"}
CALL = {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}


def chat(*messages, **extra) -> str:
    return json.dumps({"messages": list(messages), **extra})


def write(tmp_path, lines, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def error_of(path) -> str:
    with pytest.raises(UserError) as info:
        read_records(path)
    return str(info.value)


# (lines of train.jsonl, the whole error message)
BAD = [
    (['{"text": "a"'], "train.jsonl:1: not valid JSON (Expecting ',' delimiter at column 13)"),
    (['["a", "b"]', '{"text": "c"}'],
     "train.jsonl:1: a JSON array, not an object; use one JSON object per line (JSONL)"),
    (['{', '  "text": "a"', '}'],
     "train.jsonl:1: the file is one JSON document; use one JSON object per line (JSONL)"),
    (['[', '  "a"', ']'], "train.jsonl:2: expected a JSON object, found a string"),
    (["3"], "train.jsonl:1: expected a JSON object, found a number"),
    (['{"input": "a", "output": "b"}'],
     'train.jsonl:1: no "text", "prompt"/"completion", "messages" or "chosen"/"rejected" key '
     "(found: input, output); closest format: prompt/completion; map the keys: --prompt-feature "
     "input --completion-feature output (YAML: prompt_feature, completion_feature)"),
    (['{"text": 5}'], 'train.jsonl:1: "text" must be a string, found a number'),
    (['{"text": "  "}'], 'train.jsonl:1: "text" is empty'),
    (['{"prompt": "a"}'], 'train.jsonl:1: no "completion"'),
    (['{"prompt": "a", "completion": ""}'], 'train.jsonl:1: "completion" is empty'),
    (['{"prompt": ["a"], "completion": "b"}'],
     'train.jsonl:1: "prompt" must be a string, found an array'),
    (['{"messages": "hi"}'],
     'train.jsonl:1: "messages" must be an array of messages, found a string'),
    (['{"messages": []}'], 'train.jsonl:1: "messages" is empty'),
    ([chat(USER, "hi")],
     'train.jsonl:1: messages[1] must be an object with "role" and "content", found a string'),
    ([chat(USER, {"content": "x"})], 'train.jsonl:1: messages[1] has no "role"'),
    ([chat({"role": "human", "content": "x"}, ASSISTANT)],
     'train.jsonl:1: messages[0] has an unknown role "human" '
     "(use one of: system, user, assistant, tool)"),
    ([chat(USER, ASSISTANT, {"role": "assistant"})],
     'train.jsonl:1: messages[2] has no "content"'),
    ([chat(USER, {"role": "assistant", "content": 3})],
     'train.jsonl:1: messages[1] "content" must be a string, found a number'),
    ([chat({"role": "user", "content": ""}, ASSISTANT)],
     'train.jsonl:1: messages[0] "content" is empty'),
    ([chat({"role": "system", "content": "s"}, USER)],
     'train.jsonl:1: no "assistant" message; there is nothing to train on'),
    ([chat(USER, {"role": "assistant", "tool_calls": []})],
     'train.jsonl:1: messages[1] "tool_calls" must be a non-empty array'),
    ([chat(USER, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]})],
     'train.jsonl:1: messages[1].tool_calls[0] has no function "name"'),
    ([chat({"role": "user", "content": "x", "tool_calls": [CALL]}, ASSISTANT)],
     'train.jsonl:1: messages[0] has "tool_calls" but role "user"; '
     "only assistant turns call tools"),
    ([chat(USER, ASSISTANT, tools={"name": "f"})],
     'train.jsonl:1: "tools" must be an array of tool (function schema) objects'),
    (['{"text": "a"}', '{"prompt": "p", "completion": "c"}'],
     "train.jsonl:2: a completion record, but line 1 is a text record; use one format per file"),
    ([], "train.jsonl: the file is empty; it needs at least one record"),
    (["", "  "], "train.jsonl: the file is empty; it needs at least one record"),
]


@pytest.mark.parametrize("lines,message", BAD, ids=[m.split(": ", 1)[1][:40] for _, m in BAD])
def test_bad_record_message(tmp_path, lines, message):
    assert error_of(write(tmp_path, lines)) == message


def test_all_problems_reported_in_one_error(tmp_path):
    lines = ['{"text": "ok"}', '{"text": ""}', "", "{oops", '{"text": 1}']
    assert error_of(write(tmp_path, lines)).splitlines() == [
        'train.jsonl:2: "text" is empty',
        "train.jsonl:4: not valid JSON (Expecting property name enclosed in double quotes "
        "at column 2)",
        'train.jsonl:5: "text" must be a string, found a number',
    ]


def test_problems_capped(tmp_path):
    lines = ['{"text": ""}'] * 25
    message = error_of(write(tmp_path, lines)).splitlines()
    assert len(message) == 21
    assert message[19] == 'train.jsonl:20: "text" is empty'
    assert message[20] == "... and 5 more"


def test_non_utf8_line(tmp_path):
    path = tmp_path / "valid.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert error_of(path) == (
        "valid.jsonl:2: not valid UTF-8 (byte 0xe9 at column 14); save the file as UTF-8"
    )


def test_bom_and_blank_lines_and_extra_keys(tmp_path):
    path = tmp_path / "train.jsonl"
    body = '{"text": "a", "id": 7}\n\n  \n{"text": "b"}\r\n'
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert read_records(path) == [
        Record(kind="text", source="train.jsonl:1", text="a", origin="text"),
        Record(kind="text", source="train.jsonl:4", text="b", origin="text"),
    ]


def test_good_formats(tmp_path):
    tool_turn = {"role": "assistant", "content": None, "tool_calls": [CALL]}
    tool_reply = {"role": "tool", "content": "{}"}
    tools = [{"type": "function", "function": {"name": "f"}}]
    path = write(tmp_path, [chat(USER, tool_turn, tool_reply, ASSISTANT, tools=tools)])
    (record,) = read_records(path)
    assert record.kind == "chat" and record.source == "train.jsonl:1"
    assert record.messages == (USER, tool_turn, tool_reply, ASSISTANT)
    assert record.tools == tuple(tools)
    path = write(tmp_path, ['{"prompt": "p", "completion": "c"}'], "test.jsonl")
    assert read_records(path) == [
        Record(kind="completion", source="test.jsonl:1", prompt="p", completion="c",
               origin="completion")
    ]


def test_plain_text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("line one\r\nline two\n", encoding="utf-8")
    (record,) = read_records(path)
    assert record == Record(kind="text", source="book.txt", text="line one\nline two\n")
    assert from_plain_text(record)
    assert not from_plain_text(Record(kind="text", source="a.jsonl:1", text="x"))


def test_find_splits(tmp_path):
    for name in ("train.jsonl", "valid.jsonl", "test.txt"):
        (tmp_path / name).write_text('{"text": "a"}\n')
    assert find_splits(str(tmp_path)) == {
        "train": tmp_path / "train.jsonl",
        "valid": tmp_path / "valid.jsonl",
        "test": tmp_path / "test.txt",
    }
    assert find_splits(str(tmp_path / "valid.jsonl")) == {"train": tmp_path / "valid.jsonl"}


@pytest.mark.parametrize(
    "files,data,start",
    [
        ([], "missing", "missing: no such file or directory;"),
        (["data.csv"], "data.csv", "data.csv: unsupported file type '.csv'; use .jsonl"),
        (["valid.jsonl", "notes.md"], ".",
         ".: no train.jsonl or train.txt in this directory (found: notes.md, valid.jsonl);"),
        (["train.jsonl", "train.txt"], ".", ".: both train.jsonl and train.txt; keep only one"),
    ],
)
def test_find_splits_errors(tmp_path, monkeypatch, files, data, start):
    monkeypatch.chdir(tmp_path)
    for name in files:
        (tmp_path / name).write_text("x")
    with pytest.raises(UserError) as info:
        find_splits(data)
    assert str(info.value).startswith(start)
    assert "\n" not in str(info.value)


class NoTemplate:
    """A tokenizer stand-in for the one attribute check_chat_template reads."""

    chat_template = None


def test_chat_records_need_a_chat_template(tmp_path):
    chats = [Record(kind="chat", source="train.jsonl:1", messages=(USER, ASSISTANT))]
    texts = [Record(kind="text", source="train.jsonl:1", text="a")]
    check_chat_template(texts, NoTemplate(), tmp_path / "train.jsonl")
    with pytest.raises(UserError, match="^train.jsonl: chat records need a tokenizer with a chat "
                                        "template; "):
        check_chat_template(chats, NoTemplate(), tmp_path / "train.jsonl")


# Files that bulk.plain_columns reads in one pass, and one good record per line that it sends
# the general way; each pair must give the same records as the general path alone.
PLAIN_FILES = {
    "completion": [{"prompt": "a", "completion": " b"}, {"prompt": "é 🙂", "completion": "c\n"}],
    "text": [{"text": "one"}, {"text": "two\u2028three"}],
    "chat": [{"messages": [USER, ASSISTANT]},
             {"messages": [{"role": "system", "content": "s"}, USER, ASSISTANT, USER,
                           ASSISTANT]}],
}
NOT_PLAIN = {"completion": {"prompt": "a", "completion": "b", "id": 3},
             "text": {"text": "x", "meta": None},
             "chat": {"messages": [USER, {**ASSISTANT, "tool_calls": None}]}}


@pytest.mark.parametrize("kind", PLAIN_FILES)
def test_plain_files_read_in_bulk_give_the_general_paths_records(tmp_path, kind):
    for objects in (PLAIN_FILES[kind], [*PLAIN_FILES[kind], NOT_PLAIN[kind]]):
        path = write(tmp_path, ["", *map(json.dumps, objects), "  "])
        assert (bulk.parse_lines(path.read_bytes()) is not None) and (
            (bulk.plain_columns(objects) is not None) == (objects is PLAIN_FILES[kind]))
        general = records_from_objects(objects, "train.jsonl")
        records = read_records(path)
        assert [r.source for r in records] == [f"train.jsonl:{i}" for i in
                                               range(2, 2 + len(objects))]
        assert [r._replace(source="") for r in records] == [
            r._replace(source="") for r in general]


@pytest.mark.parametrize("line", [
    '{"text": "a"} {"text": "b"}', '{"text": "a"}x', '{"text": NaN}', '{"text": "\\ud800"}',
    '{"text": 1e400}', "\u00a0", '{"text": "b"} {"text":\n"c"}'])
def test_lines_that_are_not_one_plain_json_value_go_the_general_way(tmp_path, line):
    raw = ("\n".join(['{"text": "a"}', line]) + "\n").encode()
    assert bulk.parse_lines(raw) is None


def test_two_values_on_a_line_are_refused_by_line(tmp_path):
    path = write(tmp_path, ['{"text": "a"}', '{"text": "b"} {"text": "c"}'])
    assert error_of(path) == "train.jsonl:2: not valid JSON (Extra data at column 15)"


def test_a_value_across_lines_is_refused_by_line_when_the_counts_balance(tmp_path):
    # Two values on line 1 and one across lines 2-3: as many values as lines that hold any.
    path = write(tmp_path, ['{"text": "a"} {"text": "b"}', '{"text":', '"c"}'])
    assert error_of(path).splitlines() == [
        "train.jsonl:1: not valid JSON (Extra data at column 15)",
        "train.jsonl:2: not valid JSON (Expecting value at column 9)",
        "train.jsonl:3: not valid JSON (Extra data at column 4)"]


@pytest.mark.parametrize("kind", PLAIN_FILES)
def test_records_kept_as_columns_behave_as_the_list_of_them(tmp_path, kind):
    records = read_records(write(tmp_path, ["", *map(json.dumps, PLAIN_FILES[kind] * 2)]))
    listed = list(records)
    assert isinstance(records, RecordColumns) and kinds_of(records) == {kind}
    assert records == listed and listed == records and not records != listed
    assert records != listed[:-1] and records != [*listed[:-1], listed[0]]
    assert len(records) == 4 and records[1] == listed[1] and records[-1] == listed[-1]
    assert records[1:3] == listed[1:3] and records[::-1] == listed[::-1]
    assert records[-1].source == "train.jsonl:5"
    assert select(records, [3, 0]) == select(listed, [3, 0]) == [listed[3], listed[0]]
    assert repr(records) == repr(listed)
    with pytest.raises(IndexError):
        records[4]
