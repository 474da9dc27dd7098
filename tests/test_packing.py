"""data/packing.py: examples packed into rows (best fit decreasing), the rows' index, and `collate` (rows of examples
-> the model's tensors), where a packed example attends only to itself. Written to kill the mutants `make mutate`
found alive (see TESTING.md).

    pytest -q tests/test_packing.py
"""

from __future__ import annotations

import bisect
import random

import numpy as np
import pytest
import torch
from conftest import write_jsonl

from evertrain.config import TrainConfig
from evertrain.data import Example, load_file
from evertrain.data.packing import IGNORE, Rows, collate, next_token_logits, pack


def reference_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook algorithm on plain lists: longest first, into the open row with the least room that fits it
    (the lowest-numbered on a tie), else a new row."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows, free = [], []  # free: sorted (room left, row)
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


@pytest.mark.parametrize("seed", range(6))
def test_packing_is_best_fit_decreasing(seed):
    rng = random.Random(seed)
    capacity = rng.choice([8, 32, 64])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 300))]
    lengths += [1, 1, capacity - 1]  # a row left with room for exactly one token must take a 1-token example
    rows = pack(lengths, capacity)
    assert list(rows) == reference_best_fit_decreasing(lengths, capacity)
    assert all(sum(lengths[i] for i in r) <= capacity for r in rows)


def test_rows_index_like_a_list():
    rows = Rows(np.array([3, 0, 1, 2], dtype=np.int64), np.array([0, 1, 4], dtype=np.int64))
    assert len(rows) == 2 and rows[0] == [3] and rows[1] == [0, 1, 2]
    assert rows[-1] == rows[1] and rows[-2] == rows[0]
    with pytest.raises(IndexError, match="2"):
        rows[2]
    with pytest.raises(IndexError, match="-3"):
        rows[-3]
    assert list(Rows.one_per_example(3)) == [[0], [1], [2]]


def test_packing_puts_every_example_in_one_row_within_capacity():
    lengths = [5, 17, 3, 30, 12, 12, 1, 29, 8]
    rows = pack(lengths, 32)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 32 for r in rows)
    assert len(rows) < len(lengths)


# ---------------------------------------------------------------- collate: rows of examples -> the model's tensors


def _ex(ids: list[int], trained_from: int) -> Example:
    return Example(line=0, format="", input_ids=ids, labels=[IGNORE] * trained_from + ids[trained_from:])


def test_collate_puts_each_row_end_to_end_and_pads_to_the_longest():
    a, b, c = _ex([5, 6, 7], 1), _ex([8, 9], 0), _ex([4], 0)
    batch = collate([[a, b], [c]], pad_id=0, device="cpu")
    assert {k: v.dtype for k, v in batch.items()} == dict.fromkeys(("input_ids", "labels", "position_ids"),
                                                                  torch.long)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, 8, 9], [4, IGNORE, IGNORE, IGNORE, IGNORE]]
    # Positions restart at every example (transformers' block-diagonal mask) and count on through the padding.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: it would undo the blocks


def test_collate_puts_the_tensors_on_the_device_asked():
    # "meta" stands for any device but CUDA's (mps, xpu): the tensors must be made there, as int64.
    batch = collate([[_ex([5, 6], 0)]], pad_id=0, device="meta")
    assert all(v.device.type == "meta" and v.dtype == torch.long and v.shape == (1, 2) for v in batch.values())


def test_collate_of_nothing_is_one_padding_token():
    for rows in ([], [[]], [[], []]):
        batch = collate(rows, pad_id=3, device="cpu")
        n = max(1, len(rows))
        assert batch["input_ids"].tolist() == [[3]] * n and batch["labels"].tolist() == [[IGNORE]] * n
        assert batch["position_ids"].tolist() == [[0]] * n


def test_packed_examples_do_not_attend_to_each_other(tmp_path, tok, tiny_model):
    """The logits of an example inside a packed row equal its logits alone."""
    from transformers import AutoModelForCausalLM

    f = write_jsonl(tmp_path / "p.jsonl", [{"text": "first example here"}, {"text": "second one"}])
    data = load_file(f, tok, TrainConfig(model=str(tiny_model), packing=True))
    assert data.rows == [[0, 1]]
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():  # packing.next_token_logits, which evaluation calls: logits shifted by one
        batch = collate([[data.examples[i] for i in r] for r in data.rows], tok.pad_token_id, "cpu")
        packed, labels = next_token_logits(model, batch)
        n0 = len(data.examples[0].input_ids)
        alone = model(input_ids=torch.tensor([data.examples[1].input_ids])).logits[0]
    torch.testing.assert_close(packed[0, n0:n0 + alone.shape[0] - 1], alone[:-1])
    assert labels.tolist() == [batch["labels"][0, 1:].tolist()]


def test_a_preference_pairs_rejected_sequence_restarts_its_positions():
    """Its two sequences share a row and never attend to each other: positions 0.. for each."""
    pair = Example(line=0, format="", input_ids=[5, 6, 7, 8, 9], labels=[IGNORE, 6, 7, IGNORE, 9], split=3)
    batch = collate([[pair, _ex([4, 2], 0)]], pad_id=0, device="cpu")
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
