"""The forgetting guard (gate.py, anchor.py, replay.py) through the real `evertrain train` and `evertrain run`.

A file built to destroy an earlier one (the same prompts, contradicting answers) must trip the gate; rollback
must give back the exact state before it; retry must train it again with a stronger dose; alert must only record.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONTRADICTING, OLD, OTHER, cli, write_jsonl
from daemon_helpers import by_name, drop, make_ws
from evertrain import exits
from evertrain.observe import anchor
from evertrain.runs import Run
from evertrain.train import checkpoint, replay
from evertrain.train.state import TrainingProgress

# Without the default replay and anchor replay: a contradicting file must surely trip the gate, and each test turns
# on the protection it is about.
OPTIONS = ("--batch-size", "4", "--no-packing", "--epochs", "6", "--learning-rate", "3e-3", "--warmup-steps", "0",
           "--held-out-fraction", "0.2", "--trace", "--save-steps", "4", "--keep-checkpoints", "1",
           "--replay-fraction", "0", "--no-anchor-replay")


def train(tmp_path: Path, model: Path, name: str, rows: list[dict], *extra) -> int:
    data = write_jsonl(tmp_path / name, rows)
    return cli("train", "--dataset", data, "--output-dir", tmp_path / "run", "--model", model, *OPTIONS, *extra)


def newest(run: Path) -> checkpoint.Checkpoint:
    return checkpoint.newest_complete(run)


def tensors(ckpt: Path, name: str) -> dict:
    if name.endswith(".safetensors"):
        return load_file(ckpt / name)
    return torch.load(ckpt / name, weights_only=True)


def progress(run: Path) -> TrainingProgress:
    return TrainingProgress.from_state_dict(newest(run).state["evertrain"])


def metric_steps(run: Path, sha: str) -> list[dict]:
    return [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()
            if json.loads(x).get("file") == sha]


def trained_lines(run: Path) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for line in (run / "trace.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "step" in rec:
            out.setdefault(rec["file"], Counter()).update(rec["examples"])
    return out


def test_rollback_restores_the_checkpoint_before_the_file_bitwise_and_rejects_it(tmp_path, tiny_model, capsys):
    run = tmp_path / "run"
    assert train(tmp_path, tiny_model, "old.jsonl", OLD, "--forgetting-action", "rollback") == exits.OK
    before = newest(run)
    weights, moments = tensors(before.path, "model.safetensors"), tensors(before.path, "optimizer.pt")
    capsys.readouterr()

    assert train(tmp_path, tiny_model, "new.jsonl", CONTRADICTING, "--forgetting-action", "rollback") == exits.REJECTED
    err = capsys.readouterr().err
    assert "REJECTED by the forgetting gate" in err and "old.jsonl's loss" in err

    after = newest(run)
    assert after.step == before.step and after.name == before.name  # no checkpoint of the undone file is left
    assert [c.step for c in checkpoint.candidates(run)] == [before.step]
    now = tensors(after.path, "model.safetensors")
    assert now.keys() == weights.keys() and all(torch.equal(now[k], weights[k]) for k in weights)
    state = tensors(after.path, "optimizer.pt")["state"]
    assert all(torch.equal(state[i][k], moments["state"][i][k]) for i in moments["state"] for k in ("exp_avg",
                                                                                                      "exp_avg_sq"))
    rec = progress(run).files[-1]
    assert (rec.name, rec.status, rec.steps) == ("new.jsonl", "rejected", 0)
    verdict = rec.forgetting
    assert verdict["tripped"] and verdict["action"] == "rollback" and verdict["attempt"] == 1
    old = next(f for f in verdict["files"] if f["file_name"] == "old.jsonl")
    assert old["after"] > old["before"] * 1.25 and old["over"]
    # The trace holds the committed history only: none of the undone steps, every old line once per epoch.
    coverage = trained_lines(run)
    assert set(coverage) == {progress(run).files[0].sha256}
    assert set(Counter(coverage[progress(run).files[0].sha256].values())) == {6}

    # The run goes on from there: another file trains and is done, at the global step after the old file.
    assert train(tmp_path, tiny_model, "other.jsonl", OTHER, "--forgetting-action", "rollback") == exits.OK
    p = progress(run)
    assert [(f.name, f.status) for f in p.files] == [("old.jsonl", "done"), ("new.jsonl", "rejected"),
                                                     ("other.jsonl", "done")]
    assert p.files[2].first_step == p.files[0].last_step + 1

    # The lineage (and so every exported model card) says what the gate did, and why.
    capsys.readouterr()
    assert cli("lineage", run, "--json") == exits.OK
    gate = {f["name"]: f["forgetting_gate"] for f in json.loads(capsys.readouterr().out)["files"]}
    assert gate["new.jsonl"]["tripped"] and gate["new.jsonl"]["action"] == "rollback"
    assert gate["new.jsonl"]["rises"]["old.jsonl"] > 0.25 and not gate["other.jsonl"]["tripped"]
    assert cli("lineage", run) == exits.OK
    card = capsys.readouterr().out
    assert "## Forgetting gate" in card and "new.jsonl: rejected: rolled back; forgetting: raised old.jsonl" in card


def test_the_anchor_alone_trips_the_gate(tmp_path, tiny_model, capsys):
    """No held-out slices, so no earlier file's loss exists: only the anchor (the base model's own answers to the
    first file's prompts) can tell that the second file wrecked what the base model knew."""
    run, none_held_out = tmp_path / "run", ("--held-out-fraction", "0")
    # The first file barely moves the model: the anchor stays where the base model left it.
    assert train(tmp_path, tiny_model, "old.jsonl", OLD, *none_held_out, "--learning-rate", "1e-5") == exits.OK
    sources = {item["source"] for item in json.loads((run / "anchor.json").read_text())["items"]}
    assert sources == {progress(run).files[0].sha256}  # none from the file judged next: the gate keeps them all
    capsys.readouterr()
    assert train(tmp_path, tiny_model, "new.jsonl", CONTRADICTING, *none_held_out,
                 "--forgetting-action", "rollback") == exits.REJECTED
    assert "raised the anchor's loss" in capsys.readouterr().err
    rec = progress(run).files[-1]
    assert (rec.name, rec.status, rec.steps) == ("new.jsonl", "rejected", 0)
    verdict = rec.forgetting
    assert verdict["tripped"] and verdict["files"] == []
    assert verdict["anchor"]["over"] and verdict["anchor"]["rise"] > verdict["tolerance"]
    assert verdict["reason"].startswith("forgetting: raised the anchor's loss")


