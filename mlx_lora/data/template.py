"""Render a record to token ids and a per-token loss flag, with the tokenizer's chat template.

With mask_prompt, loss falls on the completion, or on EVERY assistant turn of a chat (mlx-lm
supervises only the last), each with its end-of-turn token, and on nothing else; a record's
response_start (a preference pair's half) leaves the turns before it as context only.

How turns are found: assistant turn i starts where `messages[:i]` rendered with the
generation prompt ends, and ends where `messages[:i+1]` rendered ends (trailing whitespace
after the end-of-turn token excluded: the model never generates it), when both renderings are
prefixes of the full one. Some templates render a turn differently once a later turn follows
(Qwen3 drops the empty `<think>` block from history), so `messages[:i+1]` is then not a prefix;
the turn's end is found instead as the longest tail of its last-turn rendering that appears
right after its start. Character spans become token flags through the fast tokenizer's offsets
of the full string, so the ids are exactly those of encoding the full rendering.
"""

from collections.abc import Sequence
from pathlib import Path

from jinja2 import TemplateError
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_lora.data.columns import Record, kinds_of
from mlx_lora.errors import UserError

Span = tuple[int, int]  # [start, end) character offsets in the rendered string


def render(record: Record, tokenizer, mask_prompt: bool,
           max_tokens: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of the record and, per token, whether it is a training target.

    max_tokens: the caller keeps only that many tokens, so a long record's text is tokenized
    only as far as it takes to yield them (its first tokens come out as from the whole text).
    """
    if record.kind == "chat":
        return _render_chat(record.messages, record.tools, tokenizer, mask_prompt, record.source,
                            max_tokens, record.response_start)
    if record.kind == "completion" and has_chat_template(tokenizer):
        messages = ({"role": "user", "content": record.prompt},
                    {"role": "assistant", "content": record.completion})
        return _render_chat(messages, record.tools, tokenizer, mask_prompt, record.source,
                            max_tokens)
    if record.kind == "completion" and mask_prompt:
        # No template: plain prompt + completion (the data chooses any separator) + eos.
        text = record.prompt + record.completion
        ids, flags = _encode(tokenizer, text, [(len(record.prompt), len(text))], True,
                             max_tokens)
        return _with_eos(ids, flags, tokenizer)
    text = record.text if record.kind == "text" else record.prompt + record.completion
    ids, flags = _encode(tokenizer, text, None, True, max_tokens)  # BOS where the model wants
    return _with_eos(ids, flags, tokenizer)


CHARS_PER_TOKEN = 8  # a first guess at how much text max_tokens tokens take; grown if short
PREFIX_MARGIN = 16  # tokens past max_tokens, so the cut cannot change the tokens kept


def _encode(tokenizer, text: str, spans: list[Span] | None, add_special_tokens: bool,
            max_tokens: int | None) -> tuple[list[int], list[bool]]:
    """Ids of `text` and their target flags (all True when spans is None), from as much of
    the text as max_tokens (if given) needs."""
    budget = len(text) if max_tokens is None else max_tokens * CHARS_PER_TOKEN
    while True:
        piece = text[:budget]
        if spans is None:
            ids = _ids(tokenizer, piece, add_special_tokens)
            ids, flags = ids, [True] * len(ids)
        else:
            ids, flags = _encode_spans(tokenizer, piece, spans, add_special_tokens)
        if budget >= len(text) or len(ids) > max_tokens + PREFIX_MARGIN:
            return ids, flags
        budget *= 4


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer can render chats (mlx-lm's wrapper also knows custom renderers)."""
    known = getattr(tokenizer, "has_chat_template", None)
    if known is not None:
        return bool(known)
    return bool(getattr(tokenizer, "chat_template", None))


def check_chat_template(records: Sequence[Record], tokenizer, path) -> None:
    """Fail early when chat records meet a tokenizer that has no chat template."""
    if "chat" in kinds_of(records) and not has_chat_template(tokenizer):
        raise UserError(
            f"{Path(path).name}: chat records need a tokenizer with a chat template; this one "
            'has none. Use an instruct/chat model, or write the records as {"text": ...}'
        )


def _with_eos(ids: list[int], flags: list[bool], tokenizer) -> tuple[list[int], list[bool]]:
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids, flags = ids + [eos], flags + [True]
    return ids, flags


def _render_chat(messages, tools, tokenizer, mask_prompt: bool, source: str,
                 max_tokens: int | None, response_start: int = 0):
    messages = list(messages)
    tools = list(tools) if tools else None
    try:
        full = _apply(tokenizer, messages, tools, False)
    except RENDER_ERRORS as e:
        raise UserError(
            f"{source}: the chat template cannot render this conversation ({e})"
        ) from None
    if not mask_prompt:  # the template writes BOS itself where the model wants one
        return _encode(tokenizer, full, None, False, max_tokens)
    spans = [_assistant_span(tokenizer, messages, tools, full, i, source)
             for i, m in enumerate(messages)
             if m["role"] == "assistant" and i >= response_start]
    return _encode(tokenizer, full, spans, False, max_tokens)


# What a template raises for a conversation it rejects (raise_exception, a None content, ...).
RENDER_ERRORS = (TemplateError, ValueError, TypeError, IndexError, KeyError)


def _apply(tokenizer, messages, tools, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _try_apply(tokenizer, messages, tools, add_generation_prompt: bool) -> str | None:
    try:
        return _apply(tokenizer, messages, tools, add_generation_prompt)
    except RENDER_ERRORS:
        return None


def _assistant_span(tokenizer, messages, tools, full: str, i: int, source: str) -> Span:
    head = _try_apply(tokenizer, messages[:i], tools, True)
    if head is None or not full.startswith(head):
        raise UserError(
            f"{source}: cannot find where messages[{i}] (assistant) starts in the chat "
            "template's output, so its prompt cannot be masked; train without --mask-prompt "
            "or start the chat with a system or user message"
        )
    start = len(head)
    last = _try_apply(tokenizer, messages[: i + 1], tools, False)
    if last is not None and full.startswith(last) and len(last.rstrip()) > start:
        return start, len(last.rstrip())
    # The turn renders differently in history: match the tail of its last-turn rendering.
    if last is None or not last.startswith(head) or not last[start:].strip():
        raise UserError(f"{source}: cannot find messages[{i}] (assistant) in the chat "
                        "template's output; train without --mask-prompt")
    return start, _history_end(full, start, last[start:].rstrip())


def _history_end(full: str, start: int, tail: str) -> int:
    """End of the longest suffix of `tail` found in full[start : start + len(tail)]."""

    # found(k) is monotone in k: a suffix of a suffix found in the window is found there too.
    def found(k: int) -> int:
        return full.find(tail[k:], start, start + len(tail))

    lo, hi = 0, len(tail)  # found(len(tail)) is the empty suffix, always found
    while lo < hi:
        mid = (lo + hi) // 2
        if found(mid) >= 0:
            hi = mid
        else:
            lo = mid + 1
    return found(lo) + len(tail) - lo


def _backend(tokenizer):
    """The Rust tokenizer under a fast HF tokenizer, or None. Called directly it gives the
    same ids and offsets as the HF wrapper, without its per-call overhead (about half the
    time of tokenizing a data set)."""
    hf = tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer
    return getattr(hf, "backend_tokenizer", None) if getattr(hf, "is_fast", False) else None


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    if backend := _backend(tokenizer):
        return backend.encode(text, add_special_tokens=add_special_tokens).ids
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _encode_spans(tokenizer, text: str, spans: list[Span], add_special_tokens: bool):
    """Ids of `text` and a flag per token: True where the token overlaps a span."""
    if backend := _backend(tokenizer):
        enc = backend.encode(text, add_special_tokens=add_special_tokens)
        ids, offsets = enc.ids, enc.offsets
        # Overlap, not containment: a SentencePiece "▁word" token may start on the prompt's space.
        flags = [any(a < end and b > start for start, end in spans) for a, b in offsets]
        return ids, flags
    # Slow tokenizers have no offsets: count the tokens of each prefix instead.
    ids = list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    flags = [False] * len(ids)
    for start, end in spans:
        first = len(tokenizer.encode(text[:start], add_special_tokens=add_special_tokens))
        stop = len(tokenizer.encode(text[:end], add_special_tokens=add_special_tokens))
        flags[first:stop] = [True] * (min(stop, len(ids)) - min(first, len(ids)))
    return ids, flags
