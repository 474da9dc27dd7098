"""train/loop.py's pure pieces: how a step's rows are dealt to processes and micro-batches, what each micro-batch
records (the `loop` pass of `make mutate`), and the guards that refuse to call a file done without its steps and its
checkpoint. The loop itself is covered through the CLI: tests/test_train.py, tests/test_evidence.py.

    pytest -q tests/test_loop.py
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from conftest import text_rows, write_jsonl

from evertrain.config import TrainConfig
from evertrain.data import Example, load_file
from evertrain.runs import Run
from evertrain.train import checkpoint, loop
from evertrain.train.setup import setup


def _rows(n: int, per_row: int = 1) -> list[list[Example]]:
    return [[Example(line=per_row * i + j, format="", input_ids=[1] * (i + j + 1), labels=[1] * (i + j + 1))
             for j in range(per_row)] for i in range(n)]


@pytest.mark.parametrize("n,accum,world", [(8, 2, 1), (7, 2, 1), (1, 2, 1), (8, 1, 2), (13, 2, 2), (3, 2, 2),
                                           (5, 3, 2)])
def test_micro_batches_deal_every_row_of_a_step_to_exactly_one_process_and_micro_batch(n, accum, world):
    rows = _rows(n)
    dealt = {rank: list(loop.micro_batches(rows, accum, world, rank, n, 1)) for rank in range(world)}
    seen = [id(row) for batches in dealt.values() for _m, mine in batches for row in mine]
    assert sorted(seen) == sorted(map(id, rows))  # every row once: none dropped, none twice
    for rank, batches in dealt.items():
        for m, mine in batches:  # round-robin: row i goes to micro-batch i // world % accum of rank i % world
            assert all(rows.index(row) % world == rank and rows.index(row) // world % accum == m for row in mine)
        if world > 1:  # every process runs every micro-batch, empty or not: DDP's collectives stay in step
            assert [m for m, _mine in batches] == list(range(accum))
    if world == 1:  # alone, an empty micro-batch is not run
        assert all(mine for _m, mine in dealt[0])
        assert len(dealt[0]) == min(accum, n)


@pytest.mark.parametrize("own,extra,accum,world,per", [(4, 1, 1, 1, 4), (8, 3, 2, 2, 2), (2, 5, 1, 2, 1),
                                                       (4, 1, 2, 2, 1), (4, 0, 2, 1, 2)])
def test_rows_of_replay_alone_get_micro_batches_of_their_own_the_same_count_on_every_process(
        own, extra, accum, world, per):
    """Rows of replay alone (after the file's `own`) never share a micro-batch with the file's rows, which would pad
    them to the file's width; each process runs accum + ceil(extra / (world x per)) micro-batches under a launch."""
    rows = _rows(own + extra)
    dealt = {rank: list(loop.micro_batches(rows, accum, world, rank, own, per)) for rank in range(world)}
    assert sorted(id(row) for b in dealt.values() for _m, mine in b for row in mine) == sorted(map(id, rows))
    n = accum + -(-extra // (world * per))
    for rank, batches in dealt.items():
        for m, mine in batches:
            assert len(mine) <= per
            assert {rows.index(row) < own for row in mine} <= {m < accum}  # the file's rows, or replay's alone
        if world > 1:
            assert [m for m, _mine in batches] == list(range(n))
    if world == 1:
        assert len(dealt[0]) == n


def test_evidence_tells_replayed_examples_from_the_files_own_by_identity():
    own, again = _rows(2, per_row=2), _rows(1)  # again[0][0] has line 0, like own[0][0]
    rows = [own[0], again[0], own[1]]
    ev = loop.evidence(1, 3, rows, {id(again[0][0]): "sha-of-an-earlier-file"})
    assert ev == {"rank": 1, "index": 3, "examples": [0, 1, 2, 3], "replay": [["sha-of-an-earlier-file", 0]],
                  "tokens": sum(len(e.input_ids) for row in rows for e in row)}


def test_guards_refuse_to_call_a_file_done_without_its_steps_and_checkpoint(tmp_path, tiny_model):
    """The checks home-made systems lacked, on results that really happened, then on broken ones."""
    out = tmp_path / "run"
    session = setup(TrainConfig(model=str(tiny_model), batch_size=2, packing=False), Run.at(out))
    data = load_file(write_jsonl(tmp_path / "a.jsonl", text_rows(5)), session.tokenizer, session.config)
    result = loop.drive(loop.fit(session, data), lambda _record: None)
    assert loop.guard_problems(session, result) == []
    zero = dataclasses.replace(result, steps=0, step_after=result.step_before)
    assert any("no optimizer step" in p for p in loop.guard_problems(session, zero))
    short = dataclasses.replace(result, file_step=result.expected_steps - 1)
    assert any("expected 3" in p for p in loop.guard_problems(session, short))
    stalled = dataclasses.replace(result, step_after=result.step_before + 1)
    assert any("global step went 0 -> 1 for 3 steps" in p for p in loop.guard_problems(session, stalled))
    shutil.rmtree(checkpoint.final_path(out, 3))
    assert any("no complete checkpoint for global step 3" in p for p in loop.guard_problems(session, result))
