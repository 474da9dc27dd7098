"""Records -> token ids and loss masks, a batch at a time through the fast tokenizer.

A conversation is rendered once with the chat template; the characters each trained assistant turn adds are
found in that one rendering (its content, preceded by the template's generation prompt and followed by the
template's end of turn), then the whole text is tokenized in one batched call and the spans become token
ranges. Conversations the fast path cannot place (a template that rewrites content, tool calls) fall back to
rendering each prefix, which any incremental template supports. The loss mask is 1 where a token is trained.

    python -m evertrain.data FILE --model DIR     # prints the first example with its trained tokens marked
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evertrain.data.formats import Record

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>\n' + (call['function'] | tojson) + '\n</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PROBE_USER, PROBE_ANSWER = "\ue000probe-user\ue000", "\ue000probe-answer\ue000"


class NoChatTemplate(ValueError):
    pass


def apply_chat_template_option(tokenizer, option: str) -> None:
    """--chat-template: "" keeps the model's own, "chatml" is built in, anything else is a .jinja file."""
    if not option:
        return
    if option == "chatml":
        tokenizer.chat_template = CHATML
        return
    path = Path(option)
    if not path.is_file():
        from evertrain.config import ConfigError

        raise ConfigError(f"chat_template: {option}: no such file (give chatml or a .jinja file)")
    tokenizer.chat_template = path.read_text(encoding="utf-8")


@dataclass
class Encoded:
    """One batch: the examples' tokens end to end, with per-example lengths."""
    ids: np.ndarray        # int32
    mask: np.ndarray       # uint8, 1 = trained
    lengths: np.ndarray    # int64
    truncated: np.ndarray  # bool


