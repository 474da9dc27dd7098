"""Files of judgments in the run: demonstrations, then preference pairs, then rated answers, as one history.

Through the real `evertrain train` and `evertrain run`: every pair and rating trained exactly once by the trace,
one unbroken run of global steps, TRL's metric names per step, held-out accuracy and margin in the forgetting
matrix, the reference taken from the model as each file began (never the base model, never a second copy), kill -9
mid-file resuming bitwise against the stored reference, NaN rollback, the forgetting gate, and two processes.

    pytest -q tests/test_judgments_run.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import break_weights_at, cli, free_port, run_and_kill_after, text_rows, write_jsonl
from daemon_helpers import ThreadDaemon, assert_trained_once, by_name, drop, make_ws, status, wait_for
from safetensors.torch import load_file as load_tensors

from evertrain.files import sha256_file
from evertrain.observe import trace
from evertrain.observe.evals import forgetting_matrix, read_evals, report
from evertrain.observe.metrics import read_committed
from evertrain.runs import open_run
from evertrain.train import checkpoint

LOG2 = math.log(2)
LAUNCH = {"ddp": ("--multi_gpu",), "fsdp2": ("--use_fsdp", "--fsdp_version", "2")}
TRL_NAMES = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}


def pairs(n: int, tag: str = "q") -> list[dict]:
    """Pairs with one lesson to learn (say yes), which held-out pairs then show."""
    return [{"prompt": f"{tag} {i}: is it good?", "chosen": " yes", "rejected": " no"} for i in range(n)]


def rated(n: int, tag: str = "r") -> list[dict]:
    """LLaMA-Factory's KTO shape: a conversation and the rating of its last answer; yes is good, no is bad."""
    return [{"messages": [{"role": "user", "content": f"{tag} {i}: is it good?"},
                          {"role": "assistant", "content": "yes" if i % 2 else "no"}], "label": bool(i % 2)}
            for i in range(n)]


def metrics(out: Path) -> list[dict]:
    """The run's committed history of steps (a step trained again after a kill replaces its first line)."""
    return read_committed(out / "logs" / "metrics.jsonl")


def steps_of(out: Path, name: str) -> list[dict]:
    return [m for m in metrics(out) if m["file_name"] == name]


def assert_each_line_once(out: Path, sizes: dict[str, int]) -> None:
    """One unbroken history of global steps, and each file's lines trained exactly once (held-out ones never)."""
    records = trace.read(out / "trace.jsonl")
    steps = [r["step"] for r in records if "step" in r]
    assert steps == list(range(1, len(steps) + 1))
    held = {r["file"]: set(r["held_out"]) for r in records if "held_out" in r}
    state = checkpoint.newest_complete(out).state["evertrain"]
    coverage = trace.coverage(out / "trace.jsonl")
    for f in state["files"]:
        counts = coverage[f["sha256"]]
        assert set(counts.values()) == {1}, (f["name"], counts)
        assert sorted(set(counts) | held.get(f["sha256"], set())) == list(range(sizes[f["name"]])), f["name"]
        assert not set(counts) & held.get(f["sha256"], set())


