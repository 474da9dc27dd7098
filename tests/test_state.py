"""train/state.py: TrainingProgress round trips through a checkpoint's state, and a state written before the
forgetting gate loads as a first attempt (the `resume` pass of `make mutate`).

    pytest -q tests/test_state.py
"""

from __future__ import annotations

import json

from evertrain.config import TrainConfig
from evertrain.train.state import FileCursor, FileRecord, TrainingProgress


def record(sha, status="done", steps=3):
    return FileRecord(sha256=sha, name=f"{sha}.jsonl", examples=6, tokens=60, steps=steps, expected_steps=3,
                      first_step=1, last_step=3, status=status, replayed=1, held_out=[2])


def test_progress_round_trips_through_the_checkpoint_state_and_finds_finished_files():
    progress = TrainingProgress(global_step=7, tokens_seen=70, current="c",
                                cursors={"c": FileCursor("c", "c.jsonl", 2, 5, 6, {"global_batch": 2}, 1)},
                                files=[record("a", "failed", 1), record("a"), record("b", "skipped", 0)],
                                decay_start=5, decay_steps=2)
    saved = json.loads(json.dumps(progress.state_dict()))  # what trainer_state.json holds
    assert saved["cursors"]["c"]["file_step"] == 2 and saved["files"][1]["status"] == "done"
    back = TrainingProgress.from_state_dict(saved)
    assert back == progress and isinstance(back.cursors["c"], FileCursor) and isinstance(back.files[0], FileRecord)
    assert saved["files"][0] == {**record("a", "failed", 1).__dict__}  # the caller's dict is left as it was
    assert back.finished("a") is back.files[1]
    assert back.finished("b") is None and back.finished("c") is None
    back.files.append(record("a", steps=2))
    assert back.finished("a").steps == 2  # the last done record of it
    assert TrainingProgress.from_state_dict({"global_step": 3}) == TrainingProgress(global_step=3)


def test_the_accepted_file_is_the_newest_done_one_the_gate_did_not_trip_on():
    """What `serve` serves and retention never deletes: the model after the newest file that finished and passed
    the gate (or had none)."""
    tripped = dict(record("d").__dict__, forgetting={"tripped": True, "action": "alert"})
    passed = dict(record("b").__dict__, forgetting={"tripped": False})
    progress = TrainingProgress(files=[record("a"), FileRecord(**passed), record("c", "rejected"),
                                       FileRecord(**tripped), record("e", "failed", 1), record("f", "skipped", 0)])
    assert progress.accepted() is progress.files[1]
    progress.files.append(record("g"))  # no gate: accepted once done
    assert progress.accepted() is progress.files[-1]
    assert TrainingProgress(files=[record("c", "rejected"), FileRecord(**tripped)]).accepted() is None
    assert TrainingProgress().accepted() is None


def test_a_cursor_and_record_saved_before_the_forgetting_gate_load_as_a_first_attempt_at_the_plain_dose():
    """A checkpoint written before the gate existed has none of its keys: its open file is a first attempt (a retry
    is still allowed), replayed at the plain dose, with no baseline (the gate then has no verdict), and its
    finished files have no verdict (so weighted replay has nothing to lean on)."""
    from evertrain.observe import gate
    from evertrain.train import replay

    old_cursor = {"sha256": "c", "name": "c.jsonl", "file_step": 2, "total_steps": 5, "first_step": 6,
                  "settings": {}, "replayed": 0}
    old_record = {k: v for k, v in record("a").__dict__.items() if k != "forgetting"}
    back = TrainingProgress.from_state_dict({"global_step": 7, "cursors": {"c": old_cursor}, "files": [old_record]})
    cursor = back.cursors["c"]
    assert (cursor.attempt, cursor.replay_boost, cursor.gate_before, cursor.forgot) == (1, 1.0, None, None)
    assert back.files[0].forgetting is None and gate.last_rises(back, cursor) == {}
    cfg = TrainConfig(replay_fraction=0.1)
    assert replay.dose(cfg, cursor.replay_boost) == 0.1
    assert replay.dose(cfg, 4.0) == 0.4 and replay.dose(TrainConfig(replay_fraction=0.0), 4.0) == 0.2
