"""Instruction formats people have, converted per record to ours before it is checked.

- Alpaca (Stanford Alpaca, LLaMA-Factory, CodeAlpaca, GPTeacher): {"instruction", "input"?,
  "output" or "response", "system"?, "history"?}. The prompt is the instruction, then a
  newline and the input when there is one (as LLaMA-Factory joins them); with a system or a
  history ([[question, answer], ...]) the record becomes a chat.
- ShareGPT (FastChat, LLaMA-Factory, glaive): {"conversations": [{"from", "value"}], "system"?,
  "tools"?}, tools as a list or a JSON string.
Ours ({"text"}, {"prompt", "completion"}, {"messages"}) and preference pairs pass unchanged.
"""

import json
from collections.abc import Sequence

from mlx_lora.data.columns import Record, kinds_of
from mlx_lora.data.sharegpt import to_messages

# format -> how it reads in the one-line report of a file
LABELS = {"alpaca": "Alpaca (instruction/input/output)", "sharegpt": "ShareGPT (conversations)",
          "text": "text", "completion": "prompt/completion", "chat": "chat (messages)",
          "preference": "preference pairs"}


def detect(obj) -> str | None:
    """The foreign format a record is in, or None for ours (or none at all)."""
    if not isinstance(obj, dict) or {"chosen", "rejected"} <= set(obj):
        return None
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and ("output" in obj or "response" in obj):
        return "alpaca"
    return None


def convert(obj: dict, fmt: str) -> tuple[dict | None, list[str]]:
    """The record in our format, or None and every problem found."""
    return CONVERTERS[fmt](obj)


def _alpaca(obj: dict) -> tuple[dict | None, list[str]]:
    answer_key = "output" if "output" in obj else "response"
    problems = [f'"{key}" must be a string' for key in ("instruction", "input", answer_key,
                                                       "system")
                if key in obj and obj[key] is not None and not isinstance(obj[key], str)]
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
            for turn in history):
        problems.append('"history" must be a list of [question, answer] pairs of strings')
    if problems:
        return None, problems
    prompt = "\n".join(part for part in (obj["instruction"], obj.get("input")) if part)
    if not history and not obj.get("system"):
        return {"prompt": prompt, "completion": obj[answer_key]}, []
    messages = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    for question, answer in history:
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]
    messages += [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": obj[answer_key]}]
    return {"messages": messages}, []


def _sharegpt(obj: dict) -> tuple[dict | None, list[str]]:
    messages, problems = to_messages(obj["conversations"], "conversations")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        problems.append('"system" must be a string')
    tools = obj.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            problems.append(f'"tools" is a string but not JSON ({e.msg})')
    if problems:
        return None, problems
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    return {"messages": messages, **({"tools": tools} if tools else {})}, []


CONVERTERS = {"alpaca": _alpaca, "sharegpt": _sharegpt}


def describe(name: str, records: Sequence[Record]) -> str:
    """One line on what a file was read as: "train.json: Alpaca (...) -> prompt/completion,
    999 records"."""
    origin = records[0].origin
    kinds = sorted(kinds_of(records))
    became = "" if kinds == [origin] else " -> " + " and ".join(LABELS[k] for k in kinds)
    return f"{name}: {LABELS.get(origin, origin)}{became}, {len(records)} records"


def closest_format(obj: dict) -> str:
    """How to map a record no format matches, from the keys it has."""
    if "instruction" in obj:
        return 'closest format: Alpaca, which needs "output" (or "response") beside "instruction"'
    if "conversations" in obj or "messages" in obj:
        return "closest format: chat; see the problems with its messages"
    # Identifiers are no text to learn from.
    strings = [k for k, v in obj.items() if isinstance(v, str)
               and k.lower() != "id" and not k.lower().endswith("_id")]
    lists = [k for k, v in obj.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    if lists:
        return (f"if \"{lists[0]}\" holds chat messages, map it: --chat-feature {lists[0]} "
                f"(YAML: chat_feature: {lists[0]})")
    if len(strings) >= 2:
        prompt, completion = strings[0], strings[1]
        return (f"closest format: prompt/completion; map the keys: --prompt-feature {prompt} "
                f"--completion-feature {completion} (YAML: prompt_feature, completion_feature)")
    if strings:
        return f"closest format: text; map the key: --text-feature {strings[0]}"
    return ("use one of: {\"text\"}, {\"prompt\", \"completion\"}, {\"messages\"}, Alpaca "
            "{\"instruction\", \"input\", \"output\"}, ShareGPT {\"conversations\"}")
