"""JSONL data: the three example formats, validation, tokenization, packing, and the data order.

Every line is one example, its format detected on its own:
  {"text": "..."}                                    loss on every token
  {"prompt": "...", "completion": "..."}             loss on the completion only ("response" works too)
  {"messages": [{"role": ..., "content": ...}, ...]} chat template; loss on every assistant turn only

A file is read and checked in full before any of it trains; every bad line is reported by number.

    python -m evertrain.data FILE [--model DIR]     # check a file and print what would be trained
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IGNORE = -100  # label of a token that is not trained on (the value transformers' loss ignores)
MAX_REPORTED_ERRORS = 20
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A file that cannot be trained, with every reason and line number we found."""

    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = Path(path), problems
        shown = problems[:MAX_REPORTED_ERRORS]
        more = len(problems) - len(shown)
        text = f"{self.path}: not trained, {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in shown)
        if more:
            text += f"\n  ... and {more} more"
        super().__init__(text)


@dataclass
class Example:
    line: int              # 0-based line number in the file (what the trace records)
    format: str            # text | prompt_completion | messages
    input_ids: list[int]
    labels: list[int]      # IGNORE where no loss is taken; labels[0] is always IGNORE
    truncated: bool = False

    @property
    def target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class FileData:
    """A validated, tokenized file, ready to train."""

    path: Path
    sha256: str
    examples: list[Example]          # the trained examples (held-out ones are not here)
    held_out: list[Example] = field(default_factory=list)
    rows: list[list[int]] = field(default_factory=list)   # indices into examples, one list per row
    formats: Counter = field(default_factory=Counter)
    name: str = ""                   # what people call the file (logs, metrics, snapshots); default: its file name

    def __post_init__(self) -> None:
        self.name = self.name or self.path.name

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def truncated(self) -> int:
        return sum(e.truncated for e in self.examples)

    def steps_per_epoch(self, global_batch: int) -> int:
        # A file smaller than one global batch still trains one (partial) step.
        return max(1, math.ceil(len(self.rows) / global_batch))

    def total_steps(self, global_batch: int, epochs: int) -> int:
        return self.steps_per_epoch(global_batch) * epochs

    def step_rows(self, file_step: int, global_batch: int, seed: int) -> list[int]:
        """Row indices trained at optimizer step `file_step` of this file: a pure function of the cursor."""
        per_epoch = self.steps_per_epoch(global_batch)
        epoch, k = divmod(file_step, per_epoch)
        order = row_order(self.sha256, seed, epoch, len(self.rows))
        return order[k * global_batch:(k + 1) * global_batch].tolist()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=8)  # asked every optimizer step; a pure function, so computed once per epoch
def row_order(sha256: str, seed: int, epoch: int, n: int) -> np.ndarray:
    """The order rows are trained in during one epoch: depends only on (file content, seed, epoch)."""
    key = int(sha256[:16], 16) ^ (seed * 0x9E3779B97F4A7C15 & (2**64 - 1))
    order = np.random.default_rng([key, epoch]).permutation(n)
    order.flags.writeable = False  # shared by every caller through the cache
    return order


def held_out_lines(sha256: str, seed: int, n: int, fraction: float, cap: int) -> set[int]:
    """Which example indices of a file are held out: a fixed slice chosen by content and seed."""
    count = min(cap, int(n * fraction))
    if count <= 0 or n < 2:
        return set()
    count = min(count, n - 1)  # always leave something to train
    order = np.random.default_rng([int(sha256[16:32], 16), seed, 7]).permutation(n)
    return set(order[:count].tolist())


# ---------------------------------------------------------------- parsing and validation

def parse_line(obj) -> tuple[str, object]:
    """Return (format, payload) for one decoded JSON line, or raise ValueError with the reason."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    if keys == {"text"}:
        if not isinstance(obj["text"], str):
            raise ValueError(f'"text" must be a string, got {type(obj["text"]).__name__}')
        if not obj["text"].strip():
            raise ValueError('"text" is empty')
        return "text", obj["text"]
    if keys in ({"prompt", "completion"}, {"prompt", "response"}):
        answer_key = "completion" if "completion" in keys else "response"
        for k in ("prompt", answer_key):
            if not isinstance(obj[k], str):
                raise ValueError(f'"{k}" must be a string, got {type(obj[k]).__name__}')
        if not obj[answer_key].strip():
            raise ValueError(f'"{answer_key}" is empty')
        return "prompt_completion", (obj["prompt"], obj[answer_key])
    if keys == {"messages"}:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError('"messages" must be a non-empty list')
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise ValueError(f'messages[{i}] must be an object with exactly "role" and "content"')
            if m["role"] not in ROLES:
                raise ValueError(f'messages[{i}] has unknown role {m["role"]!r} (expected one of {", ".join(ROLES)})')
            if not isinstance(m["content"], str):
                raise ValueError(f'messages[{i}].content must be a string, got {type(m["content"]).__name__}')
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("no assistant turn: nothing to train on")
        return "messages", msgs
    raise ValueError(f"unknown keys {sorted(keys)}: expected text, prompt+completion (or response), or messages")


def read_jsonl(path: Path) -> list[tuple[int, str, object]]:
    """Parse and check every line; return (line, format, payload) or raise DataError listing every bad line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(path, [f"cannot read the file: {e.strerror or e}"]) from e
    problems, parsed = [], []
    for i, line in enumerate(raw.split(b"\n")):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"line {i + 1}: not UTF-8 (byte {e.start})")
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"line {i + 1}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        try:
            fmt, payload = parse_line(obj)
        except ValueError as e:
            problems.append(f"line {i + 1}: {e}")
            continue
        parsed.append((i, fmt, payload))
    if not problems and not parsed:
        problems.append("the file holds no examples (it is empty or only blank lines)")
    if problems:
        raise DataError(path, problems)
    return parsed


