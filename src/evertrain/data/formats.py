"""Dataset shapes -> one normalized Record per example.

Each record (a JSONL line, a JSON array item, a Parquet or CSV row) is detected on its own. When several shapes
fit, the first one below wins; keys the chosen shape does not use are listed in Record.ignored, never fatal.

  {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}     OpenAI chat
  {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}        ShareGPT
  {"instruction": "Translate to French", "input": "cat", "output": "chat"}                         Alpaca
  {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hey"}]}  TRL chat
  {"prompt": "2+2=", "completion": "4"}                            ("response" works too)          prompt/completion
  {"text": "Once upon a time"}                                                                     text

Loss: text trains every token; prompt/completion the completion only; the chat shapes every assistant turn, except
OpenAI turns with "weight": 0, Alpaca "history" and the assistant turns inside a TRL prompt (context only).
Preference (chosen/rejected), KTO (a true/false "label") and multimodal records (media parts, "images"/"videos"/
"audios" lists, <image>/<video>/<audio> placeholders) are refused with the reason. A column mapping renames a
dataset's own fields first (config.parse_columns("question=prompt,answer=completion")); columns.py suggests one for a
record that fits no shape.

    evertrain check FILE          # check a file and print what would be trained
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "tool")
MEDIA_PARTS = ("image_url", "image", "input_audio", "audio", "file")
MEDIA_KEYS = ("images", "videos", "audios")  # LLaMA-Factory's multimodal files: the media beside the text
PLACEHOLDER = re.compile(r"<(?:image|video|audio)>")  # where LLaMA-Factory puts each of those media in the text
TEXT_ONLY = "evertrain trains text only (images, video and audio are not supported)"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}
CHAT_KEYS = ("tools", "functions")
EXPECTED = ("expected text, prompt+completion (or response), messages, conversations (ShareGPT), "
            "instruction+output (Alpaca), or prompt+completion as message lists")


class RecordError(ValueError):
    """Why one record cannot be trained, in one line (the caller says where the record is)."""


class FitsNoFormat(RecordError):
    """A record none of the shapes fits (columns.suggest may find the mapping that would)."""


@dataclass
class Record:
    kind: str                           # text, prompt_completion, messages, alpaca, sharegpt, chat_prompt_completion
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict] | None = None  # ready for a chat template
    train: list[bool] | None = None     # one per message: True for the assistant turns that carry loss
    tools: list[dict] | None = None
    ignored: tuple[str, ...] = ()       # the record's own names of the top-level keys the shape did not use

    def size(self) -> int:
        """Characters of text it holds (what a tokenizing batch is bounded by)."""
        if self.messages is not None:
            return sum(len(m["content"]) for m in self.messages)
        return len(self.text or "") + len(self.prompt or "") + len(self.completion or "")


def label(record: Record) -> str:
    """What tells a record apart from its neighbours: its last user turn (never a system prompt that every
    record shares), else its prompt, else its text."""
    if record.messages:
        said = [m["content"] for m in record.messages if m["role"] == "user" and (m.get("content") or "").strip()]
        return said[-1] if said else next((m["content"] for m in record.messages
                                           if m["role"] != "system" and (m.get("content") or "").strip()), "")
    return record.prompt if (record.prompt or "").strip() else record.text or record.completion or ""


def parse_record(obj, columns: dict[str, str] | None = None) -> Record:
    """One decoded record -> Record, or RecordError with a one-line reason."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {_tname(obj)}")
    r, origin, displaced = _rename(obj, columns or {})
    for key in MEDIA_KEYS:
        if r.get(key) not in (None, [], "", {}):  # an empty list is what mixed files give their text-only records
            raise RecordError(f'"{key}" lists media for this record: {TEXT_ONLY}')
    record, used = _detect(r)
    if record is None:
        nulls = sorted(k for k, v in obj.items() if v is None)
        raise FitsNoFormat(f"fits no format (keys: {sorted(origin.values())}"
                           + (f", null: {nulls}" if nulls else "") + f"); {EXPECTED}")
    if isinstance(r.get("label"), bool):
        # Training on every KTO example would also teach the answers labelled bad. The one place to start KTO.
        raise RecordError('KTO data (examples with a true/false "label") is for KTO preference training; evertrain '
                          'trains supervised examples only: keep the examples labelled true, without "label"')
    if record.kind != "text":
        # Not in plain text: HTML and XML corpora hold <audio> and <video> tags that are just text.
        for key in used:
            if key in r and key not in CHAT_KEYS and (found := _placeholder(r[key], origin[key])):
                where = f'"{found[1]}"' if found[1] == origin[key] else found[1]  # "prompt", but messages[0]
                raise RecordError(f"{where} holds the placeholder {found[0]}: {TEXT_ONLY}")
    record.ignored = tuple(sorted([origin[k] for k in r if k not in used] + displaced))
    return record


