"""Records -> token ids and loss masks, a batch at a time through the fast tokenizer.

A conversation is rendered once with the chat template; the characters each trained assistant turn adds are
found in that one rendering (its content, preceded by the template's generation prompt and followed by the
template's end of turn), then the whole text is tokenized in one batched call and the spans become token
ranges. Conversations the fast path cannot place (a template that rewrites content, tool calls) fall back to
rendering each prefix, which any incremental template supports. The loss mask is 1 where a token is trained.
A text longer than max_length tokens is split into windows (Renderer.window_overlap set: long_text = window),
each an example of its own: window 0 holds tokens [0, max_length); each later one starts with the last
window_overlap + 1 tokens of the one before as context (no loss: a row's first token is never a target) and goes on
with new tokens, so every token of the text but its first is trained exactly once, and the last window ends with
EOS. Such a text is tokenized whole, in pieces of PIECE_CHARS at most. Everything else (and every text, with
long_text = truncate) is truncated to max_length, and the tokenizer never sees more than CHARS_PER_TOKEN x
max_length characters of it: a longer one is cut first (and counted as truncated), since tokenizing a 60 MB text
whole costs gigabytes for tokens that are dropped.

    evertrain check FILE --model DIR     # prints the first example with its trained tokens marked
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evertrain.config import ConfigError
from evertrain.data.formats import Record

CHATML = (
    "{% if tools %}{{ '<|im_start|>system\nYou can call these tools:\n<tools>\n' }}{% for tool in tools %}"
    "{{ (tool['function'] if tool.get('function') else tool) | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '</tools><|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>\n' + (call['function'] | tojson) + '\n</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PROBE_USER, PROBE_ANSWER = "\ue000probe-user\ue000", "\ue000probe-answer\ue000"
CHARS_PER_TOKEN = 32  # generous: tokenizers average 3-5 characters per token, long whitespace runs about 16
PIECE_CHARS = 1 << 16  # a windowed text longer than this is tokenized in pieces: memory stays that of its tokens


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
        raise ConfigError(f"chat_template: {option}: no such file (give chatml or a .jinja file)")
    tokenizer.chat_template = path.read_text(encoding="utf-8")


@dataclass
class Encoded:
    """One batch: the examples' tokens end to end, with per-example lengths."""
    ids: np.ndarray        # int32
    mask: np.ndarray       # uint8, 1 = trained
    lengths: np.ndarray    # int64
    truncated: np.ndarray  # bool
    owners: np.ndarray     # int64: the batch's record each example comes from (several for a windowed text)
    parts: np.ndarray      # int64: the example's window of its text, -1 for a whole example
    splits: np.ndarray     # int64: a preference pair's chosen length (its rejected sequence follows); 0 otherwise


@dataclass
class Rendered:
    records: list[Record]                   # the records to tokenize: a preference pair's two sides in its place
    firsts: list[str]                       # texts, and prompts: tokenized with the special tokens
    seconds: list[str]                      # completions
    chats: list[str]                        # rendered conversations
    chat_spans: list[list[tuple[int, int]]]  # their trained character spans
    cut: list[bool] = field(default_factory=list)  # per record: its text was cut to max_chars (empty: none was)
    long: dict[int, str] = field(default_factory=dict)  # record position -> a text to tokenize in pieces
    owners: list[int] = field(default_factory=list)  # per record here: the batch's record it is (or a side of);
    #                                                  empty: each is its own
    paired: set[int] = field(default_factory=set)    # the batch's records that are preference pairs


