"""The dashboard's server, without a browser: API answers on a real run, no file outside the package's static
folder is ever served, the access rules at work (token, Host, Origin), bad query values, many clients and
half-sent requests, a workspace's layout and NaN in its status. The reader of a run's files on its own:
tests/test_sources.py; the rules a binding gets: tests/test_auth.py.

    pytest tests/test_dashboard.py
"""

import asyncio
import http.client
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from dashboard_run import TOKEN, Served, Serving, lines, trained_run
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route

from evertrain.dashboard import server, sources
from evertrain.web import access as auth
from evertrain.web import listener
from evertrain.web.listener import Listener


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    return trained_run(tmp_path_factory, tiny_model)


def request(port: int, path: str, headers: dict | None = None, host: str = "127.0.0.1", method: str = "GET"):
    """The raw path goes out as given (no client-side normalisation of '..')."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.headers, r.read()  # headers: any case of a name finds it
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
              "/static/%2e%2e%2fserver.py", "/metrics.jsonl", "/checkpoint-1/trainer_state.json",
              "/static/style.css/.."]


def test_no_path_reaches_a_file_outside_the_static_folder(run_dir):
    secret = b"root:"  # /etc/passwd's first field
    own_source = (Path(server.__file__)).read_bytes()[:60]
    with Served(run_dir) as s:
        for path in TRAVERSALS:
            status, _h, body = request(s.port, path)
            assert status in (400, 403, 404), (path, status)
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
        for host in ("evil.example:80", "127.0.0.1.evil.example", "127.0.0.1@evil.example", "[::1", ""):
            status, _h, body = request(s.port, "/api/state", headers={"Host": host})
            assert status in (400, 403) and b"global_step" not in body, (host, status)
        assert request(s.port, "/api/state", headers={"Host": "evil.example:80"})[0] == 403
        assert request(s.port, "/api/state", headers={"Host": f"localhost:{s.port}"})[0] == 200
        assert request(s.port, "/api/state", headers={"Host": f"[::1]:{s.port}"})[0] == 200


BAD_VALUES = ["/api/metrics?since=--5", "/api/metrics?since=abc", "/api/metrics?since=1e999",
              "/api/metrics?since=-1", "/api/metrics?since=", "/api/metrics?since=%00", "/api/metrics?since=%D9%A3",
              "/api/metrics?since=" + "9" * 4000, "/api/metrics?since=1000000000001", "/api/metrics?since=+3",
              "/api/snapshot/-3", "/api/snapshot/1e3", "/api/snapshot/" + "9" * 30, "/api/snapshot/%D9%A3"]


def test_every_bad_query_value_is_a_400_with_a_short_message(run_dir):
    with Served(run_dir) as s:
        for path in BAD_VALUES:
            status, headers, body = request(s.port, path)
            assert status == 400, (path, status, body[:200])
            error = json.loads(body)["error"]
            assert "must be a step number" in error and len(error) < 120, error
            assert "Traceback" not in error and "Error" not in error, error
            assert headers["X-Content-Type-Options"] == "nosniff"
        assert request(s.port, "/api/snapshot/99999")[0] == 404
        assert request(s.port, "/api/metrics?since=1000000000000")[0] == 200


def test_an_unexpected_failure_is_a_generic_500_and_goes_to_the_log(run_dir, monkeypatch):
    def broken(run):
        raise RuntimeError("secret detail of /home/someone")

    monkeypatch.setattr(sources, "state", broken)
    logged = []
    with Served(run_dir) as s:
        handler = logging.Handler()
        handler.emit = logged.append
        logging.getLogger("uvicorn.error").addHandler(handler)
        try:
            status, headers, body = request(s.port, "/api/state")
            metrics_status = request(s.port, "/api/metrics?since=0")[0]
        finally:
            logging.getLogger("uvicorn.error").removeHandler(handler)
    assert status == 500 and json.loads(body) == {"error": "internal error: the dashboard's log says what went wrong"}
    assert b"secret" not in body and b"RuntimeError" not in body
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in logged)
    assert metrics_status == 200  # the server goes on


def test_only_get_and_head_and_no_long_addresses(run_dir):
    with Served(run_dir) as s:
        own = {"Origin": f"http://127.0.0.1:{s.port}"}
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            status, headers, _ = request(s.port, "/api/state", headers=own, method=method)
            assert status == 405 and set(headers["Allow"].split(", ")) == {"GET", "HEAD"}, method
            assert request(s.port, "/api/state", method=method)[0] == 403, method  # no Origin: refused first
        status, headers, body = request(s.port, "/api/state", method="HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
        assert request(s.port, "/api/state?pad=" + "a" * 5000)[0] == 414
        assert request(s.port, "/static/" + "a" * 20_000)[0] in (400, 414)
        assert request(s.port, "/api/state?pad=" + "a" * 3000)[0] == 200


def test_a_hundred_clients_at_once_all_get_their_answer(run_dir):
    async def many(port):
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=120) as client:
            return await asyncio.gather(*(client.get(p) for _ in range(25)
                                          for p in ("/api/state", "/api/metrics?since=0", "/", "/api/snapshots")))

    with Served(run_dir) as s:
        answers = asyncio.run(many(s.port))
    assert len(answers) == 100 and [r.status_code for r in answers] == [200] * 100
    assert len({r.content for r in answers if r.url.path == "/api/state"}) == 1  # the same state, whole


def test_reads_run_off_the_event_loop_in_a_bounded_pool(run_dir, monkeypatch):
    running, most = [], []
    disk = threading.Event()  # a slow disk, held until the test has asked its question

    def slow_state(run):
        running.append(1)
        most.append(len(running))
        disk.wait(60)
        running.pop()
        return {"ok": True}

    monkeypatch.setattr(sources, "state", slow_state)

    async def many(port):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            slow = [asyncio.create_task(client.get("/api/state")) for _ in range(3 * server.THREADS)]
            deadline = time.monotonic() + 60
            while len(running) < server.THREADS and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            # The event loop is free meanwhile: what needs no file read (a 404) is answered while every
            # thread of the pool is held in a read. Were reads on the loop, this would time out.
            try:
                missing = await client.get("/nope", timeout=20)
                reading = len(running)
            finally:
                disk.set()
            return missing, reading, [r.status_code for r in await asyncio.gather(*slow)]

    with Served(run_dir) as s:
        missing, reading, statuses = asyncio.run(many(s.port))
    assert missing.status_code == 404 and reading == server.THREADS
    assert statuses == [200] * 3 * server.THREADS
    assert max(most) == server.THREADS  # as many at once as the pool has, no more


def test_past_the_connection_limit_a_request_is_refused_at_once(run_dir, monkeypatch):
    monkeypatch.setattr(listener, "MAX_CONNECTIONS", 4)
    with Served(run_dir) as s:
        held = [socket.create_connection(("127.0.0.1", s.port), timeout=30) for _ in range(4)]
        try:
            for c in held:
                c.sendall(b"GET / HTTP/1.1\r\n")
            assert request(s.port, "/api/state")[0] == 503
        finally:
            for c in held:
                c.close()
        for _ in range(100):  # the server notices the closed connections within a few loop turns
            status = request(s.port, "/api/state")[0]
            if status == 200:
                break
            time.sleep(0.05)
        assert status == 200


def test_answers_go_out_at_once_on_a_kept_connection(run_dir):
    """TCP_NODELAY on every connection: without it, each answer after the first on a keep-alive connection
    waits out the client's delayed ACK (40 ms)."""
    with Served(run_dir) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        try:
            for _ in range(2):
                conn.request("GET", "/api/state")
                assert conn.getresponse().read()
            sockets = [p.transport.get_extra_info("socket") for p in s.server.server.server_state.connections]
            assert sockets and all(x.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for x in sockets)
        finally:
            conn.close()


