"""ShareGPT-style turns ({"from": "human", "value": ...}) as chat messages ({"role", "content"}).

LLaMA-Factory, FastChat and glaive write conversations this way; the roles map as
LLaMA-Factory reads them: a function_call turn is an assistant turn calling a tool (its value
a JSON {"name", "arguments"}), an observation is the tool's result.
"""

import json

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "model": "assistant", "bot": "assistant", "system": "system", "observation": "tool",
         "tool": "tool", "function_call": "assistant"}


def is_turn(value) -> bool:
    """Whether a value looks like one ShareGPT turn."""
    return isinstance(value, dict) and "from" in value and "value" in value


def to_message(turn: dict, label: str) -> tuple[dict | None, str | None]:
    """(message, None), or (None, what is wrong) naming the turn by `label`."""
    if not is_turn(turn):
        return None, f'{label} must be an object with "from" and "value"'
    role, value = ROLES.get(turn["from"]), turn["value"]
    if role is None:
        return None, (f'{label} has an unknown "from" {json.dumps(turn["from"])} '
                      f'(use one of: {", ".join(ROLES)})')
    if not isinstance(value, str):
        return None, f'{label} "value" must be a string'
    if turn["from"] != "function_call":
        return {"role": role, "content": value}, None
    try:
        call = json.loads(value)
    except json.JSONDecodeError:
        call = None
    if not isinstance(call, dict) or "name" not in call:
        return None, f'{label} is a function_call whose value is not JSON {{"name", "arguments"}}'
    function = {"name": call["name"], "arguments": call.get("arguments", {})}
    return {"role": "assistant", "content": "", "tool_calls": [{"function": function}]}, None


def to_messages(turns, label: str) -> tuple[list[dict], list[str]]:
    """The turns of a list as messages, and every problem found."""
    if not isinstance(turns, list) or not turns:
        return [], [f"{label} must be a non-empty array of turns"]
    messages, problems = [], []
    for i, turn in enumerate(turns):
        message, problem = to_message(turn, f"{label}[{i}]")
        if problem:
            problems.append(problem)
        else:
            messages.append(message)
    return messages, problems
