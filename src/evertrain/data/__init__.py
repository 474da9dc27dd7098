"""Data: a dataset file -> a validated, tokenized FileData whose tokens live on disk, ready to train.

    containers.py   the file as dropped (.jsonl, .jsonl.gz, .jsonl.zst, .json, .parquet, .csv, .tsv) -> records
    plaintext.py    a .txt or .md file -> text records, by line, paragraph or document
    formats.py      one record of any common shape -> a Record (text, prompt/completion or a conversation)
    render.py       Records -> token ids and loss masks, in batches through the fast tokenizer; long texts in windows
    store.py        the tokens on disk, keyed by content and tokenizer, reused by every later run and resume
    packing.py      examples -> rows (best-fit decreasing), on arrays
    order.py        the row order of each epoch and the held-out choice: pure functions of content and seed

A file is read, checked and tokenized in one streaming pass before any of it trains; every bad record is
reported with its number ("line 12", "item 12", "row 12"); the file's memory cost stays flat in its size.

    python -m evertrain.data FILE [--model DIR]     # check a file and print what would be trained
    evertrain check FILE [--model DIR]              # the same, from the CLI
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evertrain.data.order import held_out_lines, row_order
from evertrain.data.packing import IGNORE, Rows, pack, padding_fraction  # noqa: F401

MAX_REPORTED_ERRORS = 20
BATCH_RECORDS = 512  # records tokenized per call: the fast tokenizer's own threads work on a batch
BATCH_CHARS = 1 << 20  # ... or fewer, when they hold this many characters: a batch's memory stays bounded

__all__ = ["IGNORE", "DataError", "Example", "FileData", "load_file", "sha256_file", "row_order", "held_out_lines",
           "pack", "padding_fraction", "Rows", "Cancelled"]


class DataError(ValueError):
    """A file that cannot be trained, with every reason and record number we found."""

    def __init__(self, path: Path, problems: list[str], total: int | None = None):
        self.path, self.problems = Path(path), problems
        total = self.total = len(problems) if total is None else total
        shown = problems[:MAX_REPORTED_ERRORS]
        text = f"{self.path}: not trained, {total} problem(s):\n" + "\n".join(f"  {p}" for p in shown)
        if total > len(shown):
            text += f"\n  ... and {total - len(shown)} more"
        super().__init__(text)

    def __reduce__(self):  # the main process of a launch sends it to the others (collective.from_main)
        return type(self), (self.path, self.problems, self.total)


class Cancelled(Exception):
    """Preparation was asked to stop (the daemon is stopping or pausing)."""


@dataclass
class Example:
    line: int              # 0-based record number in the file (what the trace records)
    format: str            # the shape it came in: text, prompt_completion, messages, alpaca, sharegpt, ...
    input_ids: list[int]
    labels: list[int]      # IGNORE where no loss is taken; labels[0] is always IGNORE
    truncated: bool = False
    part: int | None = None  # the window of a long text this is (0, 1, ...); None for a whole example

    @property
    def target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    @property
    def id(self) -> int | str:
        """What the trace calls it: its line, or "line/window" for a window of a long text."""
        return self.line if self.part is None else f"{self.line}/{self.part}"


def layout(config, path: Path) -> dict:
    """The settings besides max_length and columns that change a file's tokens: how long texts are treated and
    how a text file splits. Empty for what every version before them did (truncation, no text file)."""
    from evertrain.data.containers import TEXT_KINDS, kind_of

    out = {"long_text": "window", "window_overlap": config.window_overlap} if config.long_text == "window" else {}
    if kind_of(path) in TEXT_KINDS:
        out["text_sample_by"] = config.text_sample_by
    return out


class Examples(Sequence):
    """Some of a store's examples, read from disk when asked for."""

    def __init__(self, store, indexes: np.ndarray):
        self.store, self.indexes = store, indexes

    def __len__(self) -> int:
        return len(self.indexes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.store.example(int(self.indexes[i]))


@dataclass
class FileData:
    """A validated, tokenized file, ready to train."""

    path: Path
    sha256: str
    examples: Sequence[Example]      # the trained examples (held-out ones are not here)
    held_out: list[Example] = field(default_factory=list)
    rows: Sequence = field(default_factory=list)   # indices into examples, one list per row
    formats: Counter = field(default_factory=Counter)
    ignored: Counter = field(default_factory=Counter)  # keys outside every format, per key: counted, not trained
    name: str = ""                   # what people call the file (logs, metrics, snapshots); default: its file name
    tokens: int = 0                  # tokens of the trained examples
    truncated: int = 0               # examples cut to max_length
    records: int = 0                 # the file's trained records (a text in windows counts once)
    windows: int = 0                 # examples that are windows of a long text (held-out ones included)
    layout: dict = field(default_factory=dict)  # how the tokens were made (data.layout): the cursor keeps it
    unit: str = "line"               # how the container counts records: line, item or row
    warnings: list[str] = field(default_factory=list)  # what trains, but probably not as the person meant
    store: object = None             # the TokenStore the examples are read from
    scratch: object = None           # a temporary folder holding the store, removed with this object

    def __post_init__(self) -> None:
        self.name = self.name or self.path.name

    @property
    def held_out_lines(self) -> list[int]:
        """The held-out records' numbers (all the windows of a held-out text are held out with it)."""
        return sorted({e.line for e in self.held_out})

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


def load_file(path: Path, tokenizer, config, *, store_dir: Path | None = None,
              progress: Callable[[float], None] | None = None,
              should_stop: Callable[[], bool] | None = None, attempt=None) -> FileData:
    """Check and tokenize a file with a TrainConfig's settings (or reuse its store); DataError before any training.

    `store_dir` holds the token stores (a run's OUTPUT_DIR/tokens); without one a temporary folder is used.
    `progress(fraction)` is told how far preparation got; `should_stop()` True raises Cancelled. `attempt`: a
    context manager the preparation runs in (the daemon's ledger counts the deaths in it; it may refuse with a
    DataError, which then reaches every process of a launch like any other).
    """
    from evertrain.data.prepare import is_disk_full, one_line

    path = Path(path)
    try:
        with attempt or contextlib.nullcontext():
            return _load_file(path, tokenizer, config, store_dir, progress, should_stop)
    except (DataError, Cancelled):
        raise
    except Exception as e:  # a poison file fails alone, whatever it breaks (build_store names the record)
        if is_disk_full(e):
            raise
        raise DataError(path, [one_line(e)]) from e


def _load_file(path: Path, tokenizer, config, store_dir, progress, should_stop) -> FileData:
    from evertrain.data import store as stores
    from evertrain.data.prepare import build_store

    try:
        sha = sha256_file(path)
    except OSError as e:
        raise DataError(path, [f"cannot read the file: {e.strerror or e}"]) from e
    scratch = None
    if store_dir is None:  # a one-off look at a file: the store lives as long as the FileData
        import tempfile

        scratch = tempfile.TemporaryDirectory(prefix="evertrain-tokens-")
        store_dir = Path(scratch.name)
    key = stores.store_key(sha, stores.tokenizer_fingerprint(tokenizer), config.max_length, config.columns,
                           layout(config, path))
    target = Path(store_dir) / key
    try:
        store = stores.open_store(target)
    except stores.StoreError as e:
        print(f"evertrain: the token store of {path.name} is damaged ({e}); rebuilding it")
        store = None
    if store is None:
        store = build_store(path, tokenizer, config, target, progress=progress, should_stop=should_stop)
    else:
        target.touch()  # most recently used: pruning keeps it
    if progress:
        progress(1.0)
    data = file_data(path, sha, store, config)
    data.scratch = scratch
    return data


def file_data(path: Path, sha: str, store, config) -> FileData:
    """Held-out choice and packing on the store's arrays (cheap: both are pure functions of content and seed).

    Records are held out, not examples: every window of a held-out text is held out with it (a window trained
    while its neighbour is evaluated would leak). Without windows, records and examples are the same indices."""
    record_of = np.cumsum(store.starts_of_records()) - 1   # each example's record, counted 0, 1, ... in the file
    n = int(record_of[-1]) + 1 if len(record_of) else 0
    held = held_out_lines(sha, config.seed, n, config.held_out_fraction, config.held_out_max,
                          config.held_out_min_file)
    is_held = np.isin(record_of, np.fromiter(held, dtype=np.int64, count=len(held)))
    train_idx = np.flatnonzero(~is_held)
    lengths = store.lengths[train_idx]
    formats, ignored = Counter(store.meta["formats"]), Counter(store.meta["ignored"])
    return FileData(path=path, sha256=sha, examples=Examples(store, train_idx),
                    held_out=[store.example(int(i)) for i in np.flatnonzero(is_held)],
                    rows=pack(lengths, config.max_length) if config.packing else Rows.one_per_example(len(train_idx)),
                    formats=formats, ignored=ignored, tokens=int(lengths.sum()), truncated=store.meta["truncated"],
                    unit=store.meta["unit"], store=store, warnings=_warnings(store.meta), records=n - len(held),
                    windows=store.meta.get("windows", 0), layout=store.meta.get("layout", {}))


def _warnings(meta: dict) -> list[str]:
    out = []
    if meta.get("unrendered_tool_calls"):
        out.append(f"{meta['unrendered_tool_calls']} conversation(s) hold tool calls that the chat template does "
                   "not render: those assistant turns train as empty answers; use a template that renders "
                   "tool_calls (--chat-template chatml, or your model's own .jinja)")
    return out
