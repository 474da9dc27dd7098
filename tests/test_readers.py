"""Readers of a live workspace (the page's ask box, export, chat, status) only read: a checkpoint commit held
between its two renames completes, whoever looks at the folder meanwhile.

When the same global step is committed again (here: a NaN rollback ends the file at the step it resumed from),
`checkpoint.commit` renames the old checkpoint-N aside, then renames the new one into place. Only the holder of the
folder's lock may put a `.old-checkpoint-N` back (`remove_debris`, at start: after a crash between the renames);
a reader that did it in a live run would put the old folder where the daemon's second rename goes, and the commit
would fail.

    pytest -q tests/test_readers.py
"""

from __future__ import annotations

import http.client
import json
import threading

from conftest import break_weights_at, cli
from daemon_helpers import ThreadDaemon, by_name, drop, make_ws, rows, wait_for
from dashboard_run import Served

from evertrain import faults
from evertrain.files import sha256_file


def test_the_page_asks_the_model_while_a_commit_is_between_its_renames_and_the_commit_completes(
        tmp_path, tiny_model, monkeypatch):
    ws = make_ws(tmp_path, tiny_model, "--save-steps", "1", "--anchor-size", "0")
    drop(ws, "a.jsonl", rows(8, "a"))
    assert cli("run", ws, "--once") == 0  # global steps 1-2
    poison = drop(ws, "b.jsonl", rows(16, "b"))
    break_weights_at(monkeypatch, 2, sha256_file(poison))  # b's third step: NaN; back to checkpoint-4, its second

    between, go_on = threading.Event(), threading.Event()
    real_hit = faults.hit

    def hold(name: str) -> None:
        if name == "old-swap":  # checkpoint-4 renamed aside, the new checkpoint-4 not yet in its place
            between.set()
            assert go_on.wait(120), "the test never let the commit go on"
        real_hit(name)

    monkeypatch.setattr(faults, "hit", hold)
    daemon = ThreadDaemon(ws)
    try:
        assert between.wait(120), "the rollback's commit never reached its swap"
        model_dir = ws / "current_model"
        assert (model_dir / ".old-checkpoint-4").is_dir() and not (model_dir / "checkpoint-4").exists()
        with Served(ws) as page:  # the base model's side opens the run's newest checkpoint for its settings
            conn = http.client.HTTPConnection("127.0.0.1", page.port, timeout=120)
            conn.request("POST", "/api/ask", body=json.dumps({"prompt": "Hi", "a": "base", "b": "newest",
                                                               "max_new_tokens": 2}),
                         headers={"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{page.port}"})
            answer = conn.getresponse()
            assert answer.status == 200 and b'"type": "end"' in answer.read()
            conn.close()
        assert cli("status", ws) == 0 and cli("export", ws, tmp_path / "out") == 0  # readers too
        # Nothing was renamed back: the commit's second rename still has its place.
        assert (model_dir / ".old-checkpoint-4").is_dir() and not (model_dir / "checkpoint-4").exists()
    finally:
        go_on.set()
    assert daemon.stop() == 0
    assert by_name(ws)["b.jsonl"]["state"] == "failed" and "loss became nan" in by_name(ws)["b.jsonl"]["error"]
    assert (model_dir / "checkpoint-4").is_dir() and not list(model_dir.glob(".old-*"))
    wait_for(lambda: not list(model_dir.glob(".tmp-*")), what="no temporary checkpoint left")
