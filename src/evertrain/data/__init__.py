"""Data: a dataset file -> a validated, tokenized FileData whose tokens live on disk, ready to train.

    containers.py   the file as dropped (.jsonl, .jsonl.gz, .jsonl.zst, .json, .parquet, .csv, .tsv) -> records
    plaintext.py    a .txt or .md file -> text records, by line, paragraph or document
    formats.py      one record of any common shape -> a Record (text, prompt/completion or a conversation)
    columns.py      the column mapping suggested for a record that fits no shape
    render.py       Records -> token ids and loss masks, in batches through the fast tokenizer; long texts in windows
    store.py        the tokens on disk, keyed by content and tokenizer, reused by every later run and resume
    packing.py      examples -> rows (best-fit decreasing), on arrays
    order.py        the row order of each epoch and the held-out choice: pure functions of content and seed
    examples.py     what this package hands to training: Example, FileData, DataError

A file is read, checked and tokenized in one streaming pass before any of it trains; every bad record is
counted, each distinct problem reported once with its records' numbers ("line 12", "items 3 and 7", "row 12");
the file's memory cost stays flat in its size.

    evertrain check FILE [--model DIR]              # check a file and print what would be trained
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from evertrain.data.examples import (BATCH_CHARS, BATCH_RECORDS, MAX_REPORTED_ERRORS, Cancelled,  # noqa: F401
                                     DataError, Example, Examples, FileData, example_from, example_record,
                                     layout)
from evertrain.data.order import held_out_lines, row_order  # noqa: F401
from evertrain.data.packing import IGNORE, Rows, pack, padding_fraction  # noqa: F401
from evertrain.files import sha256_file

__all__ = ["IGNORE", "DataError", "Example", "FileData", "load_file", "row_order", "held_out_lines",
           "pack", "padding_fraction", "Rows", "Cancelled"]



def load_file(path: Path, tokenizer, config, *, store_dir: Path | None = None,
              progress: Callable[[float], None] | None = None,
              should_stop: Callable[[], bool] | None = None, attempt=None) -> FileData:
    """Check and tokenize a file with a TrainConfig's settings (or reuse its store); DataError before any training.

    `store_dir` holds the token stores (a run's OUTPUT_DIR/tokens); without one a temporary folder is used.
    `progress(fraction)` is told how far preparation got; `should_stop()` True raises Cancelled. `attempt`: a
    context manager the preparation runs in (the daemon's ledger counts the deaths in it; it may refuse with a
    DataError, which then reaches every process of a launch like any other).
    """
    from evertrain.data.prepare import is_disk_full, one_line  # the reading machinery: loaded when a file is

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
    objective = store.meta.get("objective", "supervised")
    capacity = row_capacity(objective, config.max_length)
    return FileData(path=path, sha256=sha, examples=Examples(store, train_idx),
                    held_out=[store.example(int(i)) for i in np.flatnonzero(is_held)],
                    rows=pack(lengths, capacity) if config.packing else Rows.one_per_example(len(train_idx)),
                    formats=formats, ignored=ignored, tokens=int(lengths.sum()), truncated=store.meta["truncated"],
                    unit=store.meta["unit"], store=store, warnings=_warnings(store.meta), records=n - len(held),
                    windows=store.meta.get("windows", 0), layout=store.meta.get("layout", {}), objective=objective,
                    row_capacity=capacity)


def row_capacity(objective: str, max_length: int) -> int:
    """Tokens a row holds: max_length, or for preference pairs two of it (a pair's chosen and rejected sequences
    are each cut to max_length, as TRL cuts them, and always train in one row)."""
    return 2 * max_length if objective == "preference" else max_length


def _warnings(meta: dict) -> list[str]:
    out = []
    lost = meta.get("untrainable") or {}
    if lost.get("count"):
        first = ", ".join(str(n + 1) for n in lost["first"])
        more = f" and {lost['count'] - len(lost['first'])} more" if lost["count"] > len(lost["first"]) else ""
        out.append(f"{lost['count']} record(s) not trained ({meta.get('unit', 'line')}s {first}{more}): max_length "
                   f"({meta.get('max_length')}) cut away an answer entirely (its prompt alone fills it); raise "
                   "--max-length to train them")
    if meta.get("unrendered_tool_calls"):
        out.append(f"{meta['unrendered_tool_calls']} conversation(s) hold tool calls that the chat template does "
                   "not render: those assistant turns train as empty answers; use a template that renders "
                   "tool_calls (--chat-template chatml, or your model's own .jinja)")
    return out