# ---------------------------------------------------------------- tokenization

def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def tokenize(tokenizer, fmt: str, payload, line: int, max_length: int) -> Example:
    eos = tokenizer.eos_token_id
    if fmt == "text":
        ids = _ids(tokenizer, payload, True)
        if not ids or ids[-1] != eos:
            ids = ids + [eos]
        labels = list(ids)
    elif fmt == "prompt_completion":
        prompt, completion = payload
        p = _ids(tokenizer, prompt, True) if prompt else []
        c = _ids(tokenizer, completion, False) + [eos]
        ids, labels = p + c, [IGNORE] * len(p) + c
    else:
        ids, labels = _tokenize_messages(tokenizer, payload)
    labels[0] = IGNORE  # the first token has no prediction; this also keeps packed examples' losses apart
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(line=line, format=fmt, input_ids=ids, labels=labels, truncated=truncated)


def _tokenize_messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Render with the chat template; label exactly the characters the template adds for each assistant turn."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ValueError("the chat template does not render conversations incrementally; "
                             "cannot tell which tokens are the assistant's")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    starts = [s for s, _ in spans]
    labels = []
    for tok, (a, _b) in zip(ids, offsets):
        k = bisect.bisect_right(starts, a) - 1
        labels.append(tok if k >= 0 and a < spans[k][1] else IGNORE)
    return ids, labels


def load_file(path: Path, tokenizer, config) -> FileData:
    """Read, check and tokenize a whole file with a TrainConfig's settings; raise DataError before any training."""
    path, max_length = Path(path), config.max_length
    parsed = read_jsonl(path)
    sha = sha256_file(path)
    examples, problems = [], []
    for line, fmt, payload in parsed:
        try:
            examples.append(tokenize(tokenizer, fmt, payload, line, max_length))
        except Exception as e:  # a template or tokenizer failure on this line
            problems.append(f"line {line + 1}: {e}")
    if problems:
        raise DataError(path, problems)
    held = held_out_lines(sha, config.seed, len(examples), config.held_out_fraction, config.held_out_max)
    data = FileData(path=path, sha256=sha,
                    examples=[e for i, e in enumerate(examples) if i not in held],
                    held_out=[e for i, e in enumerate(examples) if i in held],
                    formats=Counter(e.format for e in examples))
    lengths = [len(e.input_ids) for e in data.examples]
    data.rows = pack(lengths, max_length) if config.packing else [[i] for i in range(len(lengths))]
    return data


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing packing of examples into rows of at most `capacity` tokens; deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), kept sorted
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], r))
    return [sorted(r) for r in rows]


def padding_fraction(rows: list[list[int]], lengths: list[int], batch_size: int) -> float:
    """Share of a batch's token slots that are padding when rows are padded to the longest in their batch."""
    sizes = [sum(lengths[i] for i in r) for r in rows]
    real = sum(sizes)
    slots = sum(max(sizes[b:b + batch_size]) * len(sizes[b:b + batch_size]) for b in range(0, len(sizes), batch_size))
    return 1 - real / slots if slots else 0.0


def _main() -> None:
    import argparse

    from evertrain.config import TrainConfig
    from evertrain.models import load_tokenizer

    p = argparse.ArgumentParser(description="Check a JSONL file and show what evertrain would train.")
    p.add_argument("file", type=Path)
    p.add_argument("--model", default=None)
    p.add_argument("--max-length", type=int, default=1024)
    a = p.parse_args()
    try:
        data = load_file(a.file, load_tokenizer(a.model), TrainConfig(model=a.model, max_length=a.max_length))
    except DataError as e:
        raise SystemExit(str(e))
    print(f"{a.file}: {len(data.examples)} examples {dict(data.formats)}, {data.tokens} tokens, "
          f"{data.truncated} truncated, {len(data.rows)} packed rows")


if __name__ == "__main__":
    _main()
