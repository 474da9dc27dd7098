"""Steering the daemon from the page, in a real headless Chromium: pause, priority, resume, skip, upload, pin,
stop, each seen on the page within seconds; a change without the token or from another origin is refused and
changes nothing.

    apt-get install -y chromium && pytest -q tests/test_dashboard_controls.py
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request

from daemon_helpers import ThreadDaemon, by_name, drop, make_ws, rows, status, wait_for
from dashboard_run import Served

from cdp import Page

SECONDS = 15  # "within seconds": the page polls every 2 s and polls at once after a change


def pins(ws) -> set[str]:
    db = sqlite3.connect(ws / "ledger.sqlite", timeout=30)
    try:
        return {r[0] for r in db.execute("SELECT name FROM pins")}
    finally:
        db.close()


def shows(page: Page, selector: str, text: str) -> str:
    return f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent === {json.dumps(text)}"


def test_the_page_steers_the_daemon(browser, tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model)
    daemon = ThreadDaemon(ws)
    upload = tmp_path / "upload.jsonl"
    upload.write_text("".join(json.dumps(r) + "\n" for r in rows(5, "up")))
    try:
        with Served(ws) as s, Page(browser, tmp_path / "profile", f"http://127.0.0.1:{s.port}/") as page:
            page.wait("document.body.dataset.loaded === '1' && !document.getElementById('controls').hidden",
                      what="the page with its controls")

            asked = time.monotonic()
            page.click("#ctl-pause")
            page.wait(shows(page, "#state", "paused"), SECONDS, "the page to say paused")
            assert time.monotonic() - asked < SECONDS and status(ws)["state"] == "paused"

            drop(ws, "big.jsonl", rows(20000, "big"))  # paused: taken into the queue, not trained
            drop(ws, "second.jsonl", rows(6, "second"))
            wait_for(lambda: {"big.jsonl", "second.jsonl"} <= set(by_name(ws)), what="both files queued")
            second = by_name(ws)["second.jsonl"]["id"]
            sel = f'select.priority[data-file-id="{second}"]'
            page.wait(f"!!document.querySelector({json.dumps(sel)})", SECONDS, "the queue with its priorities")
            page.eval(f"const s = document.querySelector({json.dumps(sel)}); s.value = 'high';"
                      "s.dispatchEvent(new Event('change'))")
            wait_for(lambda: by_name(ws)["second.jsonl"]["priority"] == "high", SECONDS, "the new priority")
            assert by_name(ws)["big.jsonl"]["state"] == "queued" and status(ws)["state"] == "paused"

            page.click("#ctl-resume")
            page.wait(shows(page, "#current-file", "big.jsonl") + " && " + shows(page, "#state", "training"),
                      60, "big.jsonl training on the page")
            assert by_name(ws)["second.jsonl"]["state"] == "done"  # high went first
            page.click("#ctl-skip")
            wait_for(lambda: by_name(ws)["big.jsonl"]["state"] == "skipped", SECONDS, "the skip")

            page.choose_file("#upload-file", upload)
            page.click("#upload-send")
            page.wait("(document.getElementById('ctl-message').textContent || '').includes('upload.jsonl is in "
                      "the inbox')", SECONDS, "the upload's answer")
            row = wait_for(lambda: by_name(ws).get("upload.jsonl", {}).get("state") == "done"
                           and by_name(ws)["upload.jsonl"], 60, "the upload to train")
            assert row["examples"] == 5 and not list((ws / "inbox").iterdir())  # no temporary left behind

            newest = f"checkpoint-{row['last_step']}"
            button = f'.pin-button[data-step="{row["last_step"]}"]'
            page.wait(f"!!document.querySelector({json.dumps(button)})", SECONDS, "the checkpoint's pin button")
            page.click(button)
            wait_for(lambda: newest in pins(ws), SECONDS, "the pin")
            page.wait(shows(page, button, "unpin"), SECONDS, "the page to show it pinned")
            page.click(button)
            wait_for(lambda: newest not in pins(ws), SECONDS, "the unpin")

            page.click("#ctl-stop")
            daemon.thread.join(SECONDS * 4)
            assert not daemon.thread.is_alive() and daemon.rc == 0
    finally:
        daemon.stop()


def post(port: int, path: str, headers: dict) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_change_without_the_token_or_from_another_origin_changes_nothing(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model)
    token = "a-token-for-the-test"
    with Served(ws, host="0.0.0.0", token=token) as s:
        own = f"http://127.0.0.1:{s.port}"
        for headers in ({"Origin": own}, {"Origin": "http://evil.example", "Authorization": f"Bearer {token}"},
                        {"Authorization": f"Bearer {token}"}):
            for path in ("/api/control/pause", "/api/upload?name=x.jsonl", "/api/pin/1", "/api/priority/1/high"):
                assert post(s.port, path, headers) in (401, 403), (path, headers)
        assert not (ws / "status" / "paused").exists() and not list((ws / "inbox").iterdir())
        # The same request with the token and the page's own origin does change it: the refusals were the rules.
        assert post(s.port, "/api/control/pause", {"Origin": own, "Authorization": f"Bearer {token}"}) == 200
        assert (ws / "status" / "paused").exists()
