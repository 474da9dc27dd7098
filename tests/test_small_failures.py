"""The smaller failures, each through the real CLI: a folder too deep in the inbox, watchdog's noise at exit,
`status | head`. (`add`/`train`/`check` of a folder or a fifo: tests/test_poison.py.)

    pytest tests/test_small_failures.py
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from conftest import cli
from daemon_helpers import by_name, make_ws, rows

from evertrain.daemon import inbox
from evertrain.daemon.ledger import Ledger
from evertrain.daemon.workspace import Workspace


def test_a_folder_too_deep_in_the_inbox_is_failed_naming_its_files(tmp_path, tiny_model, capsys):
    ws = make_ws(tmp_path, tiny_model)
    deepest_taken = ws / "inbox" / os.path.join(*"abcdefgh")   # 8 folders: taken
    too_deep = ws / "inbox" / os.path.join(*"abcdefghi")       # 9 folders: refused, loudly
    for folder, name in ((deepest_taken, "ok.jsonl"), (too_deep, "lost.jsonl")):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("".join(f'{{"text": "{r["text"]}"}}\n' for r in rows(6, name)))
    assert cli("run", ws, "--once") == 5  # exits.FILES_FAILED: the folder too deep failed
    files = by_name(ws)
    assert files["a/b/c/d/e/f/g/h/ok.jsonl"]["state"] == "done"
    refused = files["a/b/c/d/e/f/g/h/i"]
    assert refused["state"] == "failed" and "more than 8 folders deep" in refused["error"]
    assert "i/lost.jsonl" in refused["error"], refused["error"]
    assert (ws / "failed" / f"{refused['name']}" / "lost.jsonl").is_file()
    assert "lost.jsonl" in (ws / "failed" / f"{refused['name']}.error.txt").read_text()
    assert cli("status", ws) == 0 and "more than 8 folders" in capsys.readouterr().out


def test_watchdog_stopping_mid_event_says_nothing(tmp_path, tiny_model, caplog):
    ws = Workspace(make_ws(tmp_path, tiny_model))
    ledger = Ledger.open(ws)
    box = inbox.Inbox(ws, ledger, 0.0, watch=True)
    try:
        assert box.observer is not None
        emitter = logging.getLogger("watchdog.observers.inotify")
        # What watchdog's emitter logs when the observer stops while it handles an event (a race at exit):
        emitter.error("InotifyEmitter.queue_events() called when the thread is inactive")
        emitter.error("Unable to rebuild recursive inotify watches below %r", "x")   # a real problem: still said
    finally:
        box.close()
        ledger.close()
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "InotifyEmitter" in m] and [m for m in said if "Unable to rebuild" in m]


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_status_into_a_pipe_closed_early_ends_quietly(tmp_path, tiny_model, json_flag):
    ws = make_ws(tmp_path, tiny_model)
    ledger = Ledger.open(Workspace(ws))
    for i in range(3000):  # far more than a pipe buffer holds, so the writer is still writing when head leaves
        ledger.add_file(f"queued-{i:04d}-with-a-long-name-to-fill-the-pipe.jsonl", sha256=f"{i:064x}", size=i)
    ledger.close()
    proc = subprocess.Popen([sys.executable, "-m", "evertrain", "status", str(ws), *json_flag],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline()   # `| head -1`: one line read, then the reader goes away
    proc.stdout.close()
    assert proc.wait(120) == 0
    assert proc.stderr.read().decode() == ""