class Renderer:
    def __init__(self, tokenizer, max_length: int):
        self.tok, self.max_length = tokenizer, max_length
        self.eos = tokenizer.eos_token_id
        self.template = None
        if tokenizer.chat_template:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self.template = _compile_jinja_template(tokenizer.chat_template)
            self.kwargs = dict(tokenizer.special_tokens_map)
            probe = [{"role": "user", "content": PROBE_USER}]
            asked = self._render(probe, add_generation_prompt=True)
            self.generation_prompt = asked[len(self._render(probe)):] if asked.startswith(self._render(probe)) else ""
            answered = self._render(probe + [{"role": "assistant", "content": PROBE_ANSWER}])
            self.end_of_turn = answered.split(PROBE_ANSWER, 1)[1] if PROBE_ANSWER in answered else ""

    def _render(self, messages, *, tools=None, add_generation_prompt=False) -> str:
        return self.template.render(messages=messages, tools=tools, documents=None,
                                    add_generation_prompt=add_generation_prompt, **self.kwargs)

    def encode(self, records: list[Record]) -> Encoded:
        """Tokenize a batch; raises ValueError naming the record's position in the batch on a template failure."""
        firsts, seconds, chats, chat_spans = [], [], [], []
        for k, rec in enumerate(records):
            if rec.messages is not None:
                if self.template is None:
                    raise NoChatTemplate("the model's tokenizer has no chat template, so conversations cannot be "
                                         "rendered; pass --chat-template chatml (or --chat-template FILE.jinja)")
                try:
                    text, spans = self.conversation(rec)
                except Exception as e:  # a template's own error (raise_exception) or a missing field
                    raise RecordFailed(k, f"the chat template failed: {e}") from e
                chats.append(text)
                chat_spans.append(spans)
            elif rec.text is not None:
                firsts.append(rec.text)
            else:
                firsts.append(rec.prompt)
                seconds.append(rec.completion)
        tok = self.tok
        first_ids = tok(firsts, add_special_tokens=True)["input_ids"] if firsts else []
        second_ids = tok(seconds, add_special_tokens=False)["input_ids"] if seconds else []
        chat_enc = tok(chats, add_special_tokens=False) if chats else None
        ids_out, mask_out = [], []
        fi = si = ci = 0
        for rec in records:
            if rec.messages is not None:
                ids = chat_enc["input_ids"][ci]
                mask = _span_mask(chat_enc, ci, len(ids), chat_spans[ci], len(chats[ci]))
                ci += 1
            elif rec.text is not None:
                ids = first_ids[fi]
                fi += 1
                if not ids or ids[-1] != self.eos:
                    ids = ids + [self.eos]
                mask = np.ones(len(ids), dtype=np.uint8)
            else:
                p = first_ids[fi] if rec.prompt else []
                c = second_ids[si] + [self.eos]
                fi, si = fi + 1, si + 1
                ids = p + c
                mask = np.concatenate([np.zeros(len(p), np.uint8), np.ones(len(c), np.uint8)])
            mask[0] = 0  # the first token has no prediction; this also keeps packed examples' losses apart
            ids_out.append(ids)
            mask_out.append(mask)
        lengths = np.fromiter((len(x) for x in ids_out), dtype=np.int64, count=len(ids_out))
        truncated = lengths > self.max_length
        if truncated.any():
            ids_out = [x[:self.max_length] for x in ids_out]
            mask_out = [m[:self.max_length] for m in mask_out]
            lengths = np.minimum(lengths, self.max_length)
        flat = np.fromiter((t for x in ids_out for t in x), dtype=np.int32, count=int(lengths.sum()))
        return Encoded(flat, np.concatenate(mask_out) if mask_out else np.zeros(0, np.uint8), lengths, truncated)

    def conversation(self, rec: Record) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of its trained assistant turns."""
        messages = [_template_message(m) for m in rec.messages]
        full = self._render(messages, tools=rec.tools)
        spans = self._find_spans(full, messages, rec.train)
        if spans is None:
            spans = self._spans_by_prefix(full, messages, rec.train, rec.tools)
        return full, spans

    def _find_spans(self, full: str, messages, train) -> list[tuple[int, int]] | None:
        """One pass over the rendering: each trained answer sits right after the generation prompt."""
        spans, pos, gen, eot = [], 0, self.generation_prompt, self.end_of_turn
        for m, trained in zip(messages, train):
            content = m.get("content")
            if m["role"] != "assistant" or not content or m.get("tool_calls"):
                if trained:
                    return None
                continue
            at = full.find(content, pos)
            while at >= 0 and not full.startswith(gen, at - len(gen)):
                at = full.find(content, at + 1)
            if at < 0 or not gen:
                return None
            end = at + len(content)
            if eot and full.startswith(eot, end):
                end += len(eot)
            if trained:
                spans.append((at, end))
            pos = end
        return spans

    def _spans_by_prefix(self, full: str, messages, train, tools) -> list[tuple[int, int]]:
        spans = []
        for i, (m, trained) in enumerate(zip(messages, train)):
            if not trained:
                continue
            before = self._render(messages[:i], tools=tools, add_generation_prompt=True) if i else ""
            upto = self._render(messages[:i + 1], tools=tools)
            if not (full.startswith(upto) and upto.startswith(before)):
                raise ValueError("the chat template does not render conversations incrementally; "
                                 "cannot tell which tokens are the assistant's")
            spans.append((len(before), len(upto)))
        return spans


class RecordFailed(ValueError):
    def __init__(self, index: int, reason: str):
        self.index = index
        super().__init__(reason)


def _template_message(m: dict) -> dict:
    """Tool-call arguments as the templates expect them: an object, not the JSON string OpenAI files hold."""
    if not m.get("tool_calls"):
        return m
    calls = []
    for call in m["tool_calls"]:
        fn = dict(call.get("function", {}))
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except ValueError:
                pass
        calls.append({**call, "function": fn})
    return {**m, "tool_calls": calls}


def _span_mask(enc, b: int, n: int, spans: list[tuple[int, int]], text_len: int) -> np.ndarray:
    """Tokens whose first character lies inside a span are trained (the same rule for every tokenizer)."""
    mask = np.zeros(n, dtype=np.uint8)
    for a, z in spans:
        mask[_first_token_at(enc, b, n, a, text_len):_first_token_at(enc, b, n, z, text_len)] = 1
    return mask


def _first_token_at(enc, b: int, n: int, char: int, text_len: int) -> int:
    """Index of the first token that starts at or after `char`."""
    while char < text_len:
        t = enc.char_to_token(b, char)
        if t is not None:
            return t + 1 if enc.token_to_chars(b, t).start < char else t
        char += 1
    return n