def _rename(obj: dict, columns: dict[str, str]) -> tuple[dict, dict[str, str], list[str]]:
    """Apply the mapping; return (record, format key -> the record's own name, keys the mapping pushed out)."""
    if not columns and None not in obj.values():  # the common case, kept cheap: one dict view scan
        return obj, {k: k for k in obj}, []
    # Nulls count as absent: Parquet fills a row's missing columns with them, and mixed files have many.
    r = {k: v for k, v in obj.items() if v is not None and k not in columns}
    origin, displaced = {k: k for k in r}, []
    for source, target in columns.items():
        if obj.get(source) is None:
            continue
        if target in origin and origin[target] in columns:  # two sources for one key: the first listed wins
            displaced.append(source)
            continue
        if target in r:
            displaced.append(origin[target])  # the dataset's own column loses to the one mapped onto it
        r[target], origin[target] = obj[source], source
    return r, origin, displaced


def _detect(r: dict) -> tuple[Record | None, tuple[str, ...]]:
    if "messages" in r:
        if isinstance(r["messages"], list) and any(isinstance(m, dict) and "from" in m for m in r["messages"]):
            return _sharegpt(r, "messages"), ("messages", "system") + CHAT_KEYS
        return _openai(r), ("messages",) + CHAT_KEYS
    if "conversations" in r:
        return _sharegpt(r, "conversations"), ("conversations", "system") + CHAT_KEYS
    if "chosen" in r and "rejected" in r:
        raise RecordError('preference data (chosen/rejected) is for preference training such as DPO; evertrain '
                          'trains supervised examples only: keep the chosen answer as "completion" or "messages"')
    answer = "completion" if "completion" in r else "response" if "response" in r else None
    if "instruction" in r and "output" in r:
        return _alpaca(r), ("instruction", "input", "output", "system", "history")
    if "prompt" in r and answer:
        if isinstance(r[answer], list):
            return _chat_prompt_completion(r, answer), ("prompt", answer) + CHAT_KEYS
        return _prompt_completion(r, answer), ("prompt", answer)
    if "text" in r:
        return _text(r), ("text",)
    return None, ()


# ---------------------------------------------------------------- one function per shape

def _text(r: dict) -> Record:
    text = _str(r, "text")
    if not text.strip():
        raise RecordError('"text" is empty')
    return Record("text", text=text)


def _prompt_completion(r: dict, answer: str) -> Record:
    prompt, completion = _str(r, "prompt"), _str(r, answer)
    if not completion.strip():
        raise RecordError(f'"{answer}" is empty')
    return Record("prompt_completion", prompt=prompt, completion=completion)


def _openai(r: dict) -> Record:
    messages, train = _message_list(r["messages"], "messages")
    return _chat("messages", messages, train, _tools(r))


def _chat_prompt_completion(r: dict, answer: str) -> Record:
    if not isinstance(r["prompt"], list):
        raise RecordError(f'"prompt" must be a list of messages when "{answer}" is one, got {_tname(r["prompt"])}')
    prompt, _ = _message_list(r["prompt"], "prompt")
    completion, train = _message_list(r[answer], answer)
    if not any(m["role"] == "assistant" for m in completion):
        raise RecordError(f'no assistant turn to train on (the "{answer}" holds no assistant message)')
    return _chat("chat_prompt_completion", prompt + completion, [False] * len(prompt) + train, _tools(r))


