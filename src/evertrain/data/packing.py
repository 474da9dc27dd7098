"""Rows of examples: best-fit-decreasing packing on arrays, and how much padding a batch order leaves.

Packing works on a numpy array of lengths and returns flat arrays, so a file of a million examples costs a few
megabytes here, not a Python list per row.

    evertrain check FILE        # prints the number of packed rows
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence

import numpy as np

IGNORE = -100  # label of a token that is not trained on (the value transformers' loss ignores)


class Rows(Sequence):
    """Row r holds the example indices items[starts[r]:starts[r+1]], ascending."""

    def __init__(self, items: np.ndarray, starts: np.ndarray):
        self.items, self.starts = items, starts

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, r: int) -> list[int]:
        if not -len(self) <= r < len(self):
            raise IndexError(r)
        r %= len(self)
        return self.items[self.starts[r]:self.starts[r + 1]].tolist()

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    @classmethod
    def one_per_example(cls, n: int) -> "Rows":
        return cls(np.arange(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64))


def pack(lengths, capacity: int) -> Rows:
    """Best-fit decreasing: longest first, each into the fullest open row it fits (lowest row on a tie).

    Open rows are kept in buckets by the room they have left, so each example costs a bisect over at most
    `capacity` distinct room sizes, whatever the number of rows.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    order = np.lexsort((np.arange(n), -lengths)).tolist()
    rooms: list[int] = []              # distinct room sizes that have an open row, ascending
    bins: dict[int, list[int]] = {}    # room -> heap of row ids with exactly that room
    row_of = np.empty(n, dtype=np.int64)
    n_rows = 0
    for i, length in zip(order, lengths[order].tolist()):
        k = bisect.bisect_left(rooms, length)
        if k < len(rooms):
            room = rooms[k]
            heap = bins[room]
            r = heapq.heappop(heap)
            if not heap:
                del bins[room]
                rooms.pop(k)
        else:
            room, r, n_rows = capacity, n_rows, n_rows + 1
        row_of[i] = r
        left = room - length
        if left > 0:
            if left in bins:
                heapq.heappush(bins[left], r)
            else:
                bins[left] = [r]
                bisect.insort(rooms, left)
    items = np.lexsort((np.arange(n), row_of))
    starts = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=n_rows), out=starts[1:])
    return Rows(items.astype(np.int64), starts)


def padding_fraction(rows, lengths, batch_size: int) -> float:
    """Share of a batch's token slots that are padding when rows are padded to the longest in their batch."""
    sizes = [sum(lengths[i] for i in r) for r in rows]
    real = sum(sizes)
    slots = sum(max(sizes[b:b + batch_size]) * len(sizes[b:b + batch_size]) for b in range(0, len(sizes), batch_size))
    return 1 - real / slots if slots else 0.0


def collate(rows: list[list], pad_id: int, device) -> dict:
    """Rows of Examples -> the model's input_ids, labels, position_ids, right-padded to the longest row.

    No attention mask is passed: position ids that restart at 0 for every example (and for the padding, and for the
    rejected answer of a preference pair) make transformers build a block-diagonal causal mask, so packed examples
    never attend to each other. That
    detection only runs without a KV cache, hence use_cache=False in the forward pass.
    """
    import torch  # here: the data package itself needs no torch

    ids, labels, pos = [], [], []
    for row in rows or [[]]:
        ids.append([t for e in row for t in e.input_ids])
        labels.append([t for e in row for t in e.labels])
        # a preference pair's rejected sequence restarts its positions too: it never attends to the chosen one
        pos.append([p for e in row for a, b in e.segments for p in range(b - a)])
    width = max(1, max(len(r) for r in ids))
    for r_ids, r_lab, r_pos in zip(ids, labels, pos):
        pad = width - len(r_ids)
        r_ids += [pad_id] * pad
        r_lab += [IGNORE] * pad
        r_pos += range(pad)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if torch.device(device).type != "cuda":
        return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}
    # Pinned host memory and a non-blocking copy: the copy overlaps the GPU's work instead of waiting for it.
    return {k: torch.tensor(v, dtype=torch.long).pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def next_token_logits(model, batch: dict):
    """(logits in float32, labels) of a collated batch, aligned: position t holds the model's prediction of token
    t+1 and that token's label (IGNORE where nothing is trained). For evaluation: call it under no_grad."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    return logits[:, :-1].float(), batch["labels"][:, 1:]