def test_a_half_sent_request_is_dropped_and_does_not_hold_up_others(run_dir, monkeypatch):
    monkeypatch.setattr(listener, "HEAD_TIMEOUT", 2)
    with Served(run_dir) as s:
        idle = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        idle.sendall(b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        trickle = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        assert request(s.port, "/api/state")[0] == 200  # meanwhile
        try:
            assert idle.recv(100) == b""  # closed by the server, with nothing sent
            # Sending a byte now and then does not keep a head waiting past its deadline.
            for _ in range(200):
                try:
                    trickle.sendall(b"G")
                except (BrokenPipeError, ConnectionResetError):
                    break
                time.sleep(0.05)
            else:
                pytest.fail("a request trickling in byte by byte was kept for 10 s")
        finally:
            idle.close()
            trickle.close()


# ------------------------------------------------------------------------------------------------ access rules
# The rules for routes that change state, on a small app of their own (the page's own: test_dashboard_controls.py).

def tiny_app(access: auth.Access) -> Starlette:
    done = []

    def change(request):
        done.append(request.method)
        return JSONResponse({"done": len(done)})

    app = Starlette(routes=[Route("/thing", change, methods=["GET", "POST", "DELETE"])],
                    middleware=[Middleware(auth.AccessMiddleware, access=access)])
    app.state.done = done
    return app


def serve_tiny(access: auth.Access) -> Serving:
    app = tiny_app(access)
    serving = Serving(Listener(app, "127.0.0.1", 0))
    serving.done = app.state.done  # what reached the route
    return serving


def test_a_change_on_loopback_needs_the_pages_own_origin():
    with serve_tiny(auth.Access.for_binding("127.0.0.1", None)) as s:
        own = f"http://127.0.0.1:{s.port}"
        done = s.done
        for origin in (None, "", "null", "http://evil.example", f"http://127.0.0.1:{s.port + 1}",
                       f"https://127.0.0.1:{s.port}", f"{own}.evil.example"):
            headers = {} if origin is None else {"Origin": origin}
            status, _h, body = request(s.port, "/thing", headers=headers, method="POST")
            assert status == 403 and b"own page" in body, (origin, status)
        # A CORS preflight from elsewhere is a change like any other: refused, and no CORS header says more.
        status, headers, _ = request(s.port, "/thing", method="OPTIONS", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert status == 403 and "Access-Control-Allow-Origin" not in headers
        assert done == []  # no refused request reached the route
        assert request(s.port, "/thing", headers={"Origin": own}, method="POST")[0] == 200
        assert request(s.port, "/thing", headers={"Origin": own.upper()}, method="DELETE")[0] == 200
        assert request(s.port, "/thing")[0] == 200  # a read needs no Origin
        # The page's own origin on a foreign Host is still a foreign host.
        assert request(s.port, "/thing", headers={"Origin": "http://evil.example", "Host": "evil.example"},
                       method="POST")[0] == 403
        assert done == ["POST", "DELETE", "GET"]


def test_a_change_off_loopback_needs_the_token_and_the_origin():
    access = auth.Access.for_binding("0.0.0.0", TOKEN)
    with serve_tiny(access) as s:
        own = {"Origin": f"http://127.0.0.1:{s.port}"}
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        cookie = {"Cookie": f"{auth.COOKIE}={TOKEN}"}
        assert request(s.port, "/thing", headers=own, method="POST")[0] == 401
        assert request(s.port, "/thing", headers={**own, "Cookie": f"{auth.COOKIE}="}, method="POST")[0] == 401
        assert request(s.port, "/thing", headers=bearer, method="POST")[0] == 403
        assert request(s.port, "/thing", headers={**cookie, "Origin": "http://evil.example"}, method="POST")[0] == 403
        assert request(s.port, "/thing", headers={**own, **bearer}, method="POST")[0] == 200
        assert request(s.port, "/thing", headers={**own, **cookie}, method="POST")[0] == 200
        # ?token= on a change is not turned into a redirect (a form cannot be replayed by one)
        assert request(s.port, f"/thing?token={TOKEN}", headers=own, method="POST")[0] == 200


def test_off_loopback_every_request_needs_the_token(run_dir):
    with Served(run_dir, host="0.0.0.0", token=TOKEN) as s:
        for path in ("/", "/api/state", "/static/app.js", "/api/metrics?since=0"):
            assert request(s.port, path)[0] == 401, path
        assert request(s.port, "/api/state?token=wrong")[0] == 401
        assert request(s.port, "/api/state", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(s.port, "/api/state", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        # ?token= sets a cookie and sends the browser to the same page without the token in its address.
        status, headers, _ = request(s.port, f"/?token={TOKEN}")
        assert status == 303 and headers["Location"] == "/"
        assert request(s.port, f"/api/metrics?since=3&token={TOKEN}")[1]["Location"] == "/api/metrics?since=3"
        cookie = headers["Set-Cookie"].split(";")[0]
        assert "httponly" in headers["Set-Cookie"].lower() and "samesite=strict" in headers["Set-Cookie"].lower()
        assert request(s.port, "/api/state", headers={"Cookie": cookie})[0] == 200
        assert request(s.port, "/api/state", headers={"Cookie": "evertrain_token=nope"})[0] == 401
        assert request(s.port, "/api/state", headers={"Cookie": "evertrain_token=" + TOKEN[:-1]})[0] == 401


EMPTY_CREDENTIALS = [{"Authorization": "Bearer "}, {"Authorization": "Bearer"}, {"Authorization": ""},
                     {"Cookie": "evertrain_token="}, {"Cookie": 'evertrain_token=""'}, {"Cookie": "evertrain_token"}]


def test_an_empty_credential_never_passes(run_dir):
    with Served(run_dir, host="0.0.0.0", token=TOKEN) as s:
        for headers in EMPTY_CREDENTIALS:
            assert request(s.port, "/api/state", headers=headers)[0] == 401, headers
        assert request(s.port, "/api/state?token=")[0] == 401
    # Even rules made with an empty token (for_binding refuses one) let no empty credential through.
    with Serving(Listener(tiny_app(auth.Access("", loopback=False)), "127.0.0.1", 0)) as s:
        for headers in EMPTY_CREDENTIALS:
            assert request(s.port, "/thing", headers=headers)[0] == 401, headers
        assert request(s.port, "/thing?token=")[0] == 401


@pytest.mark.parametrize("host, token", [("0.0.0.0", ""), ("0.0.0.0", "short"), ("127.0.0.1", "x" * 15)])
def test_cli_refuses_an_empty_or_short_token_at_start(tmp_path, capsys, host, token):
    from evertrain.cli import main

    assert main(["dashboard", str(tmp_path), "--host", host, "--port", "0", "--token", token]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"evertrain: dashboard: --token must have at least 16 characters (this one has "
                                f"{len(token)}); leave it out to have a random one made and printed"]
    assert "dashboard of" not in out  # it never served


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


def test_sigusr1_writes_where_every_thread_is_and_the_command_goes_on(run_dir):
    """What the README's "It seems stuck" gives a user: the stacks of a live `evertrain` process, which keeps on."""
    proc = subprocess.Popen([sys.executable, "-m", "evertrain", "dashboard", str(run_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(sources.__file__).parents[2])})
    try:
        line = proc.stdout.readline()
        port = int(line.split(" at ")[1].split(":")[2].split("/")[0])
        proc.send_signal(signal.SIGUSR1)
        assert request(port, "/api/state")[0] == 200  # still serving
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "(most recent call first)" in err and 'evertrain/cli.py", line' in err and " in cmd_dashboard" in err, err


def test_cli_refuses_a_missing_folder(tmp_path, capsys):
    from evertrain.cli import main

    assert main(["dashboard", str(tmp_path / "nope")]) == 2
    assert "nope: no such folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ readers


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
    state = sources.state(sources.open_view(tmp_path))
    assert [(f["original_name"], f["state"], f["duplicate_of"]) for f in state["files"]] == [
        ("a.jsonl", "done", None), ("copy-of-a.jsonl", "duplicate", 1)]
    assert [c["pinned"] for c in state["checkpoints"][:2]] == [False, True]
