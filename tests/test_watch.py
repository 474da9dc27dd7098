"""Watching it learn: held-out slices and forgetting, evolution snapshots and their budget, replay, metrics."""

import json
import math
import signal
import subprocess
import sys
import time

from conftest import cli, write_jsonl

from evertrain.observe import trace
from evertrain.observe.snapshots import snapshot_budget
from evertrain.train import checkpoint, replay


def qa_rows(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag} question {i}?", "completion": f" {tag} answer {i}"} for i in range(n)]


def test_held_out_slice_is_never_trained_and_is_evaluated_before_and_after(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    opts = ("--model", tiny_model, "--batch-size", 4, "--no-packing", "--trace", "--held-out-fraction", 0.05,
            "--learning-rate", 3e-3)
    for tag in "ab":
        assert cli("train", "--dataset", write_jsonl(tmp_path / f"{tag}.jsonl", qa_rows(tag, 60)), "--output-dir",
                   out, *opts) == 0
    records = trace.read(out / "trace.jsonl")
    held = {r["file"]: set(r["held_out"]) for r in records if "held_out" in r}
    assert len(held) == 2 and all(len(h) == 3 for h in held.values())  # 5% of 60
    for sha, lines in trace.coverage(out / "trace.jsonl").items():
        assert set(lines) == set(range(60)) - held[sha] and set(lines.values()) == {1}
    state = checkpoint.newest_complete(out).state["evertrain"]
    assert [f["expected_steps"] for f in state["files"]] == [math.ceil(57 / 4)] * 2  # held-out lines don't count
    assert [sorted(f["held_out"]) for f in state["files"]] == [sorted(held[f["sha256"]]) for f in state["files"]]

    evals = [json.loads(x) for x in (out / "logs" / "evals.jsonl").read_text().splitlines()]
    a, b = (f["sha256"] for f in state["files"])
    kinds = [(e["before_file"] and "before", e["after_file"] and "after", e["file"]) for e in evals]
    assert kinds == [("before", None, a), (None, "after", a), ("before", None, b), (None, "after", a),
                     (None, "after", b)]
    before_b, after_b = evals[2]["loss"], evals[4]["loss"]
    assert after_b < before_b  # it learned file b
    capsys.readouterr()
    assert cli("report", out) == 0
    text = capsys.readouterr().out
    assert "Forgetting matrix" in text and "a.jsonl" in text and "b.jsonl" in text
    assert f"{evals[3]['loss']:7.3f}" in text  # file a's loss after training b is in the matrix


def test_snapshots_record_guesses_at_file_boundaries_with_bounded_generation(tmp_path, tiny_model):
    out = tmp_path / "run"
    (tmp_path / "run").mkdir()
    write_jsonl(out / "probes.jsonl", [{"prompt": "Where is the probe?", "completion": " Here."}])
    opts = ("--model", tiny_model, "--batch-size", 4, "--no-packing", "--snapshot-budget", 1000,
            "--snapshot-new-tokens", 10000, "--snapshot-seconds", 0.3, "--snapshot-per-file", 2)
    for tag in "ab":
        assert cli("train", "--dataset", write_jsonl(tmp_path / f"{tag}.jsonl", qa_rows(tag, 10)), "--output-dir",
                   out, *opts) == 0
    steps = sorted(int(p.stem.split("-")[1]) for p in (out / "snapshots" / "evolution").glob("step-*.json"))
    assert {1, 3, 4, 6} <= set(steps)  # first and last step of both files (3 steps each)
    snap = json.loads((out / "snapshots" / "evolution" / "step-00000006.json").read_text())
    ids = [e["id"] for e in snap["examples"]]
    assert ids[0] == "probe-0" and len(ids) == 1 + 2 + 2
    probe = snap["examples"][0]
    assert probe["input"].startswith("Where is the probe?") and probe["expected"].startswith(" Here.")
    assert len(probe["tokens"]) == len(" Here.") + 1  # one per target byte, plus the end-of-text token
    assert probe["token_accuracy"] == sum(t["correct"] for t in probe["tokens"]) / len(probe["tokens"])
    assert isinstance(probe["generation"], str)
    # 10000 new tokens asked for, 0.3 s allowed: the wall-clock bound stops it
    assert snap["seconds"] < 0.3 * 2 + 2.0


def test_snapshot_cost_stays_within_the_budget(tmp_path, tiny_model):
    out = tmp_path / "run"
    assert cli("train", "--dataset", write_jsonl(tmp_path / "a.jsonl", qa_rows("a", 120)), "--output-dir", out,
               "--model", tiny_model, "--batch-size", 2, "--no-packing", "--snapshot-budget", 0.03) == 0
    state = checkpoint.newest_complete(out).state
    p, budget = state["evertrain"], snapshot_budget(state)
    costs = [json.loads(s.read_text())["seconds"] for s in (out / "snapshots" / "evolution").glob("*.json")]
    assert budget["taken"] == len(costs) >= 1
    assert budget["skipped"] >= 1  # the schedule backed off
    # Each snapshot is taken only if the spend so far plus its kind's last cost fits the budget; the first of
    # each kind is a measurement (here the file's last step, with generations, is the only one of its kind). Once
    # a snapshot costs more than its kind's last one, the spend is over the budget until training catches up, so
    # the overshoots do not add up: the real share is the budget, plus those first measurements, plus the largest
    # amount by which one snapshot cost more than the last one of its kind (the machine's noise), plus a small
    # constant.
    snaps = sorted((json.loads(s.read_text()) for s in (out / "snapshots" / "evolution").glob("*.json")),
                   key=lambda snap: snap["step"])
    first, last, overshoot = {}, {}, 0.0
    for snap in snaps:
        kind = any(e.get("generation") is not None for e in snap["examples"])
        first.setdefault(kind, snap["seconds"])
        if kind in last:
            overshoot = max(overshoot, snap["seconds"] - last[kind])
        last[kind] = snap["seconds"]
    share, train = budget["seconds"] / p["train_seconds"], p["train_seconds"]
    assert share <= 0.03 + (sum(first.values()) + overshoot) / train + 0.005, (share, first, overshoot, train)


def test_replay_is_deterministic_across_an_interruption_and_never_counts_as_coverage(tmp_path, tiny_model):
    files = [write_jsonl(tmp_path / f"{t}.jsonl", qa_rows(t, n)) for t, n in (("a", 9), ("b", 13), ("c", 80))]
    opts = ["--model", str(tiny_model), "--batch-size", "2", "--no-packing", "--trace", "--replay-fraction", "0.25",
            "--held-out-fraction", "0", "--snapshot-budget", "0"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    for f in files:
        assert cli("train", "--dataset", f, "--output-dir", whole, *opts) == 0
    for f in files[:2]:
        assert cli("train", "--dataset", f, "--output-dir", broken, *opts) == 0
    proc = subprocess.Popen([sys.executable, "-m", "evertrain", "train", "--dataset", str(files[2]),
                             "--output-dir", str(broken), *opts], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (broken / "trace.jsonl").read_text().count('"step"') < 14:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    assert cli("train", "--dataset", files[2], "--output-dir", broken, *opts) == 0

    a, b = trace.read(whole / "trace.jsonl"), trace.read(broken / "trace.jsonl")
    assert a == b
    replays = [(r["file"], tuple(x)) for r in a for x in r.get("replay", [])]
    assert len(replays) >= 10
    shas = [r["file"] for r in a]
    assert {sha for _c, (sha, _l) in replays} >= {replay.ANCHOR, shas[0]}  # the defaults replay the anchor too
    for current, (sha, _line) in replays:
        assert sha == replay.ANCHOR or sha != current and shas.index(sha) < shas.index(current)  # or earlier files
    for counts in trace.coverage(whole / "trace.jsonl").values():
        assert set(counts.values()) == {1}
    files = checkpoint.newest_complete(broken).state["evertrain"]["files"]
    assert [f["replayed"] for f in files] == [sum(len(r.get("replay", [])) for r in a if r["file"] == f["sha256"])
                                              for f in files]


def test_metrics_and_tensorboard_events(tmp_path, tiny_model):
    out = tmp_path / "run"
    assert cli("train", "--dataset", write_jsonl(tmp_path / "a.jsonl", qa_rows("a", 7)), "--output-dir", out,
               "--model", tiny_model, "--batch-size", 2, "--no-packing") == 0
    rows = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm", "tokens_per_second", "examples", "file", "time"} <= set(r) for r in rows)
    events = list((out / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and b"finished a.jsonl" in b"".join(e.read_bytes() for e in events)
