"""Preference records as two ordinary records that share a prompt: chosen and rejected.

Accepted, as TRL and LLaMA-Factory write them:
- {"prompt": str, "chosen": str, "rejected": str}, optionally "system": str;
- the same with message lists (TRL's conversational format) for any of the three;
- {"chosen": [messages], "rejected": [messages]}: the common first messages are the prompt;
- ShareGPT: {"conversations": [turns], "chosen": turn, "rejected": turn}, optionally "system".
Each half becomes a {"prompt", "completion"} or {"messages"} record; a chat half also says
where its response starts, as only the response carries loss.
"""

from dataclasses import dataclass

from mlx_lora.data.sharegpt import is_turn, to_message


@dataclass(frozen=True)
class PairHalves:
    """A pair's two halves as plain record dicts, and the index of the first response message
    (0 for prompt/completion halves)."""

    chosen: dict
    rejected: dict
    response_start: int


def is_preference(obj: dict) -> bool:
    """Whether a record is a preference pair."""
    return "chosen" in obj and "rejected" in obj


def split_pair(obj: dict) -> tuple[PairHalves | None, list[str]]:
    """The pair's halves, or None and every problem found."""
    system = obj.get("system")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        return None, ['"system" must be a non-empty string']
    if "prompt" not in obj and "conversations" not in obj:
        return _implicit_prompt(obj)
    key = "prompt" if "prompt" in obj else "conversations"
    prompt = obj[key]
    if isinstance(prompt, str) and not isinstance(obj["chosen"], (list, dict)) and not system:
        return _strings(obj)
    problems = []
    prompt_messages = (_messages(prompt, key, problems) if not isinstance(prompt, str)
                       else [{"role": "user", "content": prompt}])
    if system and not (prompt_messages and prompt_messages[0].get("role") == "system"):
        prompt_messages = [{"role": "system", "content": system}, *prompt_messages]
    halves = [_response(obj[name], name, problems) for name in ("chosen", "rejected")]
    if problems:
        return None, problems
    chosen, rejected = ({"messages": prompt_messages + half} for half in halves)
    return PairHalves(chosen, rejected, len(prompt_messages)), []


def _strings(obj: dict) -> tuple[PairHalves | None, list[str]]:
    problems = [f'"{name}" must be a string or a list of messages'
                for name in ("chosen", "rejected") if not isinstance(obj[name], str)]
    if problems:
        return None, problems
    return PairHalves({"prompt": obj["prompt"], "completion": obj["chosen"]},
                      {"prompt": obj["prompt"], "completion": obj["rejected"]}, 0), []


def _implicit_prompt(obj: dict) -> tuple[PairHalves | None, list[str]]:
    """TRL's implicit prompt: two full conversations, the shared first messages the prompt."""
    problems = []
    chosen = _messages(obj["chosen"], "chosen", problems)
    rejected = _messages(obj["rejected"], "rejected", problems)
    if problems:
        return None, problems
    shared = 0
    while (shared < min(len(chosen), len(rejected)) - 1
           and chosen[shared] == rejected[shared]):
        shared += 1
    if shared == 0:
        return None, ['no "prompt", and "chosen" and "rejected" share no first message to be '
                      'it; add "prompt" (a string or a list of messages)']
    return PairHalves({"messages": chosen}, {"messages": rejected}, shared), []


def _response(value, name: str, problems: list[str]) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = _messages(value, name, problems)
    if messages and not any(m.get("role") == "assistant" for m in messages):
        problems.append(f'"{name}" has no assistant message')
    return messages


def _messages(value, name: str, problems: list[str]) -> list[dict]:
    """A message list (or one message) in role/content or ShareGPT from/value form."""
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        problems.append(f'"{name}" must be a string, a message or a non-empty list of messages')
        return []
    messages = []
    for i, item in enumerate(items):
        if not is_turn(item):
            messages.append(item)  # role/content, checked with the half's other messages
            continue
        message, problem = to_message(item, f"{name}[{i}]")
        if problem:
            problems.append(problem)
        else:
            messages.append(message)
    return messages
