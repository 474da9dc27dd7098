"""Ask the model from the dashboard: POST /api/ask answers one prompt by two checkpoints, streamed side by side.

    evertrain dashboard DIR      # the page's "Ask the model" box; or, from a script on the same machine:
    curl -N -H "Origin: http://127.0.0.1:8777" -d '{"prompt": "Hi", "a": "base", "b": "newest"}' \\
        http://127.0.0.1:8777/api/ask

Generation runs in the dashboard's own process, never in the training one: in ONE worker thread here (one
request at a time, QUEUE more waiting; past that 429), with at most MAX_NEW_TOKENS per answer and TORCH_THREADS
threads of compute, on complete checkpoints only (export.open_source verifies them). So a question can slow
the machine a little, but it can neither stop nor hang the daemon. A client that goes away cancels its answer
at the next token. The answer is a stream of server-sent events, one JSON object each:
{"type": "start", "side": 0, "label": "checkpoint-12 (step 12)", "step": 12}, {"type": "token", "side": 0,
"text": "..."}, {"type": "done", "side": 0}, {"type": "error", "side": 0, "message": "..."}, {"type": "end"}.
Who may ask is web/access.py's rule for a request that computes something: the token (off loopback) and the page's
own Origin; server.build_app puts this route behind it like every other.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from evertrain.runs import open_run
from evertrain.train import checkpoint
from evertrain.config import ConfigError
from evertrain.dashboard.answers import BadQuery, as_json
from evertrain.web.listener import worker_events

QUEUE = 4              # questions waiting behind the one being answered
MAX_NEW_TOKENS = 200   # per answer
MAX_PROMPT = 4000      # characters
MAX_BODY = 16384       # bytes of the request's JSON
LOADED = 3             # models kept in memory between questions (base, newest, one more)
TORCH_THREADS = 2      # compute threads for generation: the machine's other cores stay with training
NEWEST = "newest"

log = logging.getLogger("evertrain.dashboard")


@dataclass
class Question:
    prompt: str
    sides: list            # each: "base", NEWEST or a global step
    max_new_tokens: int
    emit: Callable[[dict], None]
    cancel: threading.Event = field(default_factory=threading.Event)


class Asker:
    """The one worker thread that answers questions, in order, and the models it keeps loaded."""

    def __init__(self, root: Path):
        self.root = root
        self.waiting: queue.Queue[Question] = queue.Queue(QUEUE)
        self.loaded: OrderedDict = OrderedDict()
        self.worker: threading.Thread | None = None
        self.lock = threading.Lock()

    def submit(self, question: Question) -> bool:
        """False when the queue is full (the caller answers 429)."""
        with self.lock:
            if self.worker is None:
                self.worker = threading.Thread(target=self.work, name="evertrain-ask", daemon=True)
                self.worker.start()
        try:
            self.waiting.put_nowait(question)
        except queue.Full:
            return False
        return True

    def work(self) -> None:
        import torch

        torch.set_num_threads(TORCH_THREADS)
        while True:
            question = self.waiting.get()
            try:
                if not question.cancel.is_set():  # its client left while it waited
                    self.answer(question)
            finally:
                question.emit({"type": "end"})

    def answer(self, question: Question) -> None:
        from evertrain.export import chat

        settings = chat.Settings(max_new_tokens=question.max_new_tokens)
        messages = [{"role": "user", "content": question.prompt}]
        for side, which in enumerate(question.sides):
            try:
                who = self.speaker(which)
                question.emit({"type": "start", "side": side, "label": who.label, "step": who.step})
                for piece in chat.stream(who, messages, settings, question.cancel):
                    question.emit({"type": "token", "side": side, "text": piece})
                question.emit({"type": "done", "side": side})
            except ConfigError as e:  # no such checkpoint, a damaged one: said to the page as it is
                question.emit({"type": "error", "side": side, "message": str(e)})
            except Exception:
                log.exception("ask: answering with %s failed", which)
                question.emit({"type": "error", "side": side,
                               "message": "internal error: the dashboard's log says what went wrong"})

    def speaker(self, which):
        from evertrain.export import chat
        if which == NEWEST:  # resolved to a step here, so that a newer checkpoint is a new model, not a stale one
            found = checkpoint.candidates(open_run(self.root).run_dir)
            ready = next((c for c in found if checkpoint.verify(c, full=False) is None), None)
            which = ready.step if ready else None
        key = which
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        who = chat.speaker(self.root, which)
        self.loaded[key] = who
        while len(self.loaded) > LOADED:
            self.loaded.popitem(last=False)
        return who


def side(value, name: str):
    if value in (None, "", NEWEST):
        return NEWEST
    if value == "base":
        return "base"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 13:
        return int(value)
    raise BadQuery(f"{name} must be 'base', 'newest' or a checkpoint's global step, not {str(value)[:40]!r}")


async def read_question(request: Request) -> dict:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadQuery(f"the question is longer than {MAX_BODY} bytes")
    try:
        data = json.loads(body)
    except ValueError:
        raise BadQuery('send JSON: {"prompt": "...", "a": "base", "b": "newest"}') from None
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
        raise BadQuery('"prompt" must be a non-empty string')
    if len(data["prompt"]) > MAX_PROMPT:
        raise BadQuery(f'"prompt" has more than {MAX_PROMPT} characters')
    n = data.get("max_new_tokens", MAX_NEW_TOKENS)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NEW_TOKENS:
        raise BadQuery(f'"max_new_tokens" must be a whole number from 1 to {MAX_NEW_TOKENS}')
    return {"prompt": data["prompt"], "sides": [side(data.get("a", "base"), '"a"'), side(data.get("b"), '"b"')],
            "max_new_tokens": n}


def route(root: Path) -> Route:
    asker = Asker(root)

    async def ask(request: Request) -> Response:
        asked = await read_question(request)
        events, emit = worker_events()
        question = Question(**asked, emit=emit)
        if not asker.submit(question):
            return as_json({"error": f"busy: {asker.waiting.maxsize} questions are already waiting; ask again in a moment"}, 429,
                           {"Retry-After": "10"})

        async def answer():
            try:
                while True:
                    event = await events.get()
                    yield f"data: {json.dumps(event)}\n\n"
                    if event["type"] == "end":
                        return
            finally:  # finished, or the client went away
                question.cancel.set()

        return StreamingResponse(answer(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    return Route("/api/ask", ask, methods=["POST"])
