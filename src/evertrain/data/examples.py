"""What the data package hands to training: a file's examples (each with its tokens and loss mask), the FileData of a
whole file, and the errors that refuse one. Every module of data/ and its callers use these; data/__init__.py
makes them (load_file).

    evertrain check FILE        # a FileData, summarised
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evertrain.data.order import row_order
from evertrain.data.packing import IGNORE

MAX_REPORTED_ERRORS = 20
BATCH_RECORDS = 512  # records tokenized per call: the fast tokenizer's own threads work on a batch
BATCH_CHARS = 1 << 20  # ... or fewer, when they hold this many characters: a batch's memory stays bounded

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
    part: int | None = None  # the window of a long text this is (0, 1, ...); None for a whole example
    objective: str = "supervised"  # what it teaches: supervised, preference (a pair) or feedback (a rated answer)
    split: int = 0         # a preference pair: the chosen sequence is input_ids[:split], the rejected one the rest
    desirable: bool | None = None  # feedback: the answer was rated good or bad
    kl: tuple[list[int], list[int]] | None = None  # feedback: (input_ids, labels) of its prompt with another
    #                        record's answer, for the KL estimate of KTO (never trained)
    index: int | None = None  # its place in its file's token store (what its reference is kept by)
    reference: tuple[float, ...] | None = None  # preference, feedback: the reference log-probabilities (chosen and
    #                        rejected; the answer and the KL sequence), as train/references.py computed them

    @property
    def target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    @property
    def id(self) -> int | str:
        """What the trace calls it: its line, or "line/window" for a window of a long text."""
        return self.line if self.part is None else f"{self.line}/{self.part}"

    @property
    def segments(self) -> list[tuple[int, int]]:
        """The [start, end) of each sequence it holds: a pair's chosen and rejected, else the one."""
        n = len(self.input_ids)
        return [(0, self.split), (self.split, n)] if self.split else [(0, n)]


def example_record(e: Example) -> dict:
    """An example as JSON (a replay sample, a held-out slice, a tracked example): what it is beyond its tokens
    only where it has it, so a plain example's record stays what it always was."""
    out = {"line": e.line, "input_ids": e.input_ids, "labels": e.labels}
    extra = {"part": e.part, "objective": e.objective if e.objective != "supervised" else None,
             "split": e.split or None, "desirable": e.desirable, "kl": e.kl, "reference": e.reference}
    return {**out, **{k: v for k, v in extra.items() if v is not None}}


def example_from(d: dict, format: str = "") -> Example:
    kl = d.get("kl")
    return Example(line=d["line"], format=format, input_ids=d["input_ids"], labels=d["labels"], part=d.get("part"),
                   objective=d.get("objective", "supervised"), split=d.get("split", 0), desirable=d.get("desirable"),
                   kl=tuple(kl) if kl else None,
                   reference=tuple(d["reference"]) if d.get("reference") is not None else None)


def layout(config, path: Path) -> dict:
    """The settings besides max_length and columns that change a file's tokens: how long texts are treated and
    how a text file splits. Empty for what every version before them did (truncation, no text file)."""
    from evertrain.data.containers import TEXT_KINDS, kind_of

    out = {"long_text": "window", "window_overlap": config.window_overlap} if config.long_text == "window" else {}
    if kind_of(path) in TEXT_KINDS:
        out["text_sample_by"] = config.text_sample_by
    return out


class Examples(Sequence):
    """Some of a store's examples, read from disk when asked for (with their reference log-probabilities, once
    train/references.py has given the file its `reference`: one row per example of the store)."""

    def __init__(self, store, indexes: np.ndarray):
        self.store, self.indexes = store, indexes
        self.reference: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indexes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        e = self.store.example(int(self.indexes[i]))
        if self.reference is not None:
            e.reference = tuple(self.reference[e.index].tolist())
        return e


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
    objective: str = "supervised"    # what the file teaches: supervised, preference or feedback (one per file)
    row_capacity: int = 0            # tokens a row holds (data.row_capacity)
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
