"""The dashboard's web server: the page from the package's static/ folder, the run's data as JSON.

    evertrain dashboard DIR                          # http://127.0.0.1:8777/, loopback only, no token
    evertrain dashboard DIR --host 0.0.0.0           # reachable from elsewhere: prints a URL with a token

GET /                       the page (static/index.html; it polls the API every 2 s)
GET /static/NAME            one of the files shipped in static/ (a fixed list: nothing else is ever served)
GET /api/state              status, files and queue, checkpoints, forgetting matrix
GET /api/metrics?since=N    metric columns of the steps after N, file spans
GET /api/snapshots          snapshot steps and tracked examples with their per-step summary
GET /api/snapshot/N         one snapshot (tokens right/wrong, prediction, generation)

Workspace files are only reached through `sources`, by names built here (never from the request path).
Bound to a loopback address, requests must name a loopback Host (a web page elsewhere cannot rebind its
domain to reach it). Bound elsewhere, every request needs the token: `?token=` (then kept in a cookie) or
`Authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import secrets
import socket
import sys
import traceback
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

from evertrain.dashboard import sources

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml",
                 ".txt": "text/plain; charset=utf-8"}
COOKIE = "evertrain_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # uPlot positions its parts with inline styles; scripts come only from /static.
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                               "frame-ancestors 'none'",
}


def static_files() -> dict[str, Path]:
    """The whitelist: exactly the plain files shipped in static/, by name."""
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in CONTENT_TYPES}


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, run: sources.Run, host: str, port: int, token: str | None):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.run, self.token, self.loopback = run, token, is_loopback(host)
        self.static = static_files()
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/" + (f"?{urlencode({'token': self.token})}" if self.token else "")


class Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not self.allowed(query):
            return
        if "token" in query:  # keep it in a cookie, and out of the address bar and of links
            clean = url.path + (f"?{urlencode({k: v for k, v in query.items() if k != 'token'}, doseq=True)}"
                                if len(query) > 1 else "")
            cookie = f"{COOKIE}={self.server.token}; Path=/; HttpOnly; SameSite=Strict"
            return self.send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": clean, "Set-Cookie": cookie})
        try:
            self.route(url.path, query)
        except Exception as e:  # one bad read must not take the page down: show it there
            traceback.print_exc(file=sys.stderr)
            self.json({"error": f"{type(e).__name__}: {e}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def route(self, path: str, query: dict) -> None:
        run = self.server.run
        if path in ("/", "/index.html"):
            return self.static("index.html")
        if path.startswith("/static/"):
            return self.static(path[len("/static/"):])
        if path == "/api/state":
            return self.json(sources.state(run))
        if path == "/api/metrics":
            since = query.get("since", ["0"])[0]
            if not since.lstrip("-").isdigit():
                return self.json({"error": "since must be a step number"}, HTTPStatus.BAD_REQUEST)
            return self.json(sources.metrics(run, int(since)))
        if path == "/api/snapshots":
            return self.json(sources.snapshots_index(run))
        if path.startswith("/api/snapshot/"):
            step = path[len("/api/snapshot/"):]
            snap = sources.snapshot(run, int(step)) if step.isdigit() and step.isascii() else None
            if snap is None:
                return self.json({"error": f"no snapshot for step {step}"}, HTTPStatus.NOT_FOUND)
            return self.json(snap)
        self.json({"error": "not found"}, HTTPStatus.NOT_FOUND)

    def allowed(self, query: dict) -> bool:
        """The token when one is set; otherwise (loopback) a loopback Host header."""
        server = self.server
        if server.token is None:
            host = urlsplit(f"//{self.headers.get('Host', '')}").hostname or ""
            if server.loopback and not is_loopback(host):
                self.json({"error": f"bound to loopback, this dashboard answers only to localhost or 127.0.0.1, "
                                    f"not {host!r}; to reach it by another name, start it with --host and use "
                                    "the token it prints"}, HTTPStatus.FORBIDDEN)
                return False
            return True
        given = []
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given.append(auth[len("Bearer "):].strip())
        given += query.get("token", [])
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie", ""))
        except Exception:
            pass
        if COOKIE in cookie:
            given.append(cookie[COOKIE].value)
        if any(hmac.compare_digest(g.encode(), server.token.encode()) for g in given):
            return True
        self.json({"error": "token required: open the URL with ?token=... that `evertrain dashboard` printed"},
                  HTTPStatus.UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
        return False

    def static(self, name: str) -> None:
        path = self.server.static.get(name)  # a name, never a path: '..', '/', '%2e' match nothing
        if path is None:
            return self.json({"error": "not found"}, HTTPStatus.NOT_FOUND)
        body = path.read_bytes()
        self.send(HTTPStatus.OK, body, CONTENT_TYPES[path.suffix], {"Cache-Control": "no-cache"})

    def json(self, data, status: HTTPStatus = HTTPStatus.OK, headers: dict | None = None) -> None:
        body = json.dumps(finite(data), separators=(",", ":")).encode()
        self.send(status, body, "application/json", {"Cache-Control": "no-store", **(headers or {})})

    def send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**SECURITY_HEADERS, **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass  # a poll every 2 s would flood the terminal; errors are printed where they happen


def finite(x):
    """JSON has no NaN/Infinity (the browser's parser refuses them): send null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def make_server(root: Path, host: str = "127.0.0.1", port: int = 8777, token: str | None = None,
                ) -> DashboardServer:
    """A server for the run in `root` (not yet serving). Off loopback a token is always required."""
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
    return DashboardServer(sources.open_run(root), host, port, token)


def serve(root: Path, host: str = "127.0.0.1", port: int = 8777, token: str | None = None) -> int:
    server = make_server(root, host, port, token)
    run = server.run
    print(f"evertrain: dashboard of {run.root} ({'workspace' if run.daemon else 'train output dir'}) "
          f"at {server.url}", flush=True)
    if server.token:
        print("evertrain: the token is required from every client; keep this URL private", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
