"""Records that teach by judgment rather than by example: preference pairs (two answers to one prompt, one of them
preferred: the preference objective, DPO) and rated answers (one answer rated good or bad: the feedback objective,
KTO). Each file teaches one way: a file mixing these with plain examples is refused (data/prepare.py).

  {"prompt": "2+2=", "chosen": "4", "rejected": "5"}                                         TRL preference
  {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}   TRL, chat
  {"chosen": [user, assistant], "rejected": [user, assistant]}        TRL, implicit prompt (their shared turns)
  {"conversations": [...], "chosen": {"from": "gpt", "value": "..."}, "rejected": {...}}    LLaMA-Factory ShareGPT
  {"instruction": "...", "input": "...", "chosen": "...", "rejected": "..."}                LLaMA-Factory Alpaca
  {"prompt": "2+2=", "completion": "5", "label": false}                                     TRL feedback (KTO)
  {"prompt": [...], "completion": [...], "label": true}                                     TRL feedback, chat
  {"messages": [..., {"role": "assistant", ...}], "label": false}                           LLaMA-Factory KTO
  ({"conversations": [...], "label": ...} and {"instruction": ..., "output": ..., "label": ...} too)

A pair becomes a Record with two `sides`, each a supervised record of the prompt and one answer in which only the
answer trains; a rated answer becomes a supervised record with `desirable` (in a conversation, its last assistant
turn is the rated answer: the turns before it are its prompt). The --columns mapping applies as to any shape.

    evertrain check PAIRS.jsonl          # a pair, each answer's trained tokens marked
"""

from __future__ import annotations

from evertrain.data.record import (CHAT_KEYS, FEEDBACK, PREFERENCE, Record, RecordError, alpaca_prompt, chat,
                                   message_list, sharegpt_messages, string, tname, tools_of)

BOOLEAN_WORDS = {"true", "false", "yes", "no", "0", "1", "good", "bad"}  # a label spelled as other than a boolean


def answers_a_conversation(r: dict) -> bool:
    """LLaMA-Factory's preference shape: a ShareGPT conversation and the two answers to it, each one turn."""
    return "conversations" in r and isinstance(r.get("chosen"), (dict, str))


def detect(r: dict, conversation: bool = False) -> tuple[Record, tuple[str, ...]] | None:
    """The judgment `r` holds, with the keys it used; None when it is a plain example. `conversation`: `r` holds
    a conversation to train as it is, unless a true/false "label" rates it (chosen/rejected beside it are not
    taken then: UltraFeedback's files hold both)."""
    if conversation:
        return _feedback(r) if isinstance(r.get("label"), bool) else None
    if "chosen" in r and "rejected" in r:  # one alone is another dataset's column (or mapped onto an answer)
        return _pair(r)
    if "label" in r:
        if isinstance(r["label"], bool):
            return _feedback(r)
        if _answers(r) and str(r["label"]).strip().lower() in BOOLEAN_WORDS:
            raise RecordError(f'"label" rates the answer: it must be true or false (a JSON boolean), got '
                              f'{r["label"]!r}')
    return None


# ---------------------------------------------------------------- preference pairs

def _pair(r: dict) -> tuple[Record, tuple[str, ...]]:
    chosen, rejected = r["chosen"], r["rejected"]
    if "conversations" in r:  # LLaMA-Factory: the conversation, then each answer as one ShareGPT turn
        prompt = sharegpt_messages(r["conversations"], "conversations", string(r, "system", ""))
        answers = [[_sharegpt_answer(a, key)] for a, key in ((chosen, "chosen"), (rejected, "rejected"))]
        return _chat_pair("sharegpt_preference", prompt, answers, tools_of(r)), (
            "conversations", "chosen", "rejected", "system") + CHAT_KEYS
    if "instruction" in r:  # LLaMA-Factory's Alpaca shape
        answers = [[{"role": "assistant", "content": _answer_text(a, key)}]
                   for a, key in ((chosen, "chosen"), (rejected, "rejected"))]
        return _chat_pair("alpaca_preference", alpaca_prompt(r), answers, None), (
            "instruction", "input", "system", "history", "chosen", "rejected")
    if "prompt" in r and isinstance(r["prompt"], str) and isinstance(chosen, list) and isinstance(rejected, list):
        # UltraFeedback's pairs: the prompt as text, and each answer as the whole conversation that begins with it
        return _implicit(r), ("prompt", "chosen", "rejected") + CHAT_KEYS
    if "prompt" in r and isinstance(r["prompt"], str):
        c, j = _answer_text(chosen, "chosen"), _answer_text(rejected, "rejected")
        if c == j:
            raise RecordError("chosen and rejected are the same answer: a pair teaches nothing without a choice")
        sides = tuple(Record("prompt_completion", prompt=r["prompt"], completion=a) for a in (c, j))
        return Record("preference", objective=PREFERENCE, sides=sides), ("prompt", "chosen", "rejected")
    if "prompt" in r:
        if not isinstance(r["prompt"], list):
            raise RecordError(f'"prompt" must be a string or a list of messages, got {tname(r["prompt"])}')
        prompt, _ = message_list(r["prompt"], "prompt")
        answers = [message_list(_messages(a, key), key)[0] for a, key in ((chosen, "chosen"), (rejected, "rejected"))]
        return _chat_pair("chat_preference", prompt, answers, tools_of(r)), (
            "prompt", "chosen", "rejected") + CHAT_KEYS
    return _implicit(r), ("chosen", "rejected") + CHAT_KEYS


