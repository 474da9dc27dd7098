"""Runs written by the code before it moved into train/ and observe/ (tests/data/legacy, written by
tools/legacy_fixture.py at commit 5cef5d4) resume with today's code exactly as an uninterrupted run does.

Each was killed at global step 17, in the middle of its second file; its checkpoints are 9 (the first file's end),
12 and 15. Resumed from 15, it must end with the weights, the optimizer, the history and the trace of the same
folder resumed from 9 (the second file trained by today's code alone, uninterrupted): so every piece of the old
state (cursor, progress, RNG, optimizer, held-out slices, anchor, the workspace's ledger) is read as it was meant.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import cli
from safetensors.torch import load_file as load_tensors

from evertrain.observe import trace
from evertrain.train import checkpoint

LEGACY = Path(__file__).parent / "data" / "legacy"


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "legacy"
    shutil.copytree(LEGACY, root)
    monkeypatch.chdir(root)  # the runs name their base model and files by relative paths
    return root


def back_to(folder: Path, step: int) -> None:
    """Remove the checkpoints after `step`, as if the run had been killed just after it."""
    for c in checkpoint.candidates(folder):
        if c.step > step:
            shutil.rmtree(c.path)


def assert_same_end(a: Path, b: Path, step: int) -> None:
    ca, cb = checkpoint.at_step(a, step), checkpoint.at_step(b, step)
    assert ca is not None and cb is not None
    for name in ("model.safetensors",):
        wa, wb = load_tensors(ca.path / name), load_tensors(cb.path / name)
        assert wa.keys() == wb.keys()
        assert all((wa[k] == wb[k]).all() for k in wa), "the resumed weights differ from the uninterrupted ones"
    assert (ca.path / "optimizer.pt").read_bytes() == (cb.path / "optimizer.pt").read_bytes()
    assert timeless(ca.state["evertrain"]["files"]) == timeless(cb.state["evertrain"]["files"])
    assert trace.read(a / "trace.jsonl") == trace.read(b / "trace.jsonl")
    coverage = trace.coverage(a / "trace.jsonl")
    assert [set(c.values()) for c in coverage.values()] == [{1}, {1}]  # every trained line of both files once


def timeless(files: list[dict]) -> list[dict]:
    """The files' records without what the clock decides (the gate's time to measure)."""
    return [dict(f, forgetting=f["forgetting"] and {k: v for k, v in f["forgetting"].items() if k != "seconds"})
            for f in files]


def test_a_train_run_folder_written_before_the_move_resumes_exactly(legacy):
    resumed, whole = legacy / "train-run", legacy / "train-run-from-9"
    assert checkpoint.newest_complete(resumed).step == 15
    shutil.copytree(resumed, whole)
    back_to(whole, 9)
    for out in (resumed, whole):
        assert cli("train", "--dataset", "b.jsonl", "--output-dir", out) == 0
    assert_same_end(resumed, whole, 20)


def test_a_workspace_written_before_the_move_resumes_exactly(legacy):
    from daemon_helpers import by_name

    resumed, whole = legacy / "workspace", legacy / "workspace-from-9"
    shutil.copytree(resumed, whole)
    back_to(whole / "current_model", 9)
    for ws in (resumed, whole):
        assert cli("run", ws, "--once") == 0
        assert {name: r["state"] for name, r in by_name(ws).items()} == {"a.jsonl": "done", "b.jsonl": "done"}
        assert by_name(ws)["b.jsonl"]["first_step"] == 10 and by_name(ws)["b.jsonl"]["last_step"] == 20
    assert_same_end(resumed / "current_model", whole / "current_model", 20)