def test_demonstrations_then_pairs_then_ratings_are_one_run_with_one_history(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    files = {"a.jsonl": text_rows(24, "a"), "b.jsonl": pairs(32), "c.jsonl": rated(32)}
    common = ("--model", tiny_model, "--output-dir", out, "--batch-size", 4, "--no-packing", "--trace",
              "--held-out-fraction", 0.25, "--held-out-min-file", 1, "--learning-rate", 3e-3, "--warmup-steps", 0,
              "--beta", 0.5, "--snapshot-budget", 100, "--snapshot-per-file", 3)
    for name, rows in files.items():
        assert cli("train", "--dataset", write_jsonl(tmp_path / name, rows), *common) == 0
    said = capsys.readouterr().out
    assert "b.jsonl: 24 preference pairs" in said and "c.jsonl: 24 rated answers" in said

    assert_each_line_once(out, {name: len(rows) for name, rows in files.items()})
    state = checkpoint.newest_complete(out).state["evertrain"]
    assert [(f["name"], f["status"]) for f in state["files"]] == [(n, "done") for n in files]
    # one optimizer across the files: the steps go on from where the last file ended
    first = {name: steps_of(out, name)[0]["step"] for name in files}
    assert first == {"a.jsonl": 1, "b.jsonl": 1 + 5, "c.jsonl": 1 + 5 + 6}
    first_of_c = first["c.jsonl"]
    # TRL's names for what the pairs and ratings say, per step (the default replay adds demonstrations around them)
    assert all(TRL_NAMES <= set(m["objective"]) for m in steps_of(out, "b.jsonl"))
    assert all("kl" in m["objective"] for m in steps_of(out, "c.jsonl"))
    assert not any(m.get("objective") for m in steps_of(out, "a.jsonl"))
    assert steps_of(out, "b.jsonl")[-1]["objective"]["rewards/accuracies"] == 1.0  # it learned to say yes

    # the held-out pairs, never trained, show it too: accuracy and margin in the forgetting matrix
    matrix = forgetting_matrix(read_evals(open_run(out)))
    assert [f["judged"] for f in matrix["files"]] == [False, True, True]
    assert matrix["before_judged"][1] == {"accuracy": 0.0, "margin": 0.0}  # the reference is the model itself
    after_b = next(r for r in matrix["rows"] if r["after_file_name"] == "b.jsonl")
    assert after_b["judged"][1]["accuracy"] == 1.0 and after_b["judged"][1]["margin"] > 0
    assert after_b["cells"][1] < LOG2 < matrix["before"][1] + 1e-6
    after_c = matrix["rows"][-1]
    assert after_c["judged"][2]["accuracy"] == 1.0 and after_c["judged"][0] is None
    text = report(out)
    assert "accuracy   0% -> 100%" in text, text

    # evolution snapshots follow held-out pairs (never trained): their margin over time and the greedy answer
    b_sha = sha256_file(tmp_path / "b.jsonl")
    held_b = next(r["held_out"] for r in trace.read(out / "trace.jsonl") if r.get("file") == b_sha and "held_out" in r)
    seen = [(json.loads(p.read_text())["step"], e) for p in sorted((out / "snapshots" / "evolution").iterdir())
            for e in json.loads(p.read_text())["examples"] if e.get("margin") is not None]
    assert seen and all(e["line"] in held_b for _step, e in seen)
    first = seen[0][1]["id"]  # the first tracked pairs also get a greedy answer (snapshot_generate)
    tracked = [(step, e["margin"], e["generation"]) for step, e in seen if e["id"] == first]
    assert len(tracked) >= 3 and any(g for _s, _m, g in tracked)
    assert tracked[0][0] < first_of_c and tracked[-1][1] > tracked[0][1]  # its margin grew while b trained


@pytest.mark.parametrize("mode", ["--full", "--lora"])
def test_the_reference_is_the_model_as_the_file_began_not_the_base_model(tmp_path, tiny_model, mode):
    """A file's first step sees policy == reference (DPO loss log 2, rewards 0) even after earlier files moved
    the model away from the base: the reference is the run's own past, for full weights and for an adapter."""
    out = tmp_path / "run"
    common = ("--model", tiny_model, "--output-dir", out, mode, "--batch-size", 4, "--no-packing",
              "--held-out-fraction", 0, "--learning-rate", 1e-2, "--replay-fraction", 0, "--no-anchor-replay")
    assert cli("train", "--dataset", write_jsonl(tmp_path / "a.jsonl", text_rows(16, "a")), *common) == 0
    for name, tag in (("b.jsonl", "b"), ("c.jsonl", "c")):
        assert cli("train", "--dataset", write_jsonl(tmp_path / name, pairs(12, tag)), *common) == 0
        first, last = steps_of(out, name)[0], steps_of(out, name)[-1]
        assert first["loss"] == pytest.approx(LOG2, abs=1e-5)
        assert first["objective"]["rewards/chosen"] == pytest.approx(0, abs=1e-5)
        assert last["loss"] < LOG2  # and it learns from there
    # the references live only while their file is open
    assert not any((out / "references").iterdir())


def command(data: Path, out: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "evertrain", "train", "--dataset", str(data), "--output-dir", str(out),
            "--model", str(model), "--batch-size", "2", "--no-packing", "--save-steps", "3", "--trace",
            "--keep-checkpoints", "2", "--learning-rate", "1e-3", "--held-out-fraction", "0.1"]


@pytest.mark.parametrize("shape", ["pairs", "rated"])
def test_kill_9_mid_file_resumes_against_the_stored_reference_to_the_same_weights(tmp_path, tiny_model, shape):
    first = write_jsonl(tmp_path / "first.jsonl", text_rows(12, "f"))
    data = write_jsonl(tmp_path / "data.jsonl", pairs(40) if shape == "pairs" else rated(40))  # 18 steps
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    env = dict(os.environ, PYTHONHASHSEED="0")
    for out in (whole, broken):  # an earlier file, so the reference is not the base model and replay has examples
        subprocess.run(command(first, out, tiny_model), check=True, env=env, capture_output=True)
    subprocess.run(command(data, whole, tiny_model), check=True, env=env, capture_output=True)

    run_and_kill_after(command(data, broken, tiny_model), broken, 6 + 5)
    assert 6 < checkpoint.newest_complete(broken).step < 6 + 18  # really killed mid-file
    [stored] = (broken / "references").glob("*.npy")
    before = stored.read_bytes()
    run_and_kill_after(command(data, broken, tiny_model), broken, 6 + 13)
    done = subprocess.run(command(data, broken, tiny_model), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumes at its step" in done.stdout

    a = load_tensors(checkpoint.newest_complete(whole).path / "model.safetensors")
    b = load_tensors(checkpoint.newest_complete(broken).path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert trace.coverage(broken / "trace.jsonl") == trace.coverage(whole / "trace.jsonl")
    assert_each_line_once(broken, {"first.jsonl": 12, "data.jsonl": 40})
    # the resumed runs read the reference back: the same bytes, nothing recomputed, removed once the file is done
    assert not stored.exists() and len(before) > 40 * 2 * 8
    # what the pairs or ratings said at each step, the same as in the run never killed
    assert [m["objective"] for m in metrics(broken)] == [m["objective"] for m in metrics(whole)]


def test_a_damaged_reference_fails_its_file_once_steps_were_trained_against_it(tmp_path, tiny_model):
    """After a step the model is no longer the reference, so it cannot be computed again: the file fails with the
    reason, and nothing trained before is lost."""
    data, out = write_jsonl(tmp_path / "p.jsonl", pairs(40)), tmp_path / "run"
    run_and_kill_after(command(data, out, tiny_model), out, 5)
    kept = checkpoint.newest_complete(out)
    assert kept.state["evertrain"]["cursors"]
    [stored] = (out / "references").glob("*.npy")
    stored.write_bytes(stored.read_bytes()[:-8] + bytes(8))  # its CRC-32 no longer matches
    again = subprocess.run(command(data, out, tiny_model), capture_output=True, text=True)
    assert again.returncode == 4 and "Traceback" not in again.stderr, again.stderr
    assert ("its reference (the model as it stood when it began, at global step 0) is missing or damaged"
            in again.stderr and "recorded as failed and NOT done" in again.stderr)
    failed = checkpoint.newest_complete(out).state["evertrain"]
    assert failed["global_step"] == kept.step and not failed["cursors"]  # the steps trained are still there
    assert [(f["status"], f["steps"]) for f in failed["files"]] == [("failed", kept.step)]
    # the same command again trains it from its start, against the model as it stands now
    assert subprocess.run(command(data, out, tiny_model), capture_output=True).returncode == 0
    state = checkpoint.newest_complete(out).state["evertrain"]
    assert [f["status"] for f in state["files"]] == ["failed", "done"] and state["global_step"] == kept.step + 18


def test_a_nan_in_a_preference_file_rolls_back_and_the_next_file_trains(tmp_path, tiny_model, monkeypatch, capsys):
    out = tmp_path / "run"
    common = ("--model", tiny_model, "--output-dir", out, "--batch-size", 2, "--no-packing", "--save-steps", 2,
              "--trace", "--held-out-fraction", 0)
    assert cli("train", "--dataset", write_jsonl(tmp_path / "good.jsonl", text_rows(4, "good")), *common) == 0
    poison = write_jsonl(tmp_path / "poison.jsonl", pairs(20))
    break_weights_at(monkeypatch, 3)
    assert cli("train", "--dataset", poison, *common) == 4
    err = capsys.readouterr().err
    assert "loss is nan at global step 6" in err and "rolled back to checkpoint-4 (global step 4)" in err
    monkeypatch.undo()
    assert cli("train", "--dataset", write_jsonl(tmp_path / "after.jsonl", rated(8)), *common) == 0
    assert all(math.isfinite(m["loss"]) for m in steps_of(out, "after.jsonl"))
    state = checkpoint.newest_complete(out).state["evertrain"]
    assert [(f["name"], f["status"]) for f in state["files"]] == [
        ("good.jsonl", "done"), ("poison.jsonl", "failed"), ("after.jsonl", "done")]


def test_the_gate_judges_a_preference_file_by_what_it_does_to_earlier_files(tmp_path, tiny_model, capsys):
    """A pair file that costs the demonstrations before it more than the tolerance is rolled back, as any file."""
    out = tmp_path / "run"
    common = ("--model", tiny_model, "--output-dir", out, "--batch-size", 4, "--no-packing", "--trace",
              "--held-out-fraction", 0.25, "--held-out-min-file", 1, "--warmup-steps", 0, "--replay-fraction", 0,
              "--no-anchor-replay", "--forgetting-action", "rollback", "--forgetting-tolerance", 0.0001)
    assert cli("train", "--dataset", write_jsonl(tmp_path / "a.jsonl", text_rows(24, "a")), *common,
               "--learning-rate", 1e-3) == 0
    before = checkpoint.newest_complete(out)
    a = load_tensors(before.path / "model.safetensors")
    rc = cli("train", "--dataset", write_jsonl(tmp_path / "b.jsonl", pairs(24)), *common, "--learning-rate", 5e-2)
    said = capsys.readouterr()
    assert rc != 0 and "rolled back" in said.out + said.err, said.out + said.err
    state = checkpoint.newest_complete(out).state["evertrain"]
    assert [(f["name"], f["status"]) for f in state["files"]] == [("a.jsonl", "done"), ("b.jsonl", "rejected")]
    b = load_tensors(checkpoint.newest_complete(out).path / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the model is the one before the file


def test_the_daemon_trains_demonstrations_pairs_and_ratings_and_refuses_a_mixed_file(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model)
    mixed = pairs(3) + rated(2)
    files = {"1-demos.jsonl": text_rows(8, "d"), "2-pairs.jsonl": pairs(12), "3-rated.jsonl": rated(12),
             "4-mixed.jsonl": mixed}
    daemon = ThreadDaemon(ws)
    try:
        for name, rows in files.items():
            drop(ws, name, rows)
        wait_for(lambda: len(by_name(ws)) == 4 and all(
            r["state"] in ("done", "failed") for r in by_name(ws).values()), timeout=180, what="all four files")
    finally:
        assert daemon.stop() == 0
    assert_trained_once(ws, {name: len(files[name]) for name in list(files)[:3]})
    row = by_name(ws)["4-mixed.jsonl"]
    assert row["state"] == "failed", row
    assert "lines 4 and 5: a rated answer among preference pairs: a file teaches one way" in row["error"]
    assert "a file teaches one way" in (ws / "failed" / f"{row['name']}.error.txt").read_text()


def test_pause_and_an_urgent_file_inside_a_file_of_pairs_leave_it_exactly_once(tmp_path, tiny_model, monkeypatch):
    """Paused, resumed, then pre-empted by an urgent file of ratings (whose reference is the model mid-pairs):
    the pair file goes on afterwards against its own stored reference and ends with every pair trained once."""
    from test_daemon import slow_steps

    slow_steps(monkeypatch)
    ws = make_ws(tmp_path, tiny_model, "--batch-size", "1")
    daemon = ThreadDaemon(ws)
    try:
        drop(ws, "pairs.jsonl", pairs(40))
        wait_for(lambda: (status(ws).get("file_step") or 0) >= 3, what="the pairs to train")
        assert cli("pause", ws) == 0
        wait_for(lambda: status(ws).get("state") == "paused", what="paused")
        assert by_name(ws)["pairs.jsonl"]["state"] == "queued"
        assert cli("resume", ws) == 0
        wait_for(lambda: (status(ws).get("file_step") or 0) >= 6, what="training to go on")
        urgent = write_jsonl(tmp_path / "urgent.jsonl", rated(6))
        assert cli("add", urgent, ws, "--priority", "urgent") == 0
        wait_for(lambda: len(by_name(ws)) == 2 and all(r["state"] == "done" for r in by_name(ws).values()),
                 timeout=180, what="both done")
    finally:
        assert daemon.stop() == 0
    files = by_name(ws)
    p, u = files["pairs.jsonl"], files[str(urgent)]
    assert p["first_step"] < u["first_step"] <= u["last_step"] < p["last_step"]  # the ratings inside the pairs
    assert_trained_once(ws, {"pairs.jsonl": 40, str(urgent): 6})
    assert not any((ws / "current_model" / "references").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp2"])
def test_two_processes_train_pairs_and_ratings_as_one_process_does(tmp_path, tiny_model, sharding):
    """Each pair stays whole on one process; KTO's KL estimate and the step's means are taken over every
    process, so two processes of 2 rows land where one process of 4 rows does, with the model whole on each
    (DDP) or sharded across them (FSDP2, where every process takes part in every reference forward pass)."""
    files = [write_jsonl(tmp_path / "p.jsonl", pairs(16)), write_jsonl(tmp_path / "k.jsonl", rated(16))]
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK", "WORLD"))}
    common = ("--no-packing", "--trace", "--learning-rate", "1e-3", "--held-out-fraction", "0", "--warmup-steps",
              "0", "--replay-fraction", "0", "--no-anchor-replay", "--model", str(tiny_model))
    for f in files:
        proc = subprocess.run(
            [str(accelerate), "launch", *LAUNCH[sharding], "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
             "-m", "evertrain", "train", "--dataset", str(f), "--output-dir", str(tmp_path / "two"),
             "--batch-size", "2", *common], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert cli("train", "--dataset", f, "--output-dir", tmp_path / "one", "--batch-size", 4, *common) == 0
    two, one = checkpoint.newest_complete(tmp_path / "two"), checkpoint.newest_complete(tmp_path / "one")
    assert two.step == one.step == 8
    a, b = load_tensors(one.path / "model.safetensors"), load_tensors(two.path / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    said = [(m["objective"], o["objective"]) for m, o in zip(metrics(tmp_path / "two"), metrics(tmp_path / "one"))]
    assert len(said) == 8 and any("kl" in two and two["kl"] > 0 for two, _ in said)
    for two, one in said:  # the step's rewards, accuracy, margin and KL: means over both processes' examples
        assert two == pytest.approx(one, rel=1e-4, abs=1e-6)
    for record in (r for r in trace.read(tmp_path / "two" / "trace.jsonl") if "step" in r):
        assert sorted(mb["rank"] for mb in record["micro_batches"]) == [0, 1]
    assert sha256_file(files[0]) in trace.coverage(tmp_path / "two" / "trace.jsonl")
