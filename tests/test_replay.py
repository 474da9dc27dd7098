"""train/replay.py's pure pieces: where replayed examples go in a step's rows (`place`), how many a step replays
(`rows_at`, `dose`), and the weights that lean toward the file that was forgotten most; and one run that shows a
step with replay feeds no more rows than its own.

    pytest -q tests/test_replay.py
"""

from __future__ import annotations

import json
import random
import types

from evertrain.data import Example
from evertrain.train import replay
from evertrain.train.state import FileRecord, TrainingProgress


def ex(n: int, tag: int = 0) -> Example:
    return Example(line=tag, format="", input_ids=[1] * n, labels=[1] * n)


def lengths(rows) -> list[int]:
    return [sum(len(e.input_ids) for e in row) for row in rows]


def test_replayed_examples_go_into_the_rows_padding_before_rows_of_their_own():
    from evertrain.train.replay import place

    own = [[ex(500)], [ex(300), ex(100)], [ex(480)]]
    a, b, c = ex(40, 1), ex(25, 2), ex(200, 3)
    rows = place(own, [a, b, c], 512)  # rooms left in the file's rows: 12, 112, 32
    assert lengths(rows) == [500, 440, 505, 200]
    placed = [e for row in rows for e in row if e in (a, b, c)]
    assert sorted(map(id, placed)) == sorted(map(id, (a, b, c)))  # each once
    assert all(n <= 512 for n in lengths(rows))
    assert [row[:len(o)] for row, o in zip(rows, own)] == own  # a row's own examples first, in their order
    assert len(rows) == 4 and rows[3] == [c]  # 200 fits no file row (12, 112, 32 left): a row of replay alone
    assert a in rows[1] and b in rows[2]  # 40 and 25 into the fullest rows with room: 112 and 32 left


def test_placing_is_a_pure_function_that_never_moves_the_files_own_examples():
    from evertrain.train.replay import place

    rng = random.Random(7)
    for _ in range(200):
        own = [[ex(rng.randint(1, 256)) for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(1, 8))]
        replayed = [ex(rng.randint(1, 300), 100 + i) for i in range(rng.randint(0, 6))]
        capacity = 512
        first, again = place(own, replayed, capacity), place(own, replayed, capacity)
        assert [[id(e) for e in row] for row in first] == [[id(e) for e in row] for row in again]
        assert [row[:len(o)] for row, o in zip(first, own)] == own
        assert sorted(id(e) for row in first for e in row) == sorted([id(e) for row in own for e in row]
                                                                       + [id(e) for e in replayed])
        added = lengths(first)[len(own):]
        assert all(0 < n <= capacity for n in added)  # rows of replay alone are full as they can be...
        # ...and there is one only when no file row had room for what it holds
        for row in first[len(own):]:
            for e in row:
                assert all(n + len(e.input_ids) > capacity for n in lengths(first[:len(own)]))


def test_a_step_with_replay_feeds_no_more_rows_than_its_own(tmp_path, tiny_model, monkeypatch):
    """Replayed examples ride in the padding of the step's rows: the model sees 4 rows a step, not 4 + replay."""
    from conftest import cli, text_rows, write_jsonl

    from evertrain.observe import trace
    from evertrain.train import objectives

    opts = ("--model", tiny_model, "--batch-size", 4, "--no-packing", "--held-out-fraction", 0, "--trace",
            "--replay-fraction", 0.5, "--anchor-size", 0)
    out = tmp_path / "run"
    assert cli("train", "--dataset", write_jsonl(tmp_path / "a.jsonl", text_rows(8, "a")), "--output-dir", out,
               *opts) == 0
    widths, real = [], objectives.collate

    def collate(rows, pad_id, device):
        widths.append(len(rows))
        return real(rows, pad_id, device)

    monkeypatch.setattr(objectives, "collate", collate)
    assert cli("train", "--dataset", write_jsonl(tmp_path / "b.jsonl", text_rows(8, "b")), "--output-dir", out,
               *opts) == 0
    replayed = [r for r in trace.read(out / "trace.jsonl") if r.get("replay")]
    assert len(replayed) == 2 and all(len(r["replay"]) == 2 for r in replayed)  # half a batch of 4, each step
    assert widths == [4, 4]
    # metrics.jsonl counts the replayed tokens apart, inside each step's tokens (bench/guard.py's dose)
    steps = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [(s["replayed"], s["replay_tokens"] > 0) for s in steps] == [(0, False)] * 2 + [(2, True)] * 2
    assert all(s["replay_tokens"] < s["tokens"] for s in steps)


def test_replay_that_fits_no_rows_padding_runs_as_a_micro_batch_of_its_own(tmp_path, tiny_model, monkeypatch):
    """Rows full to max_length leave no padding: the replayed examples are packed into rows of their own and
    computed apart, not beside the file's rows (where each would be padded to their width)."""
    from conftest import cli, text_rows, write_jsonl

    from evertrain.observe import trace
    from evertrain.train import objectives

    opts = ("--model", tiny_model, "--batch-size", 4, "--no-packing", "--held-out-fraction", 0, "--trace",
            "--replay-fraction", 0.5, "--anchor-size", 0, "--max-length", 8, "--long-text", "truncate")
    out = tmp_path / "run"
    assert cli("train", "--dataset", write_jsonl(tmp_path / "a.jsonl", text_rows(8, "a")), "--output-dir", out,
               *opts) == 0
    shapes, real = [], objectives.collate

    def collate(rows, pad_id, device):
        batch = real(rows, pad_id, device)
        shapes.append(tuple(batch["input_ids"].shape))
        return batch

    monkeypatch.setattr(objectives, "collate", collate)
    assert cli("train", "--dataset", write_jsonl(tmp_path / "b.jsonl", text_rows(8, "b")), "--output-dir", out,
               *opts) == 0
    assert shapes == [(4, 8), (2, 8)] * 2  # each step: the file's 4 full rows, then the 2 replayed ones apart
    replayed = [r for r in trace.read(out / "trace.jsonl") if r.get("replay")]
    assert ([[(mb["index"], len(mb["examples"])) for mb in r["micro_batches"]] for r in replayed]
            == [[(0, 4), (1, 0)]] * 2)
    assert all(len(r["replay"]) == 2 for r in replayed)


def test_replay_dose_is_exact_with_a_floor():
    per_step = 0.3
    assert sum(replay.rows_at(s, per_step, 0) for s in range(1, 101)) == 30
    floor = [replay.rows_at(s, 0.05, 4) for s in range(1, 41)]
    assert sum(floor) >= 10 and all(sum(floor[i:i + 4]) >= 1 for i in range(0, 40, 4))


def test_weighted_replay_leans_toward_the_file_that_rose_most(tmp_path):
    rise = {"files": [{"file": "a", "rise": 0.9}, {"file": "b", "rise": 0.0}], "anchor": None}
    progress = TrainingProgress(files=[FileRecord("c", "c", 1, 1, 1, 1, 1, 1, forgetting=rise)])
    config = types.SimpleNamespace(replay_strategy="weighted")
    items = [("a", None)] * 10 + [("b", None)] * 10
    w = replay.weights(config, progress, items, None)
    assert w[:10].sum() > 5 * w[10:].sum() and w[10:].min() > 0  # b keeps some replay
    config.replay_strategy = "uniform"
    assert replay.weights(config, progress, items, None) is None