def _alpaca(r: dict) -> Record:
    instruction, output = _str(r, "instruction"), _str(r, "output")
    query, system, history = _str(r, "input", ""), _str(r, "system", ""), r.get("history", [])
    if not output.strip():
        raise RecordError('"output" is empty')
    if not isinstance(history, list):
        raise RecordError(f'"history" must be a list of [instruction, response] pairs, got {_tname(history)}')
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise RecordError(f"history[{i}] must be an [instruction, response] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = instruction + ("\n\n" + query if query.strip() else "")
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Record("alpaca", messages=messages, train=[False] * (len(messages) - 1) + [True])


def _sharegpt(r: dict, key: str) -> Record:
    items = r[key]
    if not isinstance(items, list) or not items:
        raise RecordError(f'"{key}" must be a non-empty list')
    system = _str(r, "system", "")
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for i, m in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(f"{where} must be an object, got {_tname(m)}")
        who, value = m.get("from", m.get("role")), m.get("value", m.get("content"))
        if who is None:
            raise RecordError(f'{where} has no "from"')
        if not isinstance(who, str) or who not in SHAREGPT_ROLES:
            raise RecordError(f"{where} has unknown role {who!r} (expected one of {', '.join(SHAREGPT_ROLES)})")
        if not isinstance(value, str):
            raise RecordError(f"{where}.value must be a string, got {_tname(value)}")
        messages.append(_function_call(value, where) if who == "function_call"
                        else {"role": SHAREGPT_ROLES[who], "content": value})
    return _chat("sharegpt", messages, [m["role"] == "assistant" for m in messages], _tools(r))


# ---------------------------------------------------------------- chat pieces

def _chat(kind: str, messages: list[dict], train: list[bool], tools: list[dict] | None) -> Record:
    trained = [m for m, t in zip(messages, train) if t]
    if not trained:
        why = "every assistant message has weight 0" if any(m["role"] == "assistant" for m in messages) \
            else "the conversation has no assistant message"
        raise RecordError(f"no assistant turn to train on ({why})")
    if not any(m["content"].strip() or m.get("tool_calls") for m in trained):
        raise RecordError("no assistant turn to train on (every trained assistant message is empty)")
    return Record(kind, messages=messages, train=train, tools=tools)


def _message_list(items, key: str) -> tuple[list[dict], list[bool]]:
    if not isinstance(items, list) or not items:
        raise RecordError(f'"{key}" must be a non-empty list')
    pairs = [_message(m, f"{key}[{i}]") for i, m in enumerate(items)]
    return [m for m, _ in pairs], [t for _, t in pairs]


def _message(m, where: str) -> tuple[dict, bool]:
    """One OpenAI message -> (template message, carries loss). Unknown keys (refusal, audio, ...) are dropped."""
    if type(m) is dict and len(m) == 2 and type(m.get("content")) is str and m.get("role") in ROLES:
        return m, m["role"] == "assistant"  # the plain message most files hold, already as templates want it
    if not isinstance(m, dict):
        raise RecordError(f"{where} must be an object, got {_tname(m)}")
    if "role" not in m:
        raise RecordError(f'{where} has no "role"')
    role = "tool" if m["role"] == "function" else m["role"]  # legacy function results are tool results
    if role not in ROLES:
        raise RecordError(f"{where} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
    calls = _tool_calls(m, where) if role == "assistant" else []
    if "content" not in m and not calls:
        raise RecordError(f'{where} has no "content"')
    # An assistant turn that only calls tools has no content.
    out = {"role": role, "content": "" if m.get("content") is None and calls else _content(m["content"], where)}
    if calls:
        out["tool_calls"] = calls
    for k in ("tool_call_id", "name"):
        if m.get(k) is not None:
            if not isinstance(m[k], str):
                raise RecordError(f"{where}.{k} must be a string, got {_tname(m[k])}")
            out[k] = m[k]
    weight = 1 if m.get("weight") is None else m["weight"]
    if isinstance(weight, bool) or weight not in (0, 1):
        raise RecordError(f"{where}.weight must be 0 or 1, got {weight!r}")
    return out, role == "assistant" and weight == 1


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError(f"{where}.content must be a string or a list of text parts, got {_tname(content)}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            raise RecordError(f"{where} has a {kind} part: {TEXT_ONLY}")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RecordError(f'{where}.content[{j}] must be a part {{"type": "text", "text": "..."}}, '
                              f"got {json.dumps(part, default=str)[:80]}")
        texts.append(part["text"])
    return "".join(texts)


def _tool_calls(m: dict, where: str) -> list[dict]:
    calls = m.get("tool_calls")
    if calls is None and m.get("function_call") is not None:
        calls = [{"type": "function", "function": m["function_call"]}]  # legacy single call
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise RecordError(f"{where}.tool_calls must be a list, got {_tname(calls)}")
    return [_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]


def _call(c, where: str) -> dict:
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


def _function_call(value: str, where: str) -> dict:
    """A ShareGPT function_call turn: structured tool call(s) when its value is JSON, else plain assistant text."""
    calls = _json(value)
    calls = calls if isinstance(calls, list) else [calls]
    if calls and all(isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c for c in calls):
        return {"role": "assistant", "content": "",
                "tool_calls": [_call({"function": c}, f"{where}[{j}]") for j, c in enumerate(calls)]}
    return {"role": "assistant", "content": value}


def _tools(r: dict) -> list[dict] | None:
    tools, functions = r.get("tools", []), r.get("functions", [])
    if isinstance(tools, str):  # LLaMA-Factory files and many Parquet exports hold the schemas as a JSON string
        tools = _json(tools) if tools.strip() else []
        if tools is None:
            raise RecordError('"tools" is a string but not valid JSON')
    for key, value in (("tools", tools), ("functions", functions)):
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            got = "a list holding other values" if isinstance(value, list) else _tname(value)
            raise RecordError(f'"{key}" must be a list of objects, got {got}')
    # Bare function schemas (LLaMA-Factory, legacy "functions") get the OpenAI wrapper templates expect.
    out = [t if "function" in t else {"type": "function", "function": t} for t in tools]
    return out + [{"type": "function", "function": f} for f in functions] or None


def _placeholder(value, where: str) -> tuple[str, str] | None:
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
    return next((found for w, v in items if (found := _placeholder(v, w))), None)


def _str(r: dict, key: str, default: str | None = None) -> str:
    value = r.get(key, default)
    if not isinstance(value, str):
        raise RecordError(f'"{key}" must be a string, got {_tname(value)}')
    return value


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _tname(value) -> str:
    return "null" if value is None else type(value).__name__
