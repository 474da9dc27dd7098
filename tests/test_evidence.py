"""The trace is evidence from where the work happens: each micro-batch as it reached the model, on every process.

A loop that drops or repeats a micro-batch must fail the exactly-once check, not pass it on its own say-so.
"""

from __future__ import annotations

from collections import Counter

from conftest import cli, text_rows, write_jsonl

from evertrain.observe import trace
from evertrain.train import loop

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

    def broken(*args):  # the second micro-batch of every step never reaches the model
        return ((m, mine) for m, mine in real(*args) if m != 1)

    monkeypatch.setattr(loop, "micro_batches", broken)
    out = tmp_path / "run"
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(16))
    assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model, *OPTS) == 0
    cov = trace.coverage(out / "trace.jsonl")
    assert not exactly_once(cov, 16)
    assert len(next(iter(cov.values()))) == 8  # exactly the lines that were fed, no more


def test_a_loop_that_repeats_a_micro_batch_fails_the_exactly_once_check(tmp_path, tiny_model, monkeypatch):
    real = loop.micro_batches

    def repeating(*args):
        batches = list(real(*args))
        return batches + batches[:1]

    monkeypatch.setattr(loop, "micro_batches", repeating)
    out = tmp_path / "run"
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(16))
    assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model, *OPTS) == 0
    assert not exactly_once(trace.coverage(out / "trace.jsonl"), 16)
