"""The normalized record every dataset shape becomes, and the pieces the shapes are built from: messages in
OpenAI's and ShareGPT's spellings, tool calls, strings. formats.py (what to learn by example) and judgments.py
(what to learn by judgment: preference pairs, rated answers) build Records from them.

    evertrain check FILE          # every record of FILE through these, then tokenized
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "tool")
MEDIA_PARTS = ("image_url", "image", "input_audio", "audio", "file")
PLACEHOLDER = re.compile(r"<(?:image|video|audio)>")  # where LLaMA-Factory puts each of those media in the text
TEXT_ONLY = "evertrain trains text only (images, video and audio are not supported)"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}
CHAT_KEYS = ("tools", "functions")
SUPERVISED, PREFERENCE, FEEDBACK = "supervised", "preference", "feedback"  # what a record teaches (its objective)


class RecordError(ValueError):
    """Why one record cannot be trained, in one line (the caller says where the record is)."""


class FitsNoFormat(RecordError):
    """A record none of the shapes fits (columns.suggest may find the mapping that would)."""


@dataclass
class Record:
    kind: str                           # the shape it came in: text, prompt_completion, messages, alpaca, ...
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict] | None = None  # ready for a chat template
    train: list[bool] | None = None     # one per message: True for the assistant turns that carry loss
    tools: list[dict] | None = None
    ignored: tuple[str, ...] = ()       # the record's own names of the top-level keys the shape did not use
    objective: str = SUPERVISED         # supervised; preference (a pair: `sides`); feedback (`desirable`)
    sides: tuple["Record", "Record"] | None = None  # a preference pair: the chosen and the rejected answer,
    #                                                 each a supervised record on the same prompt
    desirable: bool | None = None       # feedback: the answer was rated good (True) or bad (False)

    def size(self) -> int:
        """Characters of text it holds (what a tokenizing batch is bounded by)."""
        if self.sides is not None:
            return sum(side.size() for side in self.sides)
        if self.messages is not None:
            return sum(len(m["content"]) for m in self.messages)
        return len(self.text or "") + len(self.prompt or "") + len(self.completion or "")


def sharegpt_messages(items, key: str, system: str = "") -> list[dict]:
    """ShareGPT turns ({"from": "human", "value": ...}) as template messages, a system prompt first."""
    if not isinstance(items, list) or not items:
        raise RecordError(f'"{key}" must be a non-empty list')
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for i, m in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(f"{where} must be an object, got {tname(m)}")
        who, value = m.get("from", m.get("role")), m.get("value", m.get("content"))
        if who is None:
            raise RecordError(f'{where} has no "from"')
        if not isinstance(who, str) or who not in SHAREGPT_ROLES:
            raise RecordError(f"{where} has unknown role {who!r} (expected one of {', '.join(SHAREGPT_ROLES)})")
        if not isinstance(value, str):
            raise RecordError(f"{where}.value must be a string, got {tname(value)}")
        messages.append(function_call(value, where) if who == "function_call"
                        else {"role": SHAREGPT_ROLES[who], "content": value})
    return messages


def alpaca_prompt(r: dict) -> list[dict]:
    """Alpaca's instruction, input, system and history as the conversation an answer replies to."""
    instruction, query = string(r, "instruction"), string(r, "input", "")
    system, history = string(r, "system", ""), r.get("history", [])
    if not isinstance(history, list):
        raise RecordError(f'"history" must be a list of [instruction, response] pairs, got {tname(history)}')
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise RecordError(f"history[{i}] must be an [instruction, response] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages + [{"role": "user", "content": instruction + ("\n\n" + query if query.strip() else "")}]


def chat(kind: str, messages: list[dict], train: list[bool], tools: list[dict] | None) -> Record:
    trained = [m for m, t in zip(messages, train) if t]
    if not trained:
        why = "every assistant message has weight 0" if any(m["role"] == "assistant" for m in messages) \
            else "the conversation has no assistant message"
        raise RecordError(f"no assistant turn to train on ({why})")
    if not any(m["content"].strip() or m.get("tool_calls") for m in trained):
        raise RecordError("no assistant turn to train on (every trained assistant message is empty)")
    return Record(kind, messages=messages, train=train, tools=tools)


def message_list(items, key: str) -> tuple[list[dict], list[bool]]:
    if not isinstance(items, list) or not items:
        raise RecordError(f'"{key}" must be a non-empty list')
    pairs = [message(m, f"{key}[{i}]") for i, m in enumerate(items)]
    return [m for m, _ in pairs], [t for _, t in pairs]


def message(m, where: str) -> tuple[dict, bool]:
    """One OpenAI message -> (template message, carries loss). Unknown keys (refusal, audio, ...) are dropped."""
    if type(m) is dict and len(m) == 2 and type(m.get("content")) is str and m.get("role") in ROLES:
        return m, m["role"] == "assistant"  # the plain message most files hold, already as templates want it
    if not isinstance(m, dict):
        raise RecordError(f"{where} must be an object, got {tname(m)}")
    if "role" not in m:
        raise RecordError(f'{where} has no "role"')
    role = "tool" if m["role"] == "function" else m["role"]  # legacy function results are tool results
    if role not in ROLES:
        raise RecordError(f"{where} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
    calls = tool_calls(m, where) if role == "assistant" else []
    if "content" not in m and not calls:
        raise RecordError(f'{where} has no "content"')
    # An assistant turn that only calls tools has no content.
    out = {"role": role, "content": "" if m.get("content") is None and calls else content(m["content"], where)}
    if calls:
        out["tool_calls"] = calls
    for k in ("tool_call_id", "name"):
        if m.get(k) is not None:
            if not isinstance(m[k], str):
                raise RecordError(f"{where}.{k} must be a string, got {tname(m[k])}")
            out[k] = m[k]
    weight = 1 if m.get("weight") is None else m["weight"]
    if isinstance(weight, bool) or weight not in (0, 1):
        raise RecordError(f"{where}.weight must be 0 or 1, got {weight!r}")
    return out, role == "assistant" and weight == 1


def content(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RecordError(f"{where}.content must be a string or a list of text parts, got {tname(value)}")
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            raise RecordError(f"{where} has a {kind} part: {TEXT_ONLY}")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RecordError(f'{where}.content[{j}] must be a part {{"type": "text", "text": "..."}}, '
                              f"got {json.dumps(part, default=str)[:80]}")
        texts.append(part["text"])
    return "".join(texts)


def tool_calls(m: dict, where: str) -> list[dict]:
    calls = m.get("tool_calls")
    if calls is None and m.get("function_call") is not None:
        calls = [{"type": "function", "function": m["function_call"]}]  # legacy single call
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise RecordError(f"{where}.tool_calls must be a list, got {tname(calls)}")
    return [call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]


def call(c, where: str) -> dict:
    f = c.get("function") if isinstance(c, dict) else None
    args = f.get("arguments", {}) if isinstance(f, dict) else None
    if (not isinstance(f, dict) or not isinstance(f.get("name"), str) or c.get("type", "function") != "function"
            or not isinstance(args, (str, dict))):
        raise RecordError(f'{where} must be {{"type": "function", "function": {{"name": str, "arguments": '
                          "a JSON string or object}}")
    # One spelling for every source, OpenAI's: arguments as a JSON string.
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    out = {"type": "function", "function": {"name": f["name"], "arguments": args}}
    return {"id": str(c["id"]), **out} if c.get("id") is not None else out


def function_call(value: str, where: str) -> dict:
    """A ShareGPT function_call turn: structured tool call(s) when its value is JSON, else plain assistant text."""
    calls = parse_json(value)
    calls = calls if isinstance(calls, list) else [calls]
    if calls and all(isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c for c in calls):
        return {"role": "assistant", "content": "",
                "tool_calls": [call({"function": c}, f"{where}[{j}]") for j, c in enumerate(calls)]}
    return {"role": "assistant", "content": value}


def tools_of(r: dict) -> list[dict] | None:
    tools, functions = r.get("tools", []), r.get("functions", [])
    if isinstance(tools, str):  # LLaMA-Factory files and many Parquet exports hold the schemas as a JSON string
        tools = parse_json(tools) if tools.strip() else []
        if tools is None:
            raise RecordError('"tools" is a string but not valid JSON')
    for key, value in (("tools", tools), ("functions", functions)):
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            got = "a list holding other values" if isinstance(value, list) else tname(value)
            raise RecordError(f'"{key}" must be a list of objects, got {got}')
    # Bare function schemas (LLaMA-Factory, legacy "functions") get the OpenAI wrapper templates expect.
    out = [t if "function" in t else {"type": "function", "function": t} for t in tools]
    return out + [{"type": "function", "function": f} for f in functions] or None


def placeholder(value, where: str) -> tuple[str, str] | None:
    """The first media placeholder in a record's value and where it is (messages[0].content), or None."""
    if isinstance(value, str):
        found = PLACEHOLDER.search(value)
        return (found[0], where) if found else None
    if isinstance(value, dict):
        items = ((f"{where}.{k}", v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for w, v in items if (found := placeholder(v, w))), None)


def string(r: dict, key: str, default: str | None = None) -> str:
    value = r.get(key, default)
    if not isinstance(value, str):
        raise RecordError(f'"{key}" must be a string, got {tname(value)}')
    return value


def parse_json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def tname(value) -> str:
    return "null" if value is None else type(value).__name__
