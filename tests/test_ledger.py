"""daemon/ledger.py at the unit level: `Ledger.reconcile` makes every file agree with the checkpoint, `place` moves
a file into the folder of its state (the `ledger` pass of `make mutate`), an older ledger gets its new columns, and
only deaths count as attempts at preparing a file. A real ledger and workspace; nothing trains. The repair of a
damaged ledger through the CLI: tests/test_ledger_repair.py.

    pytest -q tests/test_ledger.py
"""

from __future__ import annotations

import pytest

from evertrain.data import DataError
from evertrain.train import checkpoint


def ledger_ws(tmp_path):
    from evertrain.daemon.ledger import Ledger
    from evertrain.daemon.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    for folder in ("queue", "done", "failed", "current_model"):
        (ws.root / folder).mkdir(parents=True)
    return ws, Ledger(ws.ledger_path)


def file_row(ws, ledger, sha, state, folder, **values):
    file_id = ledger.add_file(f"{sha}.jsonl", sha256=sha, size=10)
    name = f"{file_id:06d}-{sha}.jsonl"
    (ws.root / folder / name).write_text("{}\n")
    ledger.update(file_id, name=name, state=state, **values)
    return file_id


def progress_record(sha, status="done", **values):
    from evertrain.train.state import FileRecord

    return FileRecord(**dict(dict(sha256=sha, name=f"{sha}.jsonl", examples=4, tokens=40, steps=2, expected_steps=2,
                                  first_step=3, last_step=4, status=status, replayed=1), **values))


def test_reconcile_makes_every_file_agree_with_the_checkpoint(tmp_path):
    from evertrain.train.state import FileCursor, TrainingProgress

    ws, ledger = ledger_ws(tmp_path)
    ids = {
        "finished": file_row(ws, ledger, "finished", "training", "queue", progress_index=1),
        "failed": file_row(ws, ledger, "failed", "training", "queue", progress_index=1),
        "part": file_row(ws, ledger, "part", "training", "queue", steps_trained=9, first_step=1),
        "waiting": file_row(ws, ledger, "waiting", "queued", "queue", steps_trained=5, first_step=2),
        "unstarted": file_row(ws, ledger, "unstarted", "training", "queue", steps_trained=4, first_step=2),
        "lost": file_row(ws, ledger, "lost", "done", "done", steps_trained=2, first_step=3, last_step=4,
                         finished_at=1.0, progress_index=0),
        "kept": file_row(ws, ledger, "kept", "done", "done", steps_trained=2, first_step=3, last_step=4,
                         finished_at=1.0, progress_index=None),
        "earlier": file_row(ws, ledger, "earlier", "training", "queue", progress_index=2),
        "onlyfailed": file_row(ws, ledger, "onlyfailed", "done", "done", progress_index=0, steps_trained=1),
        "bad": file_row(ws, ledger, "bad", "failed", "failed", steps_trained=1),
    }
    progress = TrainingProgress(global_step=12, files=[
        progress_record("kept"), progress_record("earlier"),  # "earlier": an older training of the same content
        progress_record("finished", steps=1), progress_record("finished", first_step=5, last_step=6),
        progress_record("failed", "failed", steps=1, first_step=7, last_step=7),
        progress_record("onlyfailed", "failed")],
        cursors={"part": FileCursor("part", "part.jsonl", 3, 8, 9), "waiting": FileCursor("waiting", "w", 0, 8, 11)})
    said = []
    checkpoint.temp_path(ws.model_dir, 12).mkdir()
    checkpoint.commit(checkpoint.temp_path(ws.model_dir, 12), {"global_step": 12})
    ledger.reconcile(ws, progress, said.append)
    row = {k: ledger.get(i) for k, i in ids.items()}
    got = {k: (r["state"], r["steps_trained"], r["first_step"], r["last_step"]) for k, r in row.items()}
    assert got == {"finished": ("done", 2, 5, 6), "failed": ("failed", 1, 7, 7), "part": ("queued", 3, 9, None),
                   "waiting": ("queued", 0, None, None), "unstarted": ("queued", 0, None, None),
                   "lost": ("queued", 0, None, None), "kept": ("done", 2, 3, 4), "earlier": ("queued", 0, None, None),
                   "onlyfailed": ("queued", 0, None, None), "bad": ("failed", 1, None, None)}
    assert row["finished"]["replayed"] == 1 and row["finished"]["finished_at"] > 1.0
    assert row["lost"]["finished_at"] is None and row["kept"]["finished_at"] == 1.0
    folder = {"done": "done", "failed": "failed", "queued": "queue"}
    for k, r in row.items():
        assert [f.name for f in (ws.root / folder[r["state"]]).iterdir() if f.name == r["name"]] == [r["name"]], k
    assert said == ["evertrain: ledger: 000001-finished.jsonl finished as done before the restart",
                    "evertrain: ledger: 000002-failed.jsonl finished as failed before the restart",
                    "evertrain: ledger: 000006-lost.jsonl was done after a checkpoint that no longer verifies; queued again",
                    "evertrain: ledger: 000009-onlyfailed.jsonl was done after a checkpoint that no longer verifies; "
                    "queued again"]
    assert [(c["step"], c["name"]) for c in ledger.checkpoints()] == [(12, "checkpoint-12")]
    ledger.close()