class Renderer:
    def __init__(self, tokenizer, max_length: int, *, window_overlap: int | None = None,
                 max_text_chars: int | None = None):
        """`window_overlap` None: long texts are truncated; else they are windowed with that overlap, and a text
        over `max_text_chars` characters is refused (what one record may cost on disk stays bounded)."""
        self.tok, self.max_length = tokenizer, max_length
        self.window_overlap, self.max_text_chars = window_overlap, max_text_chars
        self.max_chars = CHARS_PER_TOKEN * max_length
        self.eos = tokenizer.eos_token_id
        self.specials = _special_tokens(tokenizer)
        self.unrendered_tool_calls = 0  # conversations whose tool calls the template leaves out of the text
        self.template = None
        if tokenizer.chat_template:
            self.template = _compile(tokenizer.chat_template)
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
        return self.tokenize(self.render(records))

    def render(self, records: list[Record]) -> Rendered:
        """The texts to tokenize (Python work); raises RecordFailed naming the record on a template failure. A
        preference pair is rendered as its two sides, each as a supervised record of its own."""
        firsts, seconds, chats, chat_spans, cut, long = [], [], [], [], [], {}
        m = self.max_chars
        sides = [(k, side) for k, rec in enumerate(records) for side in (rec.sides or (rec,))]
        for i, (k, rec) in enumerate(sides):
            if rec.messages is not None:
                if self.template is None:
                    raise NoChatTemplate("the model's tokenizer has no chat template, so conversations cannot be "
                                         "rendered; pass --chat-template chatml (or --chat-template FILE.jinja)")
                try:
                    text, spans = self.conversation(rec)
                except Exception as e:  # a template's own error (raise_exception) or a missing field
                    raise RecordFailed(k, f"the chat template failed: {e}") from e
                chats.append(text[:m])
                chat_spans.append(spans)   # a span past the cut ends up at the last token
                cut.append(len(text) > m)
                if any(call["function"]["name"] not in text for msg in rec.messages
                       for call in msg.get("tool_calls", ())):
                    self.unrendered_tool_calls += 1
            elif rec.text is not None and self.window_overlap is not None:
                if self.max_text_chars is not None and len(rec.text) > self.max_text_chars:
                    raise RecordFailed(k, f"the text is {len(rec.text):,} characters, over max_line_bytes "
                                          f"({self.max_text_chars:,}): split it, or raise --max-line-bytes")
                if len(rec.text) > PIECE_CHARS:
                    long[i] = rec.text
                else:
                    firsts.append(rec.text)
                cut.append(False)
            elif rec.text is not None:
                firsts.append(rec.text[:m])
                cut.append(len(rec.text) > m)
            else:
                # a prompt longer than the cut leaves no room for the completion, as truncation would
                firsts.append(rec.prompt[:m])
                seconds.append(rec.completion[:m] if len(rec.prompt) <= m else "")
                cut.append(len(rec.prompt) + len(rec.completion) > m)
        return Rendered([rec for _k, rec in sides], firsts, seconds, chats, chat_spans, cut, long,
                        [k for k, _rec in sides], {k for k, rec in enumerate(records) if rec.sides})

    def tokenize(self, rendered: Rendered) -> Encoded:
        """Tokens and loss masks of a rendered batch (mostly the Rust tokenizer, which releases the GIL)."""
        records, firsts, seconds, chats, chat_spans, cut = (rendered.records, rendered.firsts, rendered.seconds,
                                                            rendered.chats, rendered.chat_spans,
                                                            rendered.cut or [False] * len(rendered.records))
        backend = self.tok.backend_tokenizer  # the Rust tokenizer: batches run on its own threads
        first = backend.encode_batch(firsts, add_special_tokens=True) if firsts else []
        second = backend.encode_batch(seconds, add_special_tokens=False) if seconds else []
        chat = backend.encode_batch(chats, add_special_tokens=False) if chats else []
        # per example: its token ids, the [a, b) token ranges that carry loss, its record and its window (-1: whole)
        pieces, trained, owners, parts, flats = [], [], [], [], []

        def add(ids, ranges, k: int, part: int = -1) -> None:
            pieces.append(ids)
            trained.append(ranges)
            owners.append(k)
            parts.append(part)
            flats.append(i)  # the rendered record it comes from (a pair's side, a windowed text)

        fi = si = ci = 0
        for i, (k, rec, was_cut) in enumerate(zip(rendered.owners or range(len(records)), records, cut)):
            eos = [] if was_cut else [self.eos]   # a cut text does not end where it ends now
            if rec.messages is not None:
                enc = chat[ci]
                add(enc.ids, [(_first_token_at(enc, a, len(chats[ci])), _first_token_at(enc, z, len(chats[ci])))
                              for a, z in chat_spans[ci]], k)
                ci += 1
            elif rec.text is not None:
                if i in rendered.long:
                    ids = self._tokenize_long(rendered.long[i])
                else:
                    ids = first[fi].ids
                    fi += 1
                    if not ids or ids[-1] != self.eos:
                        ids = ids + eos
                if self.window_overlap is not None and len(ids) > self.max_length:
                    for part, (window, context) in enumerate(windows(ids, self.max_length, self.window_overlap)):
                        add(window, [(context, len(window))], k, part)
                else:
                    add(ids, [(0, len(ids))], k)
            else:
                p = first[fi].ids if rec.prompt else []
                c = second[si].ids + eos
                fi, si = fi + 1, si + 1
                add(p + c, [(len(p), len(p) + len(c))], k)
        lengths = np.fromiter((len(x) for x in pieces), dtype=np.int64, count=len(pieces))
        owners_ = np.array(owners, dtype=np.int64)
        truncated = (lengths > self.max_length) | np.array(cut, dtype=bool)[np.array(flats, dtype=np.int64)]
        lengths = np.minimum(lengths, self.max_length)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.empty(int(starts[-1]), dtype=np.int32)
        mask = np.zeros(int(starts[-1]), dtype=np.uint8)
        cap = self.max_length
        for k, (piece, ranges) in enumerate(zip(pieces, trained)):
            s0, n = int(starts[k]), int(lengths[k])
            ids[s0:s0 + n] = piece[:n] if n < len(piece) else piece
            for a, z in ranges:
                mask[s0 + min(a, cap):s0 + min(z, cap)] = 1
            mask[s0] = 0  # the first token has no prediction; this also keeps packed examples' losses apart
        return _join_pairs(Encoded(ids, mask, lengths, truncated, owners_, np.array(parts, dtype=np.int64),
                                   np.zeros(len(lengths), dtype=np.int64)), rendered.paired)

    def _tokenize_long(self, text: str) -> np.ndarray:
        """A long text's tokens and its EOS, tokenized in pieces of PIECE_CHARS at most, each cut before a run
        of whitespace (where byte-level and SentencePiece tokenizers begin a new word anyway). A token that would
        have spanned a cut may still come out differently than from the whole text at once (a tokenizer that
        prefixes every input with a space marks each piece so): the price of never tokenizing a 60 MB text whole,
        which costs gigabytes."""
        backend, out, at = self.tok.backend_tokenizer, [], 0
        prefix, suffix = self.specials
        while at < len(text):
            end = min(at + PIECE_CHARS, len(text))
            if end < len(text):
                cut = max(text.rfind(c, at + 1, end) for c in (" ", "\n", "\t"))
                while cut > at + 1 and text[cut - 1] in " \n\t":   # before the whole run of whitespace
                    cut -= 1
                end = cut if cut > at else end
            out.append(np.array(backend.encode(text[at:end], add_special_tokens=False).ids, dtype=np.int32))
            at = end
        tail = list(suffix)   # then EOS, unless the text already ends with it (as a short text's tokens do)
        last = tail[-1] if tail else next((int(x[-1]) for x in reversed(out) if len(x)), None)
        if last != self.eos:
            tail.append(self.eos)
        return np.concatenate([np.array(prefix, dtype=np.int32), *out, np.array(tail, dtype=np.int32)])

    def conversation(self, rec: Record) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of its trained assistant turns."""
        messages = [_template_message(m) for m in rec.messages]
        full = self._render(messages, tools=rec.tools)
        spans = self._find_spans(full, messages, rec.train)
        if spans is None:
            spans = self._spans_by_prefix(full, messages, rec.train, rec.tools)
        return full, spans

    def _find_spans(self, full: str, messages, train) -> list[tuple[int, int]] | None:
        """One pass over the rendering: every message's content in order, each answer right after the
        generation prompt. None when a content is not found as given (the template rewrote it, or a tool call)."""
        spans, pos, gen, eot = [], 0, self.generation_prompt, self.end_of_turn
        if not gen:
            return None
        for m, trained in zip(messages, train):
            content = m.get("content")
            if m["role"] != "assistant" or m.get("tool_calls") or not content:
                if trained:
                    return None
                if content:  # walk past it, so an answer is never looked for inside an earlier turn
                    at = full.find(content, pos)
                    if at < 0:
                        return None
                    pos = at + len(content)
                continue
            at = full.find(content, pos)
            while at >= 0 and not full.startswith(gen, at - len(gen)):
                at = full.find(content, at + 1)
            if at < 0:
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
            upto = self._render(messages[:i + 1], tools=tools)
            if i:
                before = self._render(messages[:i], tools=tools, add_generation_prompt=True)
            else:  # an answer that opens the conversation: what comes before it ends with the generation prompt
                g = upto.find(self.generation_prompt) if self.generation_prompt else -1
                before = upto[:g + len(self.generation_prompt)] if g >= 0 else ""
            if not (full.startswith(upto) and upto.startswith(before)):
                raise ValueError("the chat template does not render conversations incrementally; "
                                 "cannot tell which tokens are the assistant's")
            spans.append((len(before), len(upto)))
        return spans


def _join_pairs(enc: Encoded, paired: set[int]) -> Encoded:
    """Each preference pair's two sequences (adjacent, each cut to max_length on its own, as TRL cuts them) as one
    example: chosen then rejected, `splits` where the rejected one begins. The tokens stay where they are."""
    if not paired:
        return enc
    first = np.array([o in paired for o in enc.owners.tolist()], dtype=bool)
    first[1:] &= ~first[:-1] | (enc.owners[1:] != enc.owners[:-1])  # a pair's first side, not its second
    second = np.zeros_like(first)
    second[1:] = first[:-1]
    lengths = enc.lengths.copy()
    lengths[first] += enc.lengths[second]
    splits = np.where(first, enc.lengths, 0)
    keep = ~second
    return Encoded(enc.ids, enc.mask, lengths[keep], (enc.truncated | np.roll(enc.truncated & second, -1))[keep],
                   enc.owners[keep], enc.parts[keep], splits[keep])


class RecordFailed(ValueError):
    def __init__(self, index: int, reason: str):
        self.index = index
        super().__init__(reason)


def _compile(chat_template: str):
    """transformers' sandboxed template, in an overlay that answers `loop.first` & co. without the full check.

    The sandbox vets every attribute read; for Jinja's own loop object the answer is always "safe" for public
    names, and templates read loop attributes once per message: this halves the time of a render.
    """
    from jinja2.runtime import LoopContext
    from transformers.utils.chat_template_utils import _compile_jinja_template

    env = _compile_jinja_template(chat_template).environment.overlay()
    vet = env.is_safe_attribute
    env.is_safe_attribute = lambda obj, attr, value: (
        (type(obj) is LoopContext and not attr.startswith("_")) or vet(obj, attr, value))
    return env.from_string(chat_template)


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


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """What the tokenizer adds before and after a text (BOS for Llama, nothing for GPT-2-like ones): found by
    tokenizing a probe with and without its special tokens."""
    backend = tokenizer.backend_tokenizer
    plain = backend.encode(PROBE_ANSWER, add_special_tokens=False).ids
    full = backend.encode(PROBE_ANSWER, add_special_tokens=True).ids
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    return ([], []) if at is None else (full[:at], full[at + len(plain):])


def windows(ids, max_length: int, overlap: int) -> list[tuple[object, int]]:
    """A text's tokens (longer than max_length) as (window, context tokens): [0, max_length), then windows of the
    last overlap + 1 tokens before (context) and new tokens, each starting where the one before ended."""
    context = overlap + 1
    out, end = [(ids[:max_length], 0)], max_length
    while end < len(ids):
        start = end - context
        out.append((ids[start:start + max_length], context))
        end = start + max_length
    return out


def _first_token_at(enc, char: int, text_len: int) -> int:
    """Index of the first token that starts at or after `char`: a token is trained when it starts in a span."""
    while char < text_len:
        t = enc.char_to_token(char)
        if t is not None:
            return t + 1 if enc.token_to_chars(t)[0] < char else t
        char += 1
    return len(enc.ids)
