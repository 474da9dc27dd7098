"""Runs written by the code before it moved into train/ and observe/ (tests/data/legacy, written by
tools/legacy_fixture.py at commit 5cef5d4) resume with today's code exactly as an uninterrupted run does.

Each was killed at global step 17, in the middle of its second file; its checkpoints are 9 (the first file's end),
12 and 15. Resumed from 15, it must end with the weights, the optimizer, the history and the trace of the same
folder resumed from 9 (the second file trained by today's code alone, uninterrupted): so every piece of the old
state (cursor, progress, RNG, optimizer, held-out slices, anchor, the workspace's ledger) is read as it was meant.
(Bitwise on a machine like the one that wrote the fixture; within float rounding on others: WEIGHTS_ATOL below.)
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


# Steps 10 to 15 of the folder resumed from 15 were computed where the fixture was written; the folder resumed from
# 9 computes them here. On a CPU whose kernels round differently the two then differ by float rounding (1e-8 in
# the weights on one such machine), while a piece of state read wrongly (a moment of AdamW, the schedule, the
# cursor) moves them by the size of a step's update (1e-3 here). Bitwise on the machine that wrote the fixture;
# within these bounds, 100 times the rounding and 1,000 times below a step, anywhere.
WEIGHTS_ATOL = 1e-6
OPTIMIZER_RTOL = 1e-5


def assert_same_end(a: Path, b: Path, step: int) -> None:
    import torch

    ca, cb = checkpoint.at_step(a, step), checkpoint.at_step(b, step)
    assert ca is not None and cb is not None
    wa, wb = load_tensors(ca.path / "model.safetensors"), load_tensors(cb.path / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= WEIGHTS_ATOL, f"the resumed weights differ from the uninterrupted ones (by up to {worst:.2e})"
    oa, ob = (torch.load(c.path / "optimizer.pt", weights_only=False) for c in (ca, cb))
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for key, state in oa["state"].items():
        assert state.keys() == ob["state"][key].keys()
        for name, value in state.items():
            other = ob["state"][key][name]
            if name == "step" or not torch.is_tensor(value):
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (key, name)
            else:
                scale = value.abs().max().item() or 1.0
                assert (value - other).abs().max().item() <= OPTIMIZER_RTOL * scale, (key, name)
    assert_alike(timeless(ca.state["evertrain"]["files"]), timeless(cb.state["evertrain"]["files"]))
    assert_alike(trace.read(a / "trace.jsonl"), trace.read(b / "trace.jsonl"))
    coverage = trace.coverage(a / "trace.jsonl")
    assert [set(c.values()) for c in coverage.values()] == [{1}, {1}]  # every trained line of both files once


def assert_alike(x, y, where: str = "") -> None:
    """Equal, but for measured numbers (losses, drifts), which may differ by the rounding above."""
    if isinstance(x, dict) and isinstance(y, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            assert_alike(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list | tuple) and isinstance(y, list | tuple):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_alike(u, v, f"{where}[{i}]")
    elif isinstance(x, float) and isinstance(y, float):
        assert x == pytest.approx(y, rel=OPTIMIZER_RTOL, abs=WEIGHTS_ATOL), where
    else:
        assert x == y, where


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
