"""notify_command: one JSON event on stdin for each file done, failed or skipped and for the daemon's stop; a
command that fails or hangs is logged and changes nothing in the training.

    pytest -q tests/test_notify.py
"""

from __future__ import annotations

import json
import shlex

from conftest import cli
from daemon_helpers import by_name, drop, make_ws, rows


def test_events_reach_the_command_on_stdin(tmp_path, tiny_model):
    events = tmp_path / "events"
    events.mkdir()
    command = f"cat > $(mktemp {shlex.quote(str(events))}/event-XXXXXX)"  # one file each: they may overlap
    ws = make_ws(tmp_path, tiny_model, "--notify-command", command)
    drop(ws, "good.jsonl", rows(6, "g"))
    drop(ws, "bad.jsonl", '{"text": 1}\n')
    assert cli("run", ws, "--once") == 5
    got = [json.loads(p.read_text()) for p in events.iterdir()]
    kinds = {e["event"]: e for e in got}
    assert sorted(kinds) == ["daemon_stopped", "file_done", "file_failed"] and len(got) == 3
    assert kinds["file_done"]["file"] == "good.jsonl" and kinds["file_done"]["global_step"] == 2
    assert kinds["file_failed"]["file"] == "bad.jsonl" and "line 1" in kinds["file_failed"]["text"]
    assert kinds["daemon_stopped"]["workspace"] == str(ws.absolute())


def test_a_failing_or_hanging_command_is_logged_and_training_goes_on(tmp_path, tiny_model):
    for i, (command, says) in enumerate((("exit 3", "notify_command (file_done) exited 3"),
                                         ("sleep 30", "notify_command (file_done) did not finish within 0.5 s"))):
        ws = make_ws(tmp_path / str(i), tiny_model, "--notify-command", command,
                     "--notify-timeout", "0.5")
        drop(ws, "a.jsonl", rows(6, "a"))
        drop(ws, "b.jsonl", rows(3, "b"))
        assert cli("run", ws, "--once") == 0
        assert [r["state"] for r in by_name(ws).values()] == ["done", "done"]
        assert says in (ws / "logs" / "evertrain.log").read_text()