def test_place_moves_a_file_into_the_folder_of_its_state(tmp_path):
    from evertrain.daemon.workspace import place

    ws, ledger = ledger_ws(tmp_path)
    assert place(ws, None) is None and place(ws, {"name": None, "state": "done"}) is None
    (ws.root / "failed" / "1-a.jsonl").write_text("a")
    assert place(ws, {"name": "1-a.jsonl", "state": "queued"}) == ws.root / "queue" / "1-a.jsonl"
    assert (ws.root / "queue" / "1-a.jsonl").read_text() == "a" and not (ws.root / "failed" / "1-a.jsonl").exists()
    assert place(ws, {"name": "1-a.jsonl", "state": "training"}) == ws.root / "queue" / "1-a.jsonl"
    assert place(ws, {"name": "1-a.jsonl", "state": "skipped"}) == ws.root / "done" / "1-a.jsonl"
    assert place(ws, {"name": "1-a.jsonl", "state": "failed"}) == ws.root / "failed" / "1-a.jsonl"
    assert sorted(p.relative_to(ws.root).as_posix() for p in ws.root.rglob("1-a*")) == ["failed/1-a.jsonl"]
    (ws.root / "done" / "2-b.jsonl").symlink_to(tmp_path / "gone")  # a dropped symlink whose target went away
    assert place(ws, {"name": "2-b.jsonl", "state": "failed"}) == ws.root / "failed" / "2-b.jsonl"
    assert (ws.root / "failed" / "2-b.jsonl").is_symlink()
    assert place(ws, {"name": "2-b.jsonl", "state": "failed"}) == ws.root / "failed" / "2-b.jsonl"
    (ws.root / "queue" / "3-c.jsonl").write_text("in queue")
    (ws.root / "done" / "3-c.jsonl").write_text("in done")
    assert place(ws, {"name": "3-c.jsonl", "state": "duplicate"}) == ws.root / "done" / "3-c.jsonl"
    assert (ws.root / "queue" / "3-c.jsonl").exists()  # already where it belongs: nothing moved over it
    assert place(ws, {"name": "4-d.jsonl", "state": "queued"}) is None
    (ws.root / "rejected").mkdir(exist_ok=True)
    (ws.root / "rejected" / "5-e.jsonl").write_text("e")  # a rejected file queued again (retrain)
    assert place(ws, {"name": "5-e.jsonl", "state": "queued"}) == ws.root / "queue" / "5-e.jsonl"
    assert not (ws.root / "rejected" / "5-e.jsonl").exists()
    ledger.close()


def test_old_ledgers_get_the_attempts_column(tmp_path):
    import sqlite3

    from evertrain.daemon.ledger import Ledger

    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.execute("CREATE TABLE files (id INTEGER PRIMARY KEY AUTOINCREMENT, original_name TEXT NOT NULL, name TEXT, "
               "sha256 TEXT, size INTEGER, priority TEXT NOT NULL DEFAULT 'normal', state TEXT NOT NULL, "
               "steps_trained INTEGER NOT NULL DEFAULT 0, error TEXT, arrived_at REAL)")
    db.execute("INSERT INTO files (original_name, name, state) VALUES ('a.jsonl', '1-a.jsonl', 'queued')")
    db.commit()
    db.close()
    ledger = Ledger(tmp_path / "old.sqlite")
    try:
        assert ledger.get(1)["attempts"] == 0
    finally:
        ledger.close()


def test_preparing_counts_deaths_only(tmp_path):
    from evertrain.daemon.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        fid = ledger.add_file("a.jsonl", sha256=None, size=1)
        ledger.update(fid, name="000001-a.jsonl")
        path = tmp_path / "queue" / "000001-a.jsonl"
        with pytest.raises(DataError):   # a DataError is lived through: not counted
            with ledger.preparing(path):
                assert ledger.get(fid)["attempts"] == 1   # committed before the work starts
                raise DataError(path, ["bad"])
        assert ledger.get(fid)["attempts"] == 0
        ledger.update(fid, attempts=1)   # as a death leaves it
        with pytest.raises(DataError, match="quarantined"):
            with ledger.preparing(path, background=True):   # the prefetch leaves it to the daemon
                pass
        with ledger.preparing(path):   # the daemon tries once more
            assert ledger.get(fid)["attempts"] == 2
        ledger.update(fid, attempts=2, steps_trained=3)   # part-trained: its deaths were not its data's
        with ledger.preparing(path):
            pass
        ledger.update(fid, attempts=2, steps_trained=0)
        with pytest.raises(DataError, match=r"quarantined: the process died twice while preparing it \(attempts 2\)"):
            with ledger.preparing(path):
                pass
        with ledger.preparing(tmp_path / "not-in-the-ledger.jsonl"):
            pass
    finally:
        ledger.close()
