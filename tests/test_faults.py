"""Kill -9 anywhere, for real: named fault points and a seeded random kill loop, for `train` and for `run`.

Every run uses packing, a held-out slice, replay and LoRA with dropout (so a lost RNG state would show). After
each SIGKILL the same command is run again; at the end the weights must equal, bit for bit, those of a run that
was never interrupted, and the trace must show every record trained exactly once.
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections import Counter

import pytest
import torch
from conftest import evertrain, text_rows, write_jsonl
from daemon_helpers import ledger_rows, make_ws
from safetensors.torch import load_file as load_tensors

from evertrain.observe import trace
from evertrain.train import checkpoint

SETTINGS = ("--batch-size", "2", "--gradient-accumulation", "2", "--max-length", "64", "--packing",
            "--held-out-fraction", "0.1", "--replay-fraction", "0.25", "--lora", "--lora-r", "4",
            "--lora-dropout", "0.1", "--learning-rate", "1e-3", "--warmup-steps", "2", "--save-steps", "2",
            "--keep-checkpoints", "2", "--trace")
SIZES = {"a.jsonl": 40, "b.jsonl": 30}
TRAIN_POINTS = ("mid-step", "checkpoint-write", "after-rename")


def make_files(folder):
    folder.mkdir(exist_ok=True)
    return [write_jsonl(folder / name, text_rows(n, name[0])) for name, n in SIZES.items()]


def weights(out) -> dict[str, torch.Tensor]:
    newest = checkpoint.newest_complete(out, warn=lambda _t: None)
    return load_tensors(newest.path / "adapter_model.safetensors")


def assert_same_run(out, reference) -> None:
    a, b = weights(out), weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ from the reference"
    assert trace.coverage(out / "trace.jsonl") == trace.coverage(reference / "trace.jsonl")
    records = [r for r in trace.read(out / "trace.jsonl") if "step" in r]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # committed history only, no gap
    held = {r["file"]: set(r["held_out"]) for r in trace.read(out / "trace.jsonl") if "held_out" in r}
    cov = trace.coverage(out / "trace.jsonl")
    state = checkpoint.newest_complete(out, warn=lambda _t: None).state["evertrain"]
    assert [f["name"] for f in state["files"]] == list(SIZES) and all(f["status"] == "done" for f in state["files"])
    for f, n in zip(state["files"], SIZES.values()):
        counts = cov[f["sha256"]]
        assert set(counts.values()) == {1}, "a record trained twice"
        assert sorted(set(counts) | held.get(f["sha256"], set())) == list(range(n)), "a record never trained"
        assert not set(counts) & held.get(f["sha256"], set()), "a held-out record was trained"


def train_until_done(files, out, model, faults: list[str], extra: tuple = ()) -> list[str]:
    """Train each file in turn; every fault in `faults` kills one attempt. Returns what happened, for messages."""
    log, pending = [], list(faults)
    for f in files:
        while True:
            fault = pending.pop(0) if pending else None
            proc = evertrain("train", "--dataset", f, "--output-dir", out, "--model", model, *SETTINGS, *extra,
                             fault=fault)
            log.append(f"{f.name} {fault}: rc {proc.returncode}")
            if proc.returncode == -signal.SIGKILL:
                assert fault is not None, proc.stderr[-2000:]
                continue
            # 3: the kill came after the file's last checkpoint was in place, so it is already trained.
            assert proc.returncode in (0, 3), (log, proc.stderr[-2000:])
            if proc.returncode == 3 and fault:
                pending.insert(0, fault)  # nothing ran: the fault is still to come, in the next file
            break
    return log


@pytest.fixture(scope="module")
def reference_train(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference-train")
    out = root / "run"
    train_until_done(make_files(root / "data"), out, tiny_model, [])
    return out


@pytest.mark.parametrize("point", TRAIN_POINTS)
def test_train_killed_at_each_fault_point_resumes_to_the_same_weights(tmp_path, tiny_model, reference_train, point):
    out = tmp_path / "run"
    log = train_until_done(make_files(tmp_path / "data"), out, tiny_model, [f"{point}:3", f"{point}:1"])
    assert sum("rc -9" in line for line in log) == 2, log  # both faults really fired
    assert not list(out.glob(".tmp-*")) or checkpoint.newest_complete(out) is not None
    assert_same_run(out, reference_train)


def test_kill_9_inside_an_overlapped_checkpoint_write_resumes_to_the_same_weights(tmp_path, tiny_model,
                                                                                reference_train):
    """The checkpoints a thread writes while training goes on (--overlap-checkpoints on): killed inside the
    write, after its rename, and in the steps it overlaps; the run ends as the reference did, written in step."""
    faults = ["checkpoint-write:2", "after-rename:1", "mid-step:1"]
    log = train_until_done(make_files(tmp_path / "data"), tmp_path / "run", tiny_model, faults,
                           extra=("--overlap-checkpoints", "on"))
    assert sum("rc -9" in line for line in log) == 3, log
    assert_same_run(tmp_path / "run", reference_train)


def test_train_random_kill_loop(tmp_path, tiny_model, reference_train):
    seed = int(os.environ.get("EVERTRAIN_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    faults = [f"{rng.choice(TRAIN_POINTS)}:{rng.randint(1, 6)}" for _ in range(8)]
    print(f"kill loop seed {seed} (rerun with EVERTRAIN_KILL_SEED={seed}): {faults}")
    log = train_until_done(make_files(tmp_path / "data"), tmp_path / "run", tiny_model, faults)
    try:
        assert_same_run(tmp_path / "run", reference_train)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}, {log}: {e}") from e


# ------------------------------------------------------------------------------------------------ the daemon

DAEMON_POINTS = ("mid-step", "checkpoint-write", "after-rename", "before-ledger-done", "enqueue")


def ws_with_files(root, model):
    ws = make_ws(root, model, "--stable-seconds", "0", "--poll-seconds", "0.05", "--disk-margin-bytes", "0",
                 "--no-watch", settings=SETTINGS)
    for f in make_files(root / "data"):
        os.rename(f, ws / "inbox" / f.name)
    return ws


def run_until_done(ws, faults: list[str]) -> list[str]:
    """`run --once` again and again, each try with the next fault, until it ends on its own with all done."""
    log, pending = [], list(faults)
    for _ in range(len(faults) + 2):
        fault = pending.pop(0) if pending else None
        proc = evertrain("run", ws, "--once", fault=fault)
        log.append(f"{fault}: rc {proc.returncode}")
        if proc.returncode == -signal.SIGKILL:
            continue
        assert proc.returncode == 0, (log, proc.stderr[-2000:])
        return log
    raise AssertionError(f"never finished: {log}")


@pytest.fixture(scope="module")
def reference_run(tiny_model, tmp_path_factory):
    ws = ws_with_files(tmp_path_factory.mktemp("reference-run"), tiny_model)
    run_until_done(ws, [])
    return ws


def test_daemon_random_kill_loop(tmp_path, tiny_model, reference_run):
    seed = int(os.environ.get("EVERTRAIN_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    # Every point once, in an order where each is sure to be reached (intake exists only before the files are
    # queued), then more at random while work is left.
    fixed = ["enqueue:2", "before-ledger-done:1", "mid-step:3", "checkpoint-write:1", "after-rename:1"]
    faults = fixed + [f"{rng.choice(DAEMON_POINTS[:-1])}:{rng.randint(1, 3)}" for _ in range(8)]
    print(f"daemon kill loop seed {seed} (rerun with EVERTRAIN_KILL_SEED={seed}): {faults}")
    ws = ws_with_files(tmp_path, tiny_model)
    log = run_until_done(ws, faults)
    try:
        assert [line.split(":")[0] for line in log[:len(fixed)] if "rc -9" in line] == [f.split(":")[0] for f in fixed]
        rows = ledger_rows(ws)
        assert Counter(r["original_name"] for r in rows) == Counter(list(SIZES))  # each file taken once
        assert all(r["state"] == "done" for r in rows)
        assert_same_run(ws / "current_model", reference_run / "current_model")
        assert sorted(p.name.split("-", 1)[1] for p in (ws / "done").iterdir()) == sorted(SIZES)
        assert not list((ws / "inbox").iterdir()) and not [p for p in (ws / "queue").iterdir()]
    except AssertionError as e:
        raise AssertionError(f"seed {seed}, {log}: {e}") from e
    status = json.loads((ws / "status" / "training_status.json").read_text())
    assert status["files_done"] == 2
