"""What the page may change in a daemon workspace: the same controls as the CLI, and an upload into the inbox.

Every route here is a POST: `server.build_app` puts them behind `web/access.py's AccessMiddleware`, so each needs the
token (when there is one) and an Origin equal to the page's own. Nothing here trains or decides: a control is
the request file the daemon reads before every optimizer step (daemon/controls.py), a pin or a priority is a
ledger update, an upload is a file renamed into inbox/ like one copied in, taken by the same intake.

    POST /api/control/pause|resume|stop|skip
    POST /api/pin/STEP, /api/unpin/STEP
    POST /api/priority/FILE_ID/low|normal|high|urgent
    POST /api/upload?name=FILE.jsonl      (the body is the file)

    pytest -q tests/test_dashboard_controls.py
"""

from __future__ import annotations

import inspect
import os
import secrets
from contextlib import closing

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from evertrain.daemon import controls, status
from evertrain.daemon.ledger import Ledger
from evertrain.daemon.workspace import PRIORITIES, daemon_pid, safe_name
from evertrain.runs import Workspace

CONTROLS = ("pause", "resume", "stop", "skip")


def answer(message: str, code: int = 200) -> Response:
    key = "message" if code < 400 else "error"
    return JSONResponse({key: message}, code, headers={"Cache-Control": "no-store"})


def routes(run) -> list[Route]:
    def in_workspace(handler):
        """The route for handler(request, ws): refused outside a daemon workspace; a plain function (SQLite may
        wait on the daemon's lock) runs in the server's thread pool, off the event loop."""
        async def endpoint(request: Request) -> Response:
            if not run.daemon:
                return answer("this is the output folder of `evertrain train`: controls need a daemon workspace",
                              409)
            if inspect.iscoroutinefunction(handler):
                return await handler(request, Workspace(run.root))
            return await run_in_threadpool(handler, request, Workspace(run.root))
        return endpoint

    def control(request: Request, ws: Workspace) -> Response:
        action = request.path_params["action"]
        if action not in CONTROLS:
            return answer(f"no control {action!r}; there are {', '.join(CONTROLS)}", 404)
        if action == "pause":
            controls.pause(ws)
            return answer("paused at the next optimizer step")
        if action == "resume":
            return answer("resumed" if controls.resume(ws) else "it was not paused")
        if daemon_pid(ws) is None:
            return answer(f"no daemon is running on this workspace; nothing to {action}", 409)
        if action == "stop":
            controls.stop(ws)
            return answer("the daemon checkpoints and stops at the next optimizer step")
        current = (status.read(ws) or {}).get("current_file_id")
        if current is None:
            return answer("no file is in training; nothing to skip", 409)
        controls.skip(ws, current)
        return answer(f"file id {current} is skipped at the next optimizer step")

    def pin(request: Request, ws: Workspace) -> Response:
        with closing(Ledger.open(ws)) as ledger:
            ok, message = controls.pin(ws, ledger, request.path_params["step"],
                                       on=request.url.path.startswith("/api/pin/"))
        return answer(message, 200 if ok else 404)

    def priority(request: Request, ws: Workspace) -> Response:
        wanted = request.path_params["priority"]
        if wanted not in PRIORITIES:
            return answer(f"priority must be one of {', '.join(PRIORITIES)}", 400)
        file_id = request.path_params["file_id"]
        with closing(Ledger.open(ws)) as ledger:
            changed = ledger.set_priority(file_id, wanted)
        return answer(f"file id {file_id} is now {wanted}") if changed else \
            answer(f"no queued file with id {file_id}", 404)

    async def upload(request: Request, ws: Workspace) -> Response:
        name = safe_name(os.path.basename(request.query_params.get("name", "")))
        if name == "file":
            return answer("give the file's name: /api/upload?name=FILE.jsonl", 400)
        # A hidden temporary name that intake never takes, renamed into place once whole: the documented safe way.
        tmp = ws.inbox / f".upload-{secrets.token_hex(6)}-{name}.tmp"
        try:
            with open(tmp, "wb") as f:
                async for chunk in request.stream():
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            size, target = tmp.stat().st_size, free_name(ws, name)
            os.rename(tmp, target)  # from here on intake may take it at any moment
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return answer(f"{target.name} is in the inbox ({size} bytes); it is taken, checked and "
                      "queued like any file dropped there")

    return [Route(path, in_workspace(handler), methods=["POST"]) for path, handler in (
        ("/api/control/{action}", control), ("/api/pin/{step:int}", pin), ("/api/unpin/{step:int}", pin),
        ("/api/priority/{file_id:int}/{priority}", priority), ("/api/upload", upload))]


def free_name(ws: Workspace, name: str):
    """inbox/NAME, or NAME-2, NAME-3, ... when a file of that name waits there already (never overwritten)."""
    stem, dot, suffix = name.partition(".")
    target, n = ws.inbox / name, 1
    while target.exists():
        n += 1
        target = ws.inbox / f"{stem}-{n}{dot}{suffix}"
    return target