def test_retry_trains_again_once_then_rejects(tmp_path, tiny_model):
    run = tmp_path / "run"
    assert train(tmp_path, tiny_model, "old.jsonl", OLD, "--forgetting-action", "retry") == exits.OK
    # A boost of 1 and no replay: the retry trains exactly as the first attempt did, so it fails the same way.
    assert train(tmp_path, tiny_model, "new.jsonl", CONTRADICTING, "--forgetting-action", "retry",
                 "--retry-replay-boost", "1") == exits.REJECTED
    p = progress(run)
    rec = p.files[-1]
    assert rec.status == "rejected" and rec.forgetting["attempt"] == 2 and rec.forgetting["tripped"]
    steps = metric_steps(run, rec.sha256)
    total = len(steps) // 2
    assert total == 48 and [s["step"] for s in steps[:total]] == [s["step"] for s in steps[total:]]
    assert [s["loss"] for s in steps[:total]] == [s["loss"] for s in steps[total:]]  # from the same state
    assert newest(run).step == p.files[0].last_step
    assert [c.step for c in checkpoint.candidates(run)] == [p.files[0].last_step]


def test_retry_with_a_stronger_dose_passes_with_every_own_line_once_and_replay_apart(tmp_path, tiny_model):
    run = tmp_path / "run"
    assert train(tmp_path, tiny_model, "old.jsonl", OLD, "--forgetting-action", "retry") == exits.OK
    assert train(tmp_path, tiny_model, "new.jsonl", CONTRADICTING, "--forgetting-action", "retry") == exits.OK
    p = progress(run)
    rec = p.files[-1]
    assert rec.status == "done" and rec.forgetting["attempt"] == 2 and not rec.forgetting["tripped"]
    steps = metric_steps(run, rec.sha256)
    first, second = steps[:len(steps) // 2], steps[len(steps) // 2:]
    assert [s["step"] for s in first] == [s["step"] for s in second]  # the same global steps, trained again
    assert sum(s["replayed"] for s in first) == 0  # replay is off in this run...
    assert sum(s["replayed"] for s in second) >= len(second) // 4  # ...the retry's floor alone: a row / 4 steps
    coverage = trained_lines(run)
    for f in p.files:
        counts = coverage[f.sha256]
        assert set(counts.values()) == {6} and not set(counts) & set(f.held_out)
        assert len(counts) == f.examples
    replayed = [pair for line in (run / "trace.jsonl").read_text().splitlines()
                for pair in json.loads(line).get("replay", [])]
    assert replayed and {src for src, _n in replayed} == {p.files[0].sha256, replay.ANCHOR}
    assert rec.replayed == len(replayed) == sum(s["replayed"] for s in second)


def test_alert_only_records(tmp_path, tiny_model, capsys):
    run = tmp_path / "run"
    assert train(tmp_path, tiny_model, "old.jsonl", OLD) == exits.OK  # alert is the default action
    before = newest(run)
    head = tensors(before.path, "model.safetensors")["lm_head.weight"]
    capsys.readouterr()
    assert train(tmp_path, tiny_model, "new.jsonl", CONTRADICTING) == exits.OK
    assert "ALERT: forgetting: raised old.jsonl's loss" in capsys.readouterr().err
    p = progress(run)
    rec = p.files[-1]
    assert rec.status == "done" and rec.forgetting["tripped"] and rec.forgetting["action"] == "alert"
    assert newest(run).step == before.step + rec.steps
    assert not torch.equal(tensors(newest(run).path, "model.safetensors")["lm_head.weight"], head)


def test_gate_off_records_no_verdict_and_without_anchor_replay_makes_no_anchor_set(tmp_path, tiny_model, capsys):
    rehearse = ("--forgetting-action", "off", "--anchor-replay")
    assert train(tmp_path, tiny_model, "old.jsonl", OLD, *rehearse) == exits.OK
    assert (tmp_path / "run" / "anchor.json").exists()  # anchor replay rehearses it
    assert train(tmp_path, tiny_model, "new.jsonl", CONTRADICTING, *rehearse) == exits.OK
    assert [f.forgetting for f in progress(tmp_path / "run").files] == [None, None]
    # Nothing uses an anchor set (no gate, no anchor replay): none is made (the base model answers nothing) and
    # none is measured.
    capsys.readouterr()
    off = tmp_path / "off"
    off.mkdir()
    for name, rows in (("old.jsonl", OLD), ("new.jsonl", CONTRADICTING)):
        assert train(off, tiny_model, name, rows, "--forgetting-action", "off", "--no-anchor-replay") == exits.OK
    assert not (off / "run" / "anchor.json").exists() and not (off / "run" / "logs" / "anchor.jsonl").exists()
    assert "anchor set" not in capsys.readouterr().out


def test_anchor_is_built_once_deterministically_and_measures_drift(tmp_path, tiny_model, monkeypatch):
    measured, real = [], anchor.Anchor.measure
    monkeypatch.setattr(anchor.Anchor, "measure", lambda self, model: measured.append(1) or real(self, model))
    for name in ("a", "b"):
        sub = tmp_path / name
        sub.mkdir()
        assert train(sub, tiny_model, "old.jsonl", OLD) == exits.OK
    # Once where the drift plot starts (the gate's baseline is that same measurement), once after the file.
    assert len(measured) == 2 * 2
    first = (tmp_path / "a" / "run" / "anchor.json").read_bytes()
    assert json.loads(first)["built_at_step"] == 0
    items = json.loads(first)["items"]
    assert len(items) == 16 and all(len(i["top_ids"]) == sum(x != -100 for x in i["labels"]) for i in items)
    # Another run from the same base and file: the same anchor (greedy answers, a fixed choice of prompts).
    assert json.loads((tmp_path / "b" / "run" / "anchor.json").read_bytes())["items"] == items
    # A restart (the next file) reads it back; nothing is rebuilt.
    assert train(tmp_path / "a", tiny_model, "other.jsonl", OTHER) == exits.OK
    assert (tmp_path / "a" / "run" / "anchor.json").read_bytes() == first
    drift = anchor.read_log(Run.at(tmp_path / "a" / "run"))
    assert [(d["step"], d["after_file_name"]) for d in drift] == [(0, None), (48, "old.jsonl"), (96, "other.jsonl")]
    assert drift[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the base model, measured against itself
    assert all(d["kl"] > 0 and d["loss"] > drift[0]["loss"] for d in drift[1:])


def test_daemon_rejects_a_destroying_file_into_rejected_and_goes_on(tmp_path, tiny_model, capsys):
    ws = make_ws(tmp_path, tiny_model, "--forgetting-action", "rollback", "--held-out-fraction", "0.2",
                 "--epochs", "6", "--learning-rate", "3e-3", "--replay-fraction", "0", "--no-anchor-replay")
    drop(ws, "1-old.jsonl", OLD)
    assert cli("run", ws, "--once") == exits.OK
    drop(ws, "2-new.jsonl", CONTRADICTING)
    drop(ws, "3-other.jsonl", OTHER)
    assert cli("run", ws, "--once") == exits.OK
    rows = by_name(ws)
    assert [rows[n]["state"] for n in ("1-old.jsonl", "2-new.jsonl", "3-other.jsonl")] == ["done", "rejected",
                                                                                           "done"]
    rejected = rows["2-new.jsonl"]
    assert json.loads(rejected["forgetting"])["tripped"] and "1-old.jsonl's loss" in rejected["error"]
    assert (ws / "rejected" / rejected["name"]).is_file()
    assert "forgetting gate" in (ws / "rejected" / f"{rejected['name']}.error.txt").read_text()
    status = json.loads((ws / "status" / "training_status.json").read_text())
    assert status["files_rejected"] == 1 and status["files_done"] == 2
    assert rows["3-other.jsonl"]["first_step"] == rows["1-old.jsonl"]["last_step"] + 1
    capsys.readouterr()
    assert cli("status", ws) == exits.OK
    shown = capsys.readouterr().out
    counted = next(line for line in shown.splitlines() if "files_rejected" in line)
    assert counted.split("files_rejected")[1].strip(" │|").split()[0] == "1"
    assert any("2-new.jsonl" in line and "rejected" in line for line in shown.splitlines())
