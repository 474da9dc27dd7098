"""The dashboard's web server: the page from the package's static/ folder, the run's data as JSON.

    evertrain dashboard DIR                          # http://127.0.0.1:8777/, loopback only, no token
    evertrain dashboard DIR --host 0.0.0.0           # reachable from elsewhere: prints a URL with a token
    python bench/dashboard_load.py                   # 500 clients at once, 1,000 half-sent requests

GET /                       the page (static/index.html; it polls the API every 2 s)
GET /static/NAME            one of the files shipped in static/ (a fixed list: nothing else is ever served)
GET /api/state              status, files and queue, checkpoints, forgetting matrix
GET /api/metrics?since=N    metric columns of the steps after N, file spans
GET /api/snapshots          snapshot steps and tracked examples with their per-step summary
GET /api/snapshot/N         one snapshot (tokens right/wrong, prediction, generation)
GET /api/feedback           what `evertrain serve --collect-feedback` received, and each file's state in the ledger
POST /api/ask               two checkpoints' answers to a prompt, streamed (ask.py: generation off the event loop)

Starlette routes served by uvicorn (web/listener.py). Who may ask is decided in web/access.py, for every route. The
reads of `sources` block on files, so the routes are plain functions: Starlette runs them in its thread pool,
held to THREADS. A bad query value is a 400 with a short message; anything unexpected a 500 that says only
that (the traceback goes to the log). Workspace files are only reached through `sources`, by names built
here, never from the request path.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlencode

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from evertrain.dashboard import actions, ask, sources
from evertrain.dashboard.answers import BadQuery, as_json, step_number
from evertrain.web import access as auth
from evertrain.web.listener import SECURITY_HEADERS, Guard, Listener, room_for_connections

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml",
                 ".txt": "text/plain; charset=utf-8"}
THREADS = 8              # file reads at once (anyio's default pool is 40): more would only wait on the same disk


def static_files() -> dict[str, Path]:
    """The whitelist: exactly the plain files shipped in static/, by name."""
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in CONTENT_TYPES}


def build_app(run: sources.View, access: auth.Access) -> Starlette:
    static = static_files()

    def static_file(name: str) -> Response:
        path = static.get(name)  # a name, never a path: '..', '/', '%2e' match nothing
        if path is None:
            return as_json({"error": "not found"}, 404)
        return Response(path.read_bytes(), media_type=CONTENT_TYPES[path.suffix],
                        headers={"Cache-Control": "no-cache"})

    def metrics(request: Request) -> Response:
        return as_json(sources.metrics(run, step_number(request.query_params.get("since", "0"), "since")))

    def snapshot(request: Request) -> Response:
        step = step_number(request.path_params["step"], "the snapshot's step")
        snap = sources.snapshot(run, step)
        return as_json(snap) if snap is not None else as_json({"error": f"no snapshot for step {step}"}, 404)

    def evolution(request: Request) -> Response:
        ex_id = request.path_params["example"]
        found = sources.example_evolution(run, ex_id)
        return as_json(found) if found is not None else as_json({"error": f"no tracked example {ex_id}"}, 404)

    routes = [Route(path, endpoint, methods=["GET"]) for path, endpoint in [
        ("/", lambda request: static_file("index.html")),
        ("/index.html", lambda request: static_file("index.html")),
        ("/static/{name}", lambda request: static_file(request.path_params["name"])),
        ("/api/state", lambda request: as_json(sources.state(run))),
        ("/api/metrics", metrics),
        ("/api/snapshots", lambda request: as_json(sources.snapshots_index(run))),
        ("/api/snapshot/{step}", snapshot),
        ("/api/evolution/{example}", evolution),
        ("/api/feedback", lambda request: as_json(sources.feedback(run))),
    ]] + actions.routes(run)
    routes.append(ask.route(run.root))
    return Starlette(routes=routes, lifespan=bounded_threads,
                     middleware=[Middleware(Guard), Middleware(auth.AccessMiddleware, access=access)],
                     exception_handlers={BadQuery: bad_query, HTTPException: http_error, Exception: server_error})


# The handlers are async, though they read nothing: Starlette runs a plain one in its thread pool, where a
# 404 would wait behind THREADS slow reads.
async def bad_query(request: Request, exc: BadQuery) -> Response:
    return as_json({"error": str(exc)}, 400)


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (404, 405 with its Allow header) as JSON, like every other answer."""
    return as_json({"error": exc.detail.lower()}, exc.status_code, exc.headers)


async def server_error(request: Request, exc: Exception) -> Response:
    # Outside the middleware (Starlette answers it last), so the headers are added here. Starlette raises
    # the exception again after this answer, and uvicorn logs it with its traceback.
    return as_json({"error": "internal error: the dashboard's log says what went wrong"}, 500, SECURITY_HEADERS)


@asynccontextmanager
async def bounded_threads(app: Starlette):
    anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
    yield


class DashboardServer(Listener):
    def __init__(self, root: Path, host: str, port: int, token: str | None):
        self.access = auth.Access.for_binding(host, token)  # before binding: a refused token never listens
        self.run = sources.open_view(root)
        super().__init__(build_app(self.run, self.access), host, port)

    @property
    def url(self) -> str:
        host = self.socket.getsockname()[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/" + (f"?{urlencode({'token': self.access.token})}"
                                                 if self.access.token else "")


def make_server(root: Path, host: str = "127.0.0.1", port: int = 8777, token: str | None = None,
                ) -> DashboardServer:
    """A server for the run in `root`, listening but not yet answering. Raises auth.TokenRefused."""
    return DashboardServer(root, host, port, token)


def serve(root: Path, host: str = "127.0.0.1", port: int = 8777, token: str | None = None) -> int:
    server = make_server(root, host, port, token)
    room_for_connections()
    run = server.run
    print(f"evertrain: dashboard of {run.root} ({'workspace' if run.daemon else 'train output dir'}) "
          f"at {server.url}", flush=True)
    if server.access.token:
        print("evertrain: the token is required from every client; keep this URL private", flush=True)
    server.serve_until_stopped()
    return 0
