"""Intake waits for slow writers: a file cut short (no final newline, a .json array without its `]`, no Parquet
footer) is waited for until it ends cleanly, or until `incomplete_timeout` after its last change; a whole last line
that does not parse is bad data, failed once the file is stable.

    pytest -q tests/test_slow_writers.py
"""

from __future__ import annotations

import json
import time

from conftest import cli
from daemon_helpers import ThreadDaemon, by_name, drop, make_ws, rows, status, wait_for



def test_a_writer_pausing_mid_line_longer_than_stable_seconds_trains_whole(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--stable-seconds", "0.2", "--incomplete-timeout", "60")
    daemon = ThreadDaemon(ws)
    lines = [json.dumps(r) + "\n" for r in rows(9, "slow")]
    target = ws / "inbox" / "slow.jsonl"
    # Written in place in pieces, each ending mid-line: the end of one line and the start of the next go in one
    # write, so the file never ends on a whole line before the last piece (a stall of the test process there
    # longer than stable_seconds would make a finished-looking file, rightly taken).
    text = "".join(lines)
    cuts = [len("".join(lines[:i + 3])) - 7 for i in range(0, 9, 3)]
    try:
        with open(target, "w") as f:
            for start, end in zip([0] + cuts, cuts):
                f.write(text[start:end])
                f.flush()
                # The pause outlasts stable_seconds: the daemon sees a stable, cut file of this size and says it
                # waits (well before incomplete_timeout would have it validated as it is).
                note = f"waiting for slow.jsonl ({len(text[:end].encode())} bytes so far) to finish"
                wait_for(lambda: status(ws).get("intake") == note, 50, f"the status to say {note!r}")
                assert "slow.jsonl" not in by_name(ws)
            f.write(text[cuts[-1]:])
            f.flush()
        row = wait_for(lambda: by_name(ws).get("slow.jsonl", {}).get("state") == "done"
                       and by_name(ws)["slow.jsonl"], 60, "the file to train")
        assert row["examples"] == 9
        wait_for(lambda: status(ws).get("intake") is None, 60, "the status to stop waiting")
    finally:
        assert daemon.stop() == 0


def test_a_file_that_stays_cut_is_validated_as_it_is_after_the_timeout(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--incomplete-timeout", "0.5")
    drop(ws, "cut.jsonl", '{"text": "fine"}\n{"text": "cut sho')
    drop(ws, "ok.jsonl", rows(3, "ok"))
    assert cli("run", ws, "--once") == 5
    files = by_name(ws)
    assert files["ok.jsonl"]["state"] == "done"
    assert files["cut.jsonl"]["state"] == "failed" and "line 2: invalid JSON" in files["cut.jsonl"]["error"]


BROKEN = '{"text": "fine"}\n{"text": \n'  # its last line ends with its newline: whole, and bad


def test_a_broken_last_line_that_ends_with_its_newline_fails_without_the_timeout(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--stable-seconds", "0.5", "--incomplete-timeout", "600")
    daemon = ThreadDaemon(ws)
    try:
        cut = drop(ws, "cut.jsonl", '{"text": "fine"}\n{"text": "cut sho')  # no final newline: still written
        dropped = time.monotonic()
        drop(ws, "bad.jsonl", BROKEN)
        row = wait_for(lambda: by_name(ws).get("bad.jsonl", {}).get("state") == "failed" and by_name(ws)["bad.jsonl"],
                       60, "bad.jsonl to fail")
        assert time.monotonic() - dropped < 30  # stable_seconds and a scan, not incomplete_timeout's 600 s
        error = (ws / "failed" / f"{row['name']}.error.txt").read_text()
        assert "bad.jsonl" in error and "line 2: invalid JSON" in error
        note = f"waiting for cut.jsonl ({cut.stat().st_size} bytes so far) to finish"
        wait_for(lambda: status(ws).get("intake") == note, 30, f"the status to say {note!r}")
        assert "cut.jsonl" not in by_name(ws) and cut.exists()
    finally:
        assert daemon.stop() == 0


def test_run_once_fails_a_broken_last_line_without_the_timeout(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--incomplete-timeout", "600")
    drop(ws, "bad.jsonl", BROKEN)
    drop(ws, "ok.jsonl", rows(3, "ok"))
    started = time.monotonic()
    assert cli("run", ws, "--once") == 5
    assert time.monotonic() - started < 300  # the old wait was the whole incomplete_timeout: 600 s
    files = by_name(ws)
    assert files["ok.jsonl"]["state"] == "done"
    assert files["bad.jsonl"]["state"] == "failed" and "line 2: invalid JSON" in files["bad.jsonl"]["error"]
    assert (ws / "failed" / files["bad.jsonl"]["name"]).is_file()
