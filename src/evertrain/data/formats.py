"""Dataset shapes -> one normalized Record per example.

Each record (a JSONL line, a JSON array item, a Parquet or CSV row) is detected on its own. When several shapes
fit, the first one below wins; keys the chosen shape does not use are listed in Record.ignored, never fatal.

  {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}     OpenAI chat
  {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}        ShareGPT
  {"instruction": "Translate to French", "input": "cat", "output": "chat"}                         Alpaca
  {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hey"}]}  TRL chat
  {"prompt": "2+2=", "completion": "4"}                            ("response" works too)          prompt/completion
  {"text": "Once upon a time"}                                                                     text
  {"prompt": "2+2=", "chosen": "4", "rejected": "5"}       and the other shapes of judgments.py    a preference pair
  {"prompt": "2+2=", "completion": "5", "label": false}    and the other shapes of judgments.py    rated feedback

Loss: text trains every token; prompt/completion the completion only; the chat shapes every assistant turn, except
OpenAI turns with "weight": 0, Alpaca "history" and the assistant turns inside a TRL prompt (context only).
Preference pairs (chosen/rejected) and rated answers (a true/false "label") teach by judgment (judgments.py: the
preference and feedback objectives). Multimodal records (media parts, "images"/"videos"/"audios" lists,
<image>/<video>/<audio> placeholders) are refused with the reason. A column mapping renames a
dataset's own fields first (config.parse_columns("question=prompt,answer=completion")); columns.py suggests one for a
record that fits no shape.

    evertrain check FILE          # check a file and print what would be trained
"""

from __future__ import annotations

from evertrain.data import judgments
from evertrain.data.record import (CHAT_KEYS, alpaca_prompt, PLACEHOLDER, TEXT_ONLY, FitsNoFormat, Record, RecordError,  # noqa: F401
                                   chat, message_list, placeholder, sharegpt_messages, string, tname, tools_of)

MEDIA_KEYS = ("images", "videos", "audios")  # LLaMA-Factory's multimodal files: the media beside the text
EXPECTED = ("expected text, prompt+completion (or response), messages, conversations (ShareGPT), "
            "instruction+output (Alpaca), or prompt+completion as message lists; or, to learn by judgment, "
            "chosen+rejected answers (a preference pair) or an answer with a true/false label")


def label(record: Record) -> str:
    """What tells a record apart from its neighbours: its last user turn (never a system prompt that every
    record shares), else its prompt, else its text."""
    if record.sides is not None:
        return label(record.sides[0])
    if record.messages:
        said = [m["content"] for m in record.messages if m["role"] == "user" and (m.get("content") or "").strip()]
        return said[-1] if said else next((m["content"] for m in record.messages
                                           if m["role"] != "system" and (m.get("content") or "").strip()), "")
    return record.prompt if (record.prompt or "").strip() else record.text or record.completion or ""


def parse_record(obj, columns: dict[str, str] | None = None) -> Record:
    """One decoded record -> Record, or RecordError with a one-line reason."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {tname(obj)}")
    r, origin, displaced = _rename(obj, columns or {})
    for key in MEDIA_KEYS:
        if r.get(key) not in (None, [], "", {}):  # an empty list is what mixed files give their text-only records
            raise RecordError(f'"{key}" lists media for this record: {TEXT_ONLY}')
    record, used = _detect(r)
    if record is None:
        nulls = sorted(k for k, v in obj.items() if v is None)
        raise FitsNoFormat(f"fits no format (keys: {sorted(origin.values())}"
                           + (f", null: {nulls}" if nulls else "") + f"); {EXPECTED}")
    if record.kind != "text":
        # Not in plain text: HTML and XML corpora hold <audio> and <video> tags that are just text.
        for key in used:
            if key in r and key not in CHAT_KEYS and (found := placeholder(r[key], origin[key])):
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
    # A conversation wins over chosen/rejected beside it (UltraFeedback's files hold both: its "messages" is the
    # chosen conversation), unless those are LLaMA-Factory's answers to that conversation.
    conversation = ("messages" in r or "conversations" in r) and not judgments.answers_a_conversation(r)
    judged = judgments.detect(r, conversation)
    if judged is not None:
        return judged
    if "messages" in r:
        if isinstance(r["messages"], list) and any(isinstance(m, dict) and "from" in m for m in r["messages"]):
            return _sharegpt(r, "messages"), ("messages", "system") + CHAT_KEYS
        return _openai(r), ("messages",) + CHAT_KEYS
    if "conversations" in r:
        return _sharegpt(r, "conversations"), ("conversations", "system") + CHAT_KEYS
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
    text = string(r, "text")
    if not text.strip():
        raise RecordError('"text" is empty')
    return Record("text", text=text)


def _prompt_completion(r: dict, answer: str) -> Record:
    prompt, completion = string(r, "prompt"), string(r, answer)
    if not completion.strip():
        raise RecordError(f'"{answer}" is empty')
    return Record("prompt_completion", prompt=prompt, completion=completion)


def _openai(r: dict) -> Record:
    messages, train = message_list(r["messages"], "messages")
    return chat("messages", messages, train, tools_of(r))


def _chat_prompt_completion(r: dict, answer: str) -> Record:
    if not isinstance(r["prompt"], list):
        raise RecordError(f'"prompt" must be a list of messages when "{answer}" is one, got {tname(r["prompt"])}')
    prompt, _ = message_list(r["prompt"], "prompt")
    completion, train = message_list(r[answer], answer)
    if not any(m["role"] == "assistant" for m in completion):
        raise RecordError(f'no assistant turn to train on (the "{answer}" holds no assistant message)')
    return chat("chat_prompt_completion", prompt + completion, [False] * len(prompt) + train, tools_of(r))


def _alpaca(r: dict) -> Record:
    output = string(r, "output")
    if not output.strip():
        raise RecordError('"output" is empty')
    messages = alpaca_prompt(r) + [{"role": "assistant", "content": output}]
    return Record("alpaca", messages=messages, train=[False] * (len(messages) - 1) + [True])


def _sharegpt(r: dict, key: str) -> Record:
    messages = sharegpt_messages(r[key], key, string(r, "system", ""))
    return chat("sharegpt", messages, [m["role"] == "assistant" for m in messages], tools_of(r))