def _implicit(r: dict) -> Record:
    """Two conversations with the same first turns: those turns are the prompt, the rest each answer."""
    if not (isinstance(r["chosen"], list) and isinstance(r["rejected"], list)):
        raise RecordError('"chosen" and "rejected" without a "prompt" must be conversations (lists of messages) '
                          'that share their first turns; give the prompt as "prompt" otherwise')
    chosen, _ = message_list(r["chosen"], "chosen")
    rejected, _ = message_list(r["rejected"], "rejected")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0:
        raise RecordError("chosen and rejected share no prompt: their first turns differ (give it as \"prompt\")")
    return _chat_pair("chat_preference", chosen[:k], [chosen[k:], rejected[k:]], tools_of(r))


def _chat_pair(kind: str, prompt: list[dict], answers: list[list[dict]], tools) -> Record:
    """A pair of conversations: the shared `prompt`, then each answer; only the answers' assistant turns train."""
    for answer, key in zip(answers, ("chosen", "rejected")):
        if not answer:
            raise RecordError(f'"{key}" has no answer after the prompt' if any(answers)
                              else "chosen and rejected are the same answer: a pair teaches nothing without a choice")
        if other := next((m for m in answer if m["role"] in ("user", "system")), None):
            raise RecordError(f"chosen and rejected differ before their answers: the {key} side has a {other['role']} "
                              "turn after where they part (the prompt must be the same for both)")
    if answers[0] == answers[1]:
        raise RecordError("chosen and rejected are the same answer: a pair teaches nothing without a choice")
    sides = tuple(chat(kind, prompt + answer, [False] * len(prompt) + [m["role"] == "assistant" for m in answer],
                       tools) for answer in answers)
    return Record(kind, objective=PREFERENCE, sides=sides, tools=tools)


def _sharegpt_answer(value, key: str) -> dict:
    if isinstance(value, str):
        return {"role": "assistant", "content": _answer_text(value, key)}
    if not isinstance(value, dict):
        raise RecordError(f'"{key}" must be a ShareGPT turn {{"from": "gpt", "value": "..."}}, got {tname(value)}')
    turn = sharegpt_messages([value], key)[0]
    if turn["role"] != "assistant":
        raise RecordError(f'"{key}" must be the assistant\'s turn ("from": "gpt"), got {value.get("from")!r}')
    _answer_text(turn["content"], key)
    return turn


def _answer_text(value, key: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f'"{key}" must be a string (the answer), got {tname(value)}')
    if not value.strip():
        raise RecordError(f'"{key}" is empty')
    return value


def _messages(value, key: str):
    if not isinstance(value, list):
        raise RecordError(f'"{key}" must be a list of messages when "prompt" is one, got {tname(value)}')
    return value


# ---------------------------------------------------------------- rated answers

def _answers(r: dict) -> bool:
    """Whether `r` holds an answer a label could rate."""
    return any(k in r for k in ("completion", "response", "messages", "conversations", "output"))


def _feedback(r: dict) -> tuple[Record, tuple[str, ...]]:
    answer = "completion" if "completion" in r else "response" if "response" in r else None
    if "prompt" in r and answer:
        if isinstance(r[answer], list):
            if not isinstance(r["prompt"], list):
                raise RecordError(f'"prompt" must be a list of messages when "{answer}" is one, got '
                                  f'{tname(r["prompt"])}')
            prompt, _ = message_list(r["prompt"], "prompt")
            completion, train = message_list(r[answer], answer)
            record = chat("chat_feedback", prompt + completion, [False] * len(prompt) + train, tools_of(r))
            used = ("prompt", answer, "label") + CHAT_KEYS
        else:
            record = Record("feedback", prompt=string(r, "prompt"), completion=_answer_text(r[answer], answer))
            used = ("prompt", answer, "label")
    elif "messages" in r or "conversations" in r:
        key = "messages" if "messages" in r else "conversations"
        sharegpt = key == "conversations" or any(isinstance(m, dict) and "from" in m for m in r[key] or [])
        messages = (sharegpt_messages(r[key], key, string(r, "system", "")) if sharegpt
                    else message_list(r[key], key)[0])
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise RecordError(f'"{key}" has no assistant turn for "label" to rate')
        # The rated answer is the last assistant turn; the turns before it are what it answered.
        record = chat(f"{'sharegpt' if sharegpt else 'messages'}_feedback", messages[:last + 1],
                      [i == last for i in range(last + 1)], tools_of(r))
        used = (key, "label", "system") + CHAT_KEYS
    elif "instruction" in r and "output" in r:
        messages = alpaca_prompt(r) + [{"role": "assistant", "content": _answer_text(r["output"], "output")}]
        record = Record("alpaca_feedback", messages=messages, train=[False] * (len(messages) - 1) + [True])
        used = ("instruction", "input", "output", "system", "history", "label")
    else:
        raise RecordError('"label" rates an answer: give it with "prompt" and "completion" (or "messages")')
    record.objective, record.desirable = FEEDBACK, r["label"]
    return record, used
