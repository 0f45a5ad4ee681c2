"""OpenAI request bodies, read and checked: a bad one is an ApiError with a 4xx status."""

import json
from dataclasses import dataclass

from mlx_lora.config import ServeConfig
from mlx_lora.serve.adapters import AdapterSet

MAX_STOPS = 16


class ApiError(Exception):
    """An error as OpenAI's API reports one: an HTTP status and a JSON body saying why."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict:
        """OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class Completion:
    """One checked request: what to continue, with which adapter, how, and how to answer."""

    kind: str  # "chat" (/v1/chat/completions) or "text" (/v1/completions)
    model: str  # as the request named it; echoed in the answer
    adapter: str | None  # None: the base alone
    prompt: str  # the text the model continues (chat: rendered by the chat template)
    max_tokens: int
    temp: float
    top_p: float
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def read_json(raw: bytes) -> dict:
    """A request body as a JSON object."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {_kind(body)}")
    return body


def parse_completion(body: dict, kind: str, adapters: AdapterSet,
                     defaults: ServeConfig) -> Completion:
    """A chat or text completion request, every field it uses checked."""
    model = _typed(body, "model", str, adapters.base_name)
    try:
        adapter = adapters.adapter_for(model)
    except KeyError:
        names = ", ".join(adapters.model_names())
        raise ApiError(404, f"the model '{model}' does not exist; this server has: {names} "
                       "(and 'base', the base alone)", "model", "model_not_found") from None
    if kind == "chat":
        prompt = chat_prompt(adapters.loaded.tokenizer, _messages(body), _tools(body))
        max_tokens = _typed(body, "max_completion_tokens", int, None)
    else:
        prompt, max_tokens = _text_prompt(body), None
    max_tokens = _typed(body, "max_tokens", int, max_tokens or defaults.max_tokens)
    temp = float(_typed(body, "temperature", (int, float), defaults.temp))
    top_p = float(_typed(body, "top_p", (int, float), defaults.top_p))
    _check(max_tokens >= 1, "max_tokens", f"must be at least 1, got {max_tokens}")
    _check(temp >= 0, "temperature", f"must not be negative, got {temp}")
    _check(0 < top_p <= 1, "top_p", f"must be in (0, 1], got {top_p}")
    _check(_typed(body, "n", int, 1) == 1, "n", "only n=1 is supported")
    _check(not _typed(body, "logprobs", (bool, int), False), "logprobs", "is not supported")
    _check(not _typed(body, "echo", bool, False), "echo", "is not supported")
    options = _typed(body, "stream_options", dict, {})
    return Completion(kind, model, adapter, prompt, max_tokens, temp, top_p, _stops(body),
                      _typed(body, "stream", bool, False),
                      bool(_typed(options, "include_usage", bool, False, "stream_options.")))


def chat_prompt(tokenizer, messages: list[dict], tools: list | None = None) -> str:
    """The text the model continues: the chat template's rendering, as `mlx-lora generate`
    renders one user message; without a template, one user message as it is, else mlx-lm's
    plain role-prefixed form."""
    if tokenizer.chat_template:
        extra = {"tools": tools} if tools else {}
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True, **extra)
        except Exception as e:  # jinja raises its own errors for conversations it refuses
            raise ApiError(400, f"the chat template refused these messages: {e}",
                           "messages") from None
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    from mlx_lm.server import convert_chat

    return convert_chat(messages)


def _messages(body: dict) -> list[dict]:
    messages = _typed(body, "messages", list, None)
    _check(bool(messages), "messages", "must be a non-empty list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        _check(isinstance(message, dict), where, f"must be an object, not {_kind(message)}")
        role = _typed(message, "role", str, None, where + ".")
        _check(bool(role), where + ".role", "is required")
        checked.append({**message, "content": _content(message.get("content"), where)})
    return checked


def _content(content, where: str) -> str:
    """A message's content as text: a string, null, or a list of {"type": "text"} parts."""
    if content is None or isinstance(content, str):
        return content or ""
    _check(isinstance(content, list), where + ".content",
           f"must be a string or a list of text parts, not {_kind(content)}")
    texts = []
    for part in content:
        ok = isinstance(part, dict) and part.get("type") == "text" and isinstance(
            part.get("text"), str)
        _check(ok, where + ".content", 'parts must be {"type": "text", "text": "..."} '
               "(this server reads text only)")
        texts.append(part["text"])
    return "".join(texts)


def _tools(body: dict) -> list | None:
    return _typed(body, "tools", list, None) or None


def _text_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a batch of one: what the openai client sends for a list
    _check(isinstance(prompt, str) and prompt != "", "prompt",
           f"must be a non-empty string, not {_kind(prompt)}")
    return prompt


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    ok = isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)
    _check(ok, "stop", "must be a non-empty string or a list of them")
    _check(len(stops) <= MAX_STOPS, "stop", f"may hold at most {MAX_STOPS} strings")
    return tuple(stops)


def _typed(body: dict, key: str, kind, default, prefix: str = ""):
    """body[key] if it is of `kind` (JSON true is no number), the default if absent or null."""
    value = body.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_JSON_NAMES[k] for k in kinds if not (k is int and float in kinds))
        raise ApiError(400, f"'{prefix}{key}' must be {names}, not {_kind(value)}",
                       prefix + key)
    return value


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ApiError(400, f"'{param}' {message}", param)


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               list: "an array", dict: "an object"}


def _kind(value) -> str:
    """A JSON value's type, as a person would say it."""
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return "a number"
    return _JSON_NAMES.get(type(value), type(value).__name__)
