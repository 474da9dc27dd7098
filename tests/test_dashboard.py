"""The dashboard's server and its reader of the run's files, without a browser: API answers on a real run,
no file outside the package's static folder is ever served, the token off loopback, and the readers' edge
cases (resumed steps, torn lines, long histories, a ledger in use, NaN)."""

import http.client
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dashboard_run import Served, lines, trained_run

from evertrain.dashboard import server, sources


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    return trained_run(tmp_path_factory, tiny_model)


def request(port: int, path: str, headers: dict | None = None, host: str = "127.0.0.1"):
    """The raw path goes out as given (no client-side normalisation of '..')."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def get_json(port, path, **kw):
    status, _headers, body = request(port, path, **kw)
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


def test_api_answers_with_the_run(run_dir):
    m = lines(run_dir / "logs" / "metrics.jsonl")
    last = m[-1]["step"]
    with Served(run_dir) as s:
        state = get_json(s.port, "/api/state")
        assert state["kind"] == "train output dir"
        names = [f["original_name"] for f in state["files"]]
        assert names == ["capitals.jsonl", "colours.jsonl"]
        assert [f["state"] for f in state["files"]] == ["done", "done"]
        assert state["files"][1]["last_step"] == last
        assert state["status"]["global_step"] == last and state["status"]["state"] == "idle"
        assert state["checkpoints"][0]["step"] == last
        assert state["checkpoints"][0]["name"] == f"checkpoint-{last}"

        metrics = get_json(s.port, "/api/metrics?since=0")
        assert metrics["columns"]["step"] == list(range(1, last + 1))
        assert metrics["columns"]["loss"] == pytest.approx([r["loss"] for r in m])
        assert [(f["file_name"], f["first_step"], f["last_step"]) for f in metrics["files"]] == [
            ("capitals.jsonl", 1, state["files"][0]["last_step"]),
            ("colours.jsonl", state["files"][0]["last_step"] + 1, last)]
        assert get_json(s.port, f"/api/metrics?since={last - 2}")["columns"]["step"] == [last - 1, last]

        assert request(s.port, "/api/metrics?since=abc")[0] == 400
        assert request(s.port, "/api/snapshot/99999")[0] == 404
        status, headers, body = request(s.port, "/")
        assert status == 200 and b'id="loss-chart"' in body
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        assert request(s.port, "/static/uPlot.iife.min.js")[0] == 200


TRAVERSALS = ["/static/../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd", "/static/..%2f..%2fetc%2fpasswd",
              "/static/%2e%2e/server.py", "/static/../server.py", "/static//etc/passwd", "/static/",
              "/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd", "/etc/passwd",
              "/api/snapshot/../../../etc/passwd", "/api/snapshot/%2e%2e%2f%2e%2e", "/api/snapshot/1e3",
              "/api/snapshot/%31", "/metrics.jsonl", "/checkpoint-1/trainer_state.json", "/static/style.css/.."]


def test_no_path_reaches_a_file_outside_the_static_folder(run_dir):
    secret = b"root:"  # /etc/passwd's first field
    own_source = (Path(server.__file__)).read_bytes()[:60]
    with Served(run_dir) as s:
        for path in TRAVERSALS:
            status, _h, body = request(s.port, path)
            assert status in (403, 404), (path, status)
            assert secret not in body and own_source not in body and b"global_step" not in body, path
        # What is whitelisted is served, and is exactly the packaged file.
        status, _h, body = request(s.port, "/static/style.css")
        assert status == 200 and body == (server.STATIC_DIR / "style.css").read_bytes()


def test_page_needs_nothing_from_the_network():
    """Offline: every script and style the page loads is one of the packaged static files."""
    page = (server.STATIC_DIR / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all(r.startswith("/static/") and r[len("/static/"):] in server.static_files() for r in refs)
    for name in ("index.html", "app.js", "style.css", "uPlot.min.css"):
        assert not re.search(r"https?://", (server.STATIC_DIR / name).read_text()), name


def test_loopback_server_refuses_a_foreign_host_header(run_dir):
    with Served(run_dir) as s:
        assert request(s.port, "/api/state", headers={"Host": "evil.example:80"})[0] == 403
        assert request(s.port, "/api/state", headers={"Host": f"localhost:{s.port}"})[0] == 200


def test_off_loopback_every_request_needs_the_token(run_dir):
    with Served(run_dir, host="0.0.0.0", token="s3cret-token") as s:
        for path in ("/", "/api/state", "/static/app.js", "/api/metrics?since=0"):
            assert request(s.port, path)[0] == 401, path
        assert request(s.port, "/api/state?token=wrong")[0] == 401
        assert request(s.port, "/api/state", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(s.port, "/api/state", headers={"Authorization": "Bearer s3cret-token"})[0] == 200
        # ?token= sets a cookie and sends the browser to the same page without the token in its address.
        status, headers, _ = request(s.port, "/?token=s3cret-token")
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"].split(";")[0]
        assert "HttpOnly" in headers["Set-Cookie"]
        assert request(s.port, "/api/state", headers={"Cookie": cookie})[0] == 200
        assert request(s.port, "/api/state", headers={"Cookie": "evertrain_token=nope"})[0] == 401


def test_cli_off_loopback_generates_a_token_and_prints_it_once(run_dir):
    proc = subprocess.Popen([sys.executable, "-m", "evertrain", "dashboard", str(run_dir), "--host", "0.0.0.0",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(sources.__file__).parents[2])})
    try:
        line = proc.stdout.readline()
        assert "dashboard of" in line and "?token=" in line, line
        url = line.split(" at ")[1].strip()
        port = int(url.split(":")[2].split("/")[0])
        token = url.split("?token=")[1]
        assert len(token) >= 24
        assert request(port, "/api/state")[0] == 401
        assert request(port, "/api/state", headers={"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    assert proc.returncode == 0


def test_cli_refuses_a_missing_folder(tmp_path, capsys):
    from evertrain.cli import main

    assert main(["dashboard", str(tmp_path / "nope")]) == 2
    assert "nope: no such folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ readers

def write_lines(path: Path, lines: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def step(n, loss=1.0, file="a" * 64, name="a.jsonl"):
    return {"step": n, "file": file, "file_name": name, "file_step": n, "file_total_steps": 99, "loss": loss,
            "lr": 1e-3, "time": 0}


def test_metrics_follow_appends_resumes_and_torn_lines(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    write_lines(path, [step(1), step(2), step(3)])
    run = sources.open_run(tmp_path)
    first = sources.metrics(run)
    assert first["columns"]["step"] == [1, 2, 3]
    # The run resumed from the checkpoint of step 1 and trained steps 2.. again: the new lines count.
    with open(path, "a") as f:
        f.write(json.dumps(step(2, loss=0.5)) + "\nnot json\n" + '{"step": 3, "lo')  # a line still being written
    m = sources.metrics(run)
    assert m["columns"]["step"] == [1, 2] and m["columns"]["loss"] == [1.0, 0.5]
    assert m["history"] != first["history"]  # tells the page to drop the points it holds
    with open(path, "a") as f:
        f.write('ss": 0.25, "file": "b", "file_name": "b.jsonl"}\n')
    m = sources.metrics(run)
    assert m["columns"]["step"] == [1, 2, 3] and m["columns"]["loss"] == [1.0, 0.5, 0.25]
    assert [(s["file_name"], s["first_step"], s["last_step"]) for s in m["files"]] == [
        ("a.jsonl", 1, 2), ("b.jsonl", 3, 3)]


def test_long_history_is_thinned_but_keeps_the_last_step(tmp_path):
    write_lines(tmp_path / "logs" / "metrics.jsonl", [step(n) for n in range(1, 10_001)])
    m = sources.metrics(sources.open_run(tmp_path), max_points=1000)
    steps = m["columns"]["step"]
    assert len(steps) <= 1001 and steps[0] == 1 and steps[-1] == 10_000 and m["stride"] == 10
    assert m["last_step"] == 10_000 and sources.metrics(sources.open_run(tmp_path), since=9_990)["stride"] == 1


def test_forgetting_matrix_rows_columns_and_before(tmp_path):
    a, b = "a" * 64, "b" * 64
    write_lines(tmp_path / "logs" / "evals.jsonl", [
        {"step": 0, "after_file": None, "before_file": a, "file": a, "file_name": "a.jsonl", "loss": 5.0},
        {"step": 4, "after_file": a, "after_file_name": "a.jsonl", "file": a, "file_name": "a.jsonl", "loss": 2.0},
        {"step": 4, "after_file": None, "before_file": b, "file": b, "file_name": "b.jsonl", "loss": 4.5},
        {"step": 9, "after_file": b, "after_file_name": "b.jsonl", "file": a, "file_name": "a.jsonl", "loss": 2.5},
        {"step": 9, "after_file": b, "after_file_name": "b.jsonl", "file": b, "file_name": "b.jsonl", "loss": 1.5},
        "{torn",
    ])
    fm = sources.forgetting(sources.open_run(tmp_path))
    assert [f["file_name"] for f in fm["files"]] == ["a.jsonl", "b.jsonl"]
    assert fm["before"] == [5.0, 4.5]
    assert [(r["after_file_name"], r["step"], r["cells"]) for r in fm["rows"]] == [
        ("a.jsonl", 4, [2.0, None]), ("b.jsonl", 9, [2.5, 1.5])]


def test_ledger_is_read_while_the_daemon_holds_a_write_transaction(tmp_path):
    (tmp_path / "evertrain.toml").write_text("")
    db = sqlite3.connect(tmp_path / "ledger.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    # An older ledger: fewer columns than the dashboard shows; the missing ones come back as None.
    db.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, original_name TEXT, sha256 TEXT, state TEXT, "
               "steps_trained INTEGER, expected_steps INTEGER)")
    db.execute("INSERT INTO files VALUES (1, 'one.jsonl', 'x', 'done', 3, 3)")
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO files VALUES (2, 'two.jsonl', 'y', 'training', 1, 5)")
    t0 = time.monotonic()
    rows = sources.files(sources.open_run(tmp_path))
    assert time.monotonic() - t0 < 1.5  # not waiting for the writer
    assert [(r["original_name"], r["state"], r["priority"]) for r in rows] == [("one.jsonl", "done", None)]
    db.execute("COMMIT")
    assert [r["state"] for r in sources.files(sources.open_run(tmp_path))] == ["done", "training"]
    with pytest.raises(sqlite3.OperationalError):  # read-only: the dashboard cannot change the ledger
        ro = sqlite3.connect(f"{(tmp_path / 'ledger.sqlite').as_uri()}?mode=ro", uri=True)
        ro.execute("DELETE FROM files")
    db.close()


def test_workspace_layout_status_and_non_finite_numbers(tmp_path, run_dir):
    (tmp_path / "evertrain.toml").write_text("")
    (tmp_path / "current_model").symlink_to(run_dir)
    (tmp_path / "status").mkdir()
    (tmp_path / "status" / "training_status.json").write_text(json.dumps(
        {"state": "paused", "global_step": 7, "loss": float("nan")}))
    with Served(tmp_path) as s:
        status, _h, body = request(s.port, "/api/state")
        assert status == 200 and b"NaN" not in body
        state = json.loads(body)
    assert state["kind"] == "workspace"
    assert state["status"]["state"] == "paused" and state["status"]["loss"] is None
    newest, older = state["checkpoints"][:2]
    assert newest["name"] == f"checkpoint-{newest['step']}" and not newest["pinned"]
    # No ledger yet (the daemon never ran here): the files recorded in the newest checkpoint.
    assert [f["original_name"] for f in state["files"]] == ["capitals.jsonl", "colours.jsonl"]

    # With a ledger: its files (a duplicate says of which file) and its pins.
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    db.executescript("CREATE TABLE files (id INTEGER PRIMARY KEY, original_name TEXT, state TEXT, duplicate_of INT);"
                     "CREATE TABLE pins (name TEXT PRIMARY KEY, step INTEGER, pinned_at REAL);"
                     "INSERT INTO files VALUES (1, 'a.jsonl', 'done', NULL), (2, 'copy-of-a.jsonl', 'duplicate', 1);"
                     f"INSERT INTO pins VALUES ('{older['name']}', {older['step']}, 0);")
    db.commit()
    db.close()
    state = sources.state(sources.open_run(tmp_path))
    assert [(f["original_name"], f["state"], f["duplicate_of"]) for f in state["files"]] == [
        ("a.jsonl", "done", None), ("copy-of-a.jsonl", "duplicate", 1)]
    assert [c["pinned"] for c in state["checkpoints"][:2]] == [False, True]
