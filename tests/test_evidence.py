"""The trace is evidence from where the work happens: each micro-batch as it reached the model, on every process.

A loop that drops or repeats a micro-batch must fail the exactly-once check, not pass it on its own say-so.
"""

from __future__ import annotations

import types
from collections import Counter

import pytest
from conftest import cli, text_rows, write_jsonl

from evertrain.observe import trace
from evertrain.train import loop
from evertrain.train.session import RunMismatch
from evertrain.train.setup import keep_global_batch
from evertrain.data import Example

OPTS = ("--batch-size", 2, "--gradient-accumulation", 2, "--no-packing", "--trace", "--held-out-fraction", 0)


def exactly_once(cov: dict, n_lines: int) -> bool:
    (counts,) = cov.values()
    return counts == Counter({line: 1 for line in range(n_lines)})


def test_each_micro_batch_is_recorded_as_it_was_fed(tmp_path, tiny_model):
    out = tmp_path / "run"
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(14))
    assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model, *OPTS) == 0
    records = trace.read(out / "trace.jsonl")
    assert exactly_once(trace.coverage(out / "trace.jsonl"), 14)
    assert [len(r["micro_batches"]) for r in records] == [2, 2, 2, 2]  # 14 rows, 4 per step: the last is partial
    for r in records:
        assert sorted(line for mb in r["micro_batches"] for line in mb["examples"]) == r["examples"]
        assert all(mb["tokens"] > 0 for mb in r["micro_batches"] if mb["examples"])


def test_a_loop_that_drops_a_micro_batch_fails_the_exactly_once_check(tmp_path, tiny_model, monkeypatch):
    real = loop.micro_batches

    def broken(rows, accum, world, rank):  # the second micro-batch of every step never reaches the model
        return ((m, mine) for m, mine in real(rows, accum, world, rank) if m != 1)

    monkeypatch.setattr(loop, "micro_batches", broken)
    out = tmp_path / "run"
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(16))
    assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model, *OPTS) == 0
    cov = trace.coverage(out / "trace.jsonl")
    assert not exactly_once(cov, 16)
    assert len(next(iter(cov.values()))) == 8  # exactly the lines that were fed, no more


def test_a_loop_that_repeats_a_micro_batch_fails_the_exactly_once_check(tmp_path, tiny_model, monkeypatch):
    real = loop.micro_batches

    def repeating(rows, accum, world, rank):
        batches = list(real(rows, accum, world, rank))
        return batches + batches[:1]

    monkeypatch.setattr(loop, "micro_batches", repeating)
    out = tmp_path / "run"
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(16))
    assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model, *OPTS) == 0
    assert not exactly_once(trace.coverage(out / "trace.jsonl"), 16)


# ------------------------------------------------ the loop's pure pieces (and the `loop` pass of `make mutate`)

def _rows(n: int, per_row: int = 1) -> list[list[Example]]:
    return [[Example(line=per_row * i + j, format="", input_ids=[1] * (i + j + 1), labels=[1] * (i + j + 1))
             for j in range(per_row)] for i in range(n)]


@pytest.mark.parametrize("n,accum,world", [(8, 2, 1), (7, 2, 1), (1, 2, 1), (8, 1, 2), (13, 2, 2), (3, 2, 2),
                                           (5, 3, 2)])
def test_micro_batches_deal_every_row_of_a_step_to_exactly_one_process_and_micro_batch(n, accum, world):
    rows = _rows(n)
    dealt = {rank: list(loop.micro_batches(rows, accum, world, rank)) for rank in range(world)}
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


def test_evidence_tells_replayed_examples_from_the_files_own_by_identity():
    own, again = _rows(2, per_row=2), _rows(1)  # again[0][0] has line 0, like own[0][0]
    rows = [own[0], again[0], own[1]]
    ev = loop.evidence(1, 3, rows, {id(again[0][0]): "sha-of-an-earlier-file"})
    assert ev == {"rank": 1, "index": 3, "examples": [0, 1, 2, 3], "replay": [["sha-of-an-earlier-file", 0]],
                  "tokens": sum(len(e.input_ids) for row in rows for e in row)}


def test_a_steps_trace_line_is_built_from_its_micro_batches_evidence(tmp_path):
    accelerator = types.SimpleNamespace(num_processes=1, is_main_process=True)
    log = trace.Trace(tmp_path / "trace.jsonl")
    seen = [{"rank": 0, "index": 0, "examples": [5, 1], "replay": [["b", 3]], "tokens": 9},
            {"rank": 0, "index": 1, "examples": [4], "replay": [["a", 2], ["a", 0]], "tokens": 4}]
    log.step(accelerator, 7, "sha", seen)
    assert trace.read(log.path) == [{
        "step": 7, "file": "sha", "examples": [1, 4, 5],
        "micro_batches": [{"rank": 0, "index": 0, "examples": [5, 1], "tokens": 9},
                          {"rank": 0, "index": 1, "examples": [4], "tokens": 4}],
        "replay": [["a", 0], ["a", 2], ["b", 3]]}]
    log.step(accelerator, 8, "sha", [dict(seen[1], replay=[])])  # no replay: no "replay" key
    assert "replay" not in trace.read(log.path)[-1]
    accelerator.is_main_process = False  # only the main process writes
    log.step(accelerator, 9, "sha", seen)
    assert len(trace.read(log.path)) == 2


def test_the_global_batch_is_kept_at_another_number_of_processes_or_refused_with_what_would_keep_it(tmp_path):
    config = lambda b: types.SimpleNamespace(batch_size=b)  # noqa: E731
    assert keep_global_batch(config(2), 2, 8, tmp_path) == 2
    assert keep_global_batch(config(4), 2, 8, tmp_path) == 1
    assert keep_global_batch(config(1), 1, 8, tmp_path) == 8
    with pytest.raises(RunMismatch) as refused:
        keep_global_batch(config(3), 2, 8, tmp_path)
    assert str(refused.value) == (
        f"{tmp_path} holds a run with a global batch of 8 rows per optimizer step; 2 process(es) x batch_size 3 = 6 "
        "rows per micro-batch round does not divide it, so no gradient accumulation keeps it. With 2 process(es) "
        "use a batch_size of 1, 2, 4, or another number of processes.")
    with pytest.raises(RunMismatch) as refused:
        keep_global_batch(config(1), 3, 8, tmp_path)
    assert str(refused.value).endswith("8 rows cannot be split over 3 processes; use a number of processes that "
                                       "divides 8.")
    with pytest.raises(RunMismatch) as refused:  # each choice times the processes divides the global batch
        keep_global_batch(config(4), 2, 6, tmp_path)
    assert "use a batch_size of 1, 3, or another" in str(refused.value)
    with pytest.raises(RunMismatch) as refused:  # only the last four choices are named
        keep_global_batch(config(7), 1, 48, tmp_path)
    assert "use a batch_size of 12, 16, 24, 48," in str(refused.value)
