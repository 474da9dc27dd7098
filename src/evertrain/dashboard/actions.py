"""What the page may change in a daemon workspace: the same controls as the CLI, and an upload into the inbox.

Every route here is a POST: `server.build_app` puts them behind `auth.AccessMiddleware`, so each needs the
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

import os
import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from evertrain.daemon import controls, status
from evertrain.daemon.ledger import Ledger
from evertrain.daemon.workspace import PRIORITIES, Workspace, daemon_pid, safe_name

CONTROLS = ("pause", "resume", "stop", "skip")


def answer(message: str, code: int = 200) -> Response:
    key = "message" if code < 400 else "error"
    return JSONResponse({key: message}, code, headers={"Cache-Control": "no-store"})


def routes(run) -> list[Route]:
    def workspace() -> Workspace | None:
        return Workspace(run.root) if run.daemon else None

    def refused() -> Response:
        return answer("this is the output folder of `evertrain train`: controls need a daemon workspace", 409)

    def control(request: Request) -> Response:
        ws, action = workspace(), request.path_params["action"]
        if ws is None:
            return refused()
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

    def pin(request: Request) -> Response:
        ws = workspace()
        if ws is None:
            return refused()
        try:
            step = int(request.path_params["step"])
        except ValueError:
            return answer("the step must be a number", 400)
        ledger = Ledger.open(ws)
        try:
            ok, message = controls.pin(ws, ledger, step, on=request.url.path.startswith("/api/pin/"))
        finally:
            ledger.close()
        return answer(message, 200 if ok else 404)

    def priority(request: Request) -> Response:
        ws, wanted = workspace(), request.path_params["priority"]
        if ws is None:
            return refused()
        if wanted not in PRIORITIES:
            return answer(f"priority must be one of {', '.join(PRIORITIES)}", 400)
        try:
            file_id = int(request.path_params["file_id"])
        except ValueError:
            return answer("the file id must be a number", 400)
        ledger = Ledger.open(ws)
        try:
            changed = ledger.set_priority(file_id, wanted)
        finally:
            ledger.close()
        return answer(f"file id {file_id} is now {wanted}") if changed else \
            answer(f"no queued file with id {file_id}", 404)

    async def upload(request: Request) -> Response:
        ws = workspace()
        if ws is None:
            return refused()
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

    return [Route("/api/control/{action}", control, methods=["POST"]),
            Route("/api/pin/{step}", pin, methods=["POST"]),
            Route("/api/unpin/{step}", pin, methods=["POST"]),
            Route("/api/priority/{file_id}/{priority}", priority, methods=["POST"]),
            Route("/api/upload", upload, methods=["POST"])]


def free_name(ws: Workspace, name: str):
    """inbox/NAME, or NAME-2, NAME-3, ... when a file of that name waits there already (never overwritten)."""
    stem, dot, suffix = name.partition(".")
    target, n = ws.inbox / name, 1
    while target.exists():
        n += 1
        target = ws.inbox / f"{stem}-{n}{dot}{suffix}"
    return target
