"""Data: a dataset file -> a validated, tokenized FileData whose tokens live on disk, ready to train.

    containers.py   the file as dropped (.jsonl, .jsonl.gz, .jsonl.zst, .json, .parquet, .csv, .tsv) -> records
    formats.py      one record of any common shape -> a Record (text, prompt/completion or a conversation)
    columns.py      the column mapping suggested for a record that fits no shape
    render.py       Records -> token ids and loss masks, in batches through the fast tokenizer
    store.py        the tokens on disk, keyed by content and tokenizer, reused by every later run and resume
    packing.py      examples -> rows (best-fit decreasing), on arrays
    order.py        the row order of each epoch and the held-out choice: pure functions of content and seed

A file is read, checked and tokenized in one streaming pass before any of it trains; every bad record is
counted, each distinct problem reported once with its records' numbers ("line 12", "items 3 and 7", "row 12");
the file's memory cost stays flat in its size.

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
    """A file that cannot be trained, with every reason and record number we found. `total` counts the bad
    records, `covered` those the problems shown stand for (one problem may name many records)."""

    def __init__(self, path: Path, problems: list[str], total: int | None = None, covered: int | None = None):
        self.path, self.problems = Path(path), problems
        total = self.total = len(problems) if total is None else total
        shown = problems[:MAX_REPORTED_ERRORS]
        self.covered = len(shown) if covered is None else covered
        # A problem's further lines (a suggested evertrain.toml table) are indented under it.
        text = f"{self.path}: not trained, {total} problem(s):\n" + "\n".join(
            "  " + p.replace("\n", "\n    ") for p in shown)
        if total > self.covered:
            text += f"\n  ... and {total - self.covered} more"
        super().__init__(text)

    def __reduce__(self):  # the main process of a launch sends it to the others (collective.from_main)
        return type(self), (self.path, self.problems, self.total, self.covered)


class Cancelled(Exception):
    """Preparation was asked to stop (the daemon is stopping or pausing)."""


@dataclass
class Example:
    line: int              # 0-based record number in the file (what the trace records)
    format: str            # the shape it came in: text, prompt_completion, messages, alpaca, sharegpt, ...
    input_ids: list[int]
    labels: list[int]      # IGNORE where no loss is taken; labels[0] is always IGNORE
    truncated: bool = False

    @property
    def target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


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
    unit: str = "line"               # how the container counts records: line, item or row
    warnings: list[str] = field(default_factory=list)  # what trains, but probably not as the person meant
    store: object = None             # the TokenStore the examples are read from
    scratch: object = None           # a temporary folder holding the store, removed with this object

    def __post_init__(self) -> None:
        self.name = self.name or self.path.name

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
    key = stores.store_key(sha, stores.tokenizer_fingerprint(tokenizer), config.max_length, config.columns)
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
    """Held-out choice and packing on the store's arrays (cheap: both are pure functions of content and seed)."""
    n = len(store)
    held = held_out_lines(sha, config.seed, n, config.held_out_fraction, config.held_out_max,
                          config.held_out_min_file)
    is_held = np.zeros(n, dtype=bool)
    is_held[list(held)] = True
    train_idx = np.flatnonzero(~is_held)
    lengths = store.lengths[train_idx]
    formats, ignored = Counter(store.meta["formats"]), Counter(store.meta["ignored"])
    return FileData(path=path, sha256=sha, examples=Examples(store, train_idx),
                    held_out=[store.example(int(i)) for i in np.flatnonzero(is_held)],
                    rows=pack(lengths, config.max_length) if config.packing else Rows.one_per_example(len(train_idx)),
                    formats=formats, ignored=ignored, tokens=int(lengths.sum()), truncated=store.meta["truncated"],
                    unit=store.meta["unit"], store=store, warnings=_warnings(store.meta))


def _warnings(meta: dict) -> list[str]:
    out = []
    if meta.get("unrendered_tool_calls"):
        out.append(f"{meta['unrendered_tool_calls']} conversation(s) hold tool calls that the chat template does "
                   "not render: those assistant turns train as empty answers; use a template that renders "
                   "tool_calls (--chat-template chatml, or your model's own .jinja)")
    return out
