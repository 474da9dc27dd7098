"""The ledger survives (issue 16, part 3), through the real CLI, real SQLite files and real checkpoints: a damaged,
deleted, truncated or stale ledger is refused (exit 2, naming the file and `evertrain repair`), never a traceback
and never a silent new history; `repair` rebuilds it with the same ids, and `run` then trains nothing twice.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_ledger_repair.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3

import pytest
from conftest import cli, evertrain, write_jsonl
from daemon_helpers import assert_exactly_once, drop, ledger_rows, make_ws, rows

from evertrain.train import checkpoint
from evertrain.daemon.ledger import COPY_NAME

WHY = {"garbage": "is damaged (file is not a database)", "deleted": "is missing, but the workspace has a history",
       "truncated": "is damaged (", "emptied": "is empty, but the workspace has a history",
       "stale": "is behind the disk: it has no row for done/000004-d.jsonl and 1 more"}
KEEP = ("id", "name", "sha256", "state", "steps_trained", "first_step", "last_step", "duplicate_of")


def history_after_the_last_checkpoint(tmp_path, ws):
    """a and b done (b's checkpoint, the newest, holds the ledger copy); then, with no checkpoint after it: c
    failed, d a duplicate of a, e queued. Returns a copy of the ledger taken before c and d while a transaction
    was open (what a backup tool copying the file mid-write gets)."""
    drop(ws, "a.jsonl", rows(10, "a"))
    drop(ws, "b.jsonl", rows(7, "b"))
    assert cli("run", ws, "--once") == 0
    writer = sqlite3.connect(ws / "ledger.sqlite", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO files (original_name, state) VALUES ('never committed', 'queued')")
    stale = tmp_path / "stale.sqlite"
    shutil.copyfile(ws / "ledger.sqlite", stale)
    writer.execute("ROLLBACK")
    writer.close()
    drop(ws, "c.jsonl", '{"text": "ok"}\n{"text": broken\n')
    drop(ws, "d.jsonl", rows(10, "a"))
    assert cli("run", ws, "--once") == 5  # c failed
    assert cli("add", write_jsonl(tmp_path / "e.jsonl", rows(6, "e")), ws) == 0
    return stale


def damage(ws, how: str, stale) -> None:
    db = ws / "ledger.sqlite"
    if how == "garbage":
        db.write_bytes(os.urandom(db.stat().st_size))
    elif how == "deleted":
        db.unlink()
    elif how == "truncated":
        with open(db, "r+b") as f:
            f.truncate(db.stat().st_size // 2)
    elif how == "emptied":
        db.write_bytes(b"")
    else:  # an older copy put back in its place
        shutil.copyfile(stale, db)


@pytest.mark.parametrize("how", ["garbage", "deleted", "truncated", "emptied", "stale"])
def test_a_broken_ledger_is_refused_then_repaired_with_its_ids_and_nothing_trained_twice(tmp_path, tiny_model,
                                                                                        capsys, how):
    ws = make_ws(tmp_path, tiny_model)
    stale = history_after_the_last_checkpoint(tmp_path, ws)
    before = [{k: r[k] for k in KEEP} for r in ledger_rows(ws)]
    assert [(r["id"], r["state"]) for r in before] == [(1, "done"), (2, "done"), (3, "failed"), (4, "duplicate"),
                                                        (5, "queued")]
    newest = checkpoint.newest_complete(ws / "current_model")
    assert COPY_NAME in newest.state["manifest"]  # sealed with the checkpoint
    damage(ws, how, stale)
    broken = (ws / "ledger.sqlite").read_bytes() if how != "deleted" else None

    capsys.readouterr()
    late = write_jsonl(tmp_path / "late.jsonl", rows(3, "late"))
    for args in (("run", ws, "--once"), ("status", ws), ("add", late, ws)):
        assert cli(*args) == 2, args
        err = capsys.readouterr().err
        assert f"{ws / 'ledger.sqlite'} {WHY[how]}" in err and f"repair it with: evertrain repair {ws}\n" in err, err
        assert "Traceback" not in err and len(err.splitlines()) == 1
    # refused means untouched: no new ledger, no file taken, nothing trained
    if how == "deleted":
        assert not (ws / "ledger.sqlite").exists()
    else:
        assert (ws / "ledger.sqlite").read_bytes() == broken
    assert sorted(p.name for p in (ws / "queue").iterdir()) == ["000005-e.jsonl"]
    assert checkpoint.newest_complete(ws / "current_model").step == newest.step

    assert cli("repair", ws) == 0
    out = capsys.readouterr().out
    assert f"restored the ledger copy of {newest.path}" in out and f"evertrain run {ws}" in out
    kept = list(ws.glob("ledger-broken-*/ledger.sqlite"))
    if how == "deleted":
        assert not kept
    else:
        assert "moved the broken ledger" in out and [p.read_bytes() for p in kept] == [broken]
    after = [{k: r[k] for k in KEEP} for r in ledger_rows(ws)]
    assert after == before
    assert cli("status", ws, "--json") == 0
    events = json.loads(capsys.readouterr().out)["events"]
    assert [e["kind"] for e in events] == ["repair"]

    drop(ws, "f.jsonl", rows(5, "f"))
    assert cli("run", ws, "--once") == 0
    files = {r["id"]: r for r in ledger_rows(ws)}
    assert [(i, r["state"]) for i, r in files.items()] == [(1, "done"), (2, "done"), (3, "failed"),
                                                           (4, "duplicate"), (5, "done"), (6, "done")]
    for file_id, n in ((1, 10), (2, 7), (5, 6), (6, 5)):
        assert_exactly_once(ws, files[file_id], n)
    assert (files[5]["first_step"], files[6]["last_step"]) == (newest.step + 1, newest.step + 2 + 2)


def files_leaf_pages(db_path) -> tuple[int, list[int]]:
    """The page size and the pages that hold the files table's rows (dbstat: SQLite's own map of its pages)."""
    db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
    try:
        size = db.execute("PRAGMA page_size").fetchone()[0]
        return size, [p for (p,) in db.execute("SELECT pageno FROM dbstat WHERE name = 'files' AND pagetype = 'leaf' "
                                               "ORDER BY pageno")]
    finally:
        db.close()


def test_a_damaged_page_inside_a_ledger_that_still_opens_is_refused_then_repaired(tmp_path, tiny_model, capsys):
    """The damage the open's quick check is there for: one page of rows torn, the header and the schema whole, so
    SQLite opens the file and reads its schema as if nothing were wrong."""
    ws = make_ws(tmp_path, tiny_model)
    for i in range(120):  # failed files: rows with long errors, over several pages
        drop(ws, f"bad-{i:03d}.jsonl", f'{{"text": "ok"}}\n{{"text": broken {i}\n')
    assert cli("run", ws, "--once") == 5
    drop(ws, "a.jsonl", rows(10, "a"))
    assert cli("run", ws, "--once") == 0  # its checkpoint holds a copy of every row
    db = ws / "ledger.sqlite"
    assert not os.path.exists(f"{db}-wal") or os.path.getsize(f"{db}-wal") == 0  # every page in the file itself
    before = [{k: r[k] for k in KEEP} for r in ledger_rows(ws)]
    assert len(before) == 121 and before[-1]["state"] == "done"
    page_size, leaves = files_leaf_pages(db)
    assert len(leaves) >= 4 and 1 not in leaves
    torn = leaves[len(leaves) // 2]  # neither the first nor the last: the highest id is still found
    with open(db, "r+b") as f:
        f.seek((torn - 1) * page_size)
        f.write(b"\xff" * page_size)
    look = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    assert look.execute("SELECT MAX(id) FROM files").fetchone() == (121,)  # it opens, and looks sound at a glance
    look.close()
    broken = db.read_bytes()

    capsys.readouterr()
    for args in (("status", ws), ("run", ws, "--once")):
        assert cli(*args) == 2, args
        err = capsys.readouterr().err
        assert f"{db} is damaged (" in err and f"repair it with: evertrain repair {ws}\n" in err, err
        assert "Traceback" not in err and len(err.splitlines()) == 1
    assert db.read_bytes() == broken  # refused means untouched

    assert cli("repair", ws) == 0
    out = capsys.readouterr().out
    assert "moved the broken ledger" in out and "restored the ledger copy of" in out
    assert [p.read_bytes() for p in ws.glob("ledger-broken-*/ledger.sqlite")] == [broken]
    assert [{k: r[k] for k in KEEP} for r in ledger_rows(ws)] == before
    assert cli("status", ws) == 0


def test_a_new_workspace_gets_its_ledger_silently_and_a_lost_one_is_told_from_it(tmp_path, tiny_model, capsys):
    ws = make_ws(tmp_path, tiny_model)
    drop(ws, "waiting.jsonl", rows(4, "w"))  # the inbox is not history: nothing was taken yet
    assert cli("status", ws) == 0 and (ws / "ledger.sqlite").is_file()
    (ws / "ledger.sqlite").unlink()
    assert cli("run", ws, "--once") == 0
    assert [r["state"] for r in ledger_rows(ws)] == ["done"]
    capsys.readouterr()
    assert cli("repair", ws) == 0 and "nothing to repair" in capsys.readouterr().out

    # only a rejected file and no checkpoint: still a history, and rebuilt from the disk alone
    other = tmp_path / "other"
    assert cli("init", other, "--model", tiny_model, "--stable-seconds", 0, "--incomplete-timeout", 0) == 0
    drop(other, "bad.jsonl", "not json\n")
    assert cli("run", other, "--once") == 5  # bad.jsonl failed
    (other / "ledger.sqlite").unlink()
    assert cli("status", other) == 2
    assert "is missing, but the workspace has a history (2 file(s) in failed/)" in capsys.readouterr().err
    assert cli("repair", other) == 0
    assert "no checkpoint holds a copy of the ledger" in capsys.readouterr().out
    (row,) = ledger_rows(other)
    assert (row["id"], row["state"]) == (1, "failed") and "line 1: invalid JSON" in row["error"]


def test_a_file_finished_just_before_a_kill_and_a_lost_ledger_is_not_trained_again(tmp_path, tiny_model, capsys):
    ws = make_ws(tmp_path, tiny_model)
    drop(ws, "a.jsonl", rows(8, "a"))
    drop(ws, "b.jsonl", rows(6, "b"))
    # killed with a's last checkpoint committed, the ledger not yet told: a is in queue/, its row "training"
    killed = evertrain("run", ws, "--once", fault="before-ledger-done:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (ws / "ledger.sqlite-wal").exists()  # what a kill leaves beside it; it must not outlive its ledger
    look = sqlite3.connect(f"{(ws / 'ledger.sqlite').as_uri()}?mode=ro", uri=True)  # read-only: the WAL stays
    assert look.execute("SELECT id, state FROM files").fetchall() == [(1, "training"), (2, "queued")]
    look.close()
    (ws / "ledger.sqlite").unlink()

    capsys.readouterr()
    assert cli("run", ws, "--once") == 2 and "is missing" in capsys.readouterr().err
    assert cli("repair", ws) == 0
    assert sorted(p.name for p in next(ws.glob("ledger-broken-*")).iterdir()) == ["ledger.sqlite-shm",
                                                                                  "ledger.sqlite-wal"]
    assert [(r["id"], r["state"]) for r in ledger_rows(ws)] == [(1, "done"), (2, "queued")]
    assert (ws / "done" / "000001-a.jsonl").is_file()
    assert cli("run", ws, "--once") == 0
    files = ledger_rows(ws)
    assert [(r["id"], r["state"], r["first_step"], r["last_step"]) for r in files] == [(1, "done", 1, 2),
                                                                                     (2, "done", 3, 4)]
    assert_exactly_once(ws, files[0], 8)
    assert_exactly_once(ws, files[1], 6)


def test_with_the_ledger_and_every_checkpoint_lost_nothing_counts_as_trained_until_from_base(tmp_path, tiny_model,
                                                                                            capsys):
    ws = make_ws(tmp_path, tiny_model)
    drop(ws, "a.jsonl", rows(8, "a"))
    assert cli("run", ws, "--once") == 0
    (only,) = checkpoint.candidates(ws / "current_model")
    (only.path / "model.safetensors").write_bytes(b"damaged")  # its ledger copy still matches the manifest
    (ws / "ledger.sqlite").write_bytes(b"damaged")
    capsys.readouterr()
    assert cli("repair", ws) == 0
    out = capsys.readouterr().out
    assert f"restored the ledger copy of {only.path}" in out and "no checkpoint loads" in out
    assert "done/000001-a.jsonl: no loadable checkpoint records it as trained; queued again" in out
    assert [(r["id"], r["state"]) for r in ledger_rows(ws)] == [(1, "queued")]
    assert (ws / "queue" / "000001-a.jsonl").is_file()
    assert cli("run", ws, "--once") == 2 and "no checkpoint in" in capsys.readouterr().out
    assert cli("run", ws, "--once", "--from-base") == 0
    (row,) = ledger_rows(ws)
    assert (row["id"], row["state"], row["first_step"]) == (1, "done", 1)
    assert_exactly_once(ws, row, 8)
