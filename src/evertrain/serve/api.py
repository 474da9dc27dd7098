"""The OpenAI-compatible HTTP API of `evertrain serve`.

    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "ws", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

GET  /v1/models             the served model, with the version it is at (global step, checkpoint, files learned)
POST /v1/chat/completions   messages -> an answer through the model's chat template; "stream": true for
                            server-sent events (chat.completion.chunk ... data: [DONE])
POST /v1/completions        a prompt -> its continuation (for base models without a chat template)
POST /v1/feedback           {"id": <a response's id>, "rating": "good" | "bad", "correction": "..."}
                            (with --collect-feedback; feedback.py)
GET  /health                {"status": "ok", "version": ...}

Every answer names the version it came from: `model` is "<name>:step-N" (or "<name>:base"),
`system_fingerprint` "evertrain-step-N-files-K", and the headers X-Evertrain-Version (step-N), X-Evertrain-
Checkpoint and X-Evertrain-Files (how many files it has learned). A bad request gets 400 in OpenAI's error shape
({"error": {"message", "type", "param", "code"}}), never a traceback; a full queue 429 with Retry-After. Who
may call it: web/access.py's rules (the token as `Authorization: Bearer`, which is the OpenAI client's api_key);
a request that carries a browser's Origin must come from this server's own.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from evertrain.serve.engine import Ask, Engine
from evertrain.serve.versions import Version, Versions
from evertrain.web.access import Access
from evertrain.web.listener import Guard, worker_events

MAX_BODY = 1 << 20        # bytes of a request's JSON
ROLES = {"system", "developer", "user", "assistant"}
DISCONNECT_POLL = 0.25    # seconds between looks at a non-streamed request's connection while it is answered


class BadRequest(ValueError):
    """A request the API refuses, with OpenAI's error fields."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.param, self.code, self.status, self.kind, self.headers = param, code, status, kind, headers or {}


def error(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict | None = None) -> Response:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers={"Cache-Control": "no-store", **(headers or {})})


class Limits:
    """What one request may ask (the command's --max-tokens, --max-prompt-tokens, --timeout)."""

    def __init__(self, max_tokens: int = 512, max_prompt_tokens: int = 4096, timeout: float = 120.0):
        self.max_tokens, self.max_prompt_tokens, self.timeout = max_tokens, max_prompt_tokens, timeout


def build_app(name: str, versions: Versions, engine: Engine, access: Access, limits: Limits,
              feedback=None) -> Starlette:
    """The API's routes for the model called `name`; `feedback`: a feedback.Log (None: not collected)."""

    async def models(request: Request) -> Response:
        v = versions.current
        return JSONResponse({"object": "list", "data": [{
            "id": name, "object": "model", "created": int(v.loaded_at), "owned_by": "evertrain",
            "evertrain": describe(v)}]}, headers=version_headers(v))

    async def health(request: Request) -> Response:
        v = versions.current
        return JSONResponse({"status": "ok", "version": describe(v), "queued": engine.waiting.qsize(),
                             "generating": engine.active})

    async def chat(request: Request) -> Response:
        body = await read_body(request)
        check_model(body, name)
        messages = parse_messages(body.get("messages"))
        return await respond(request, body, "chat", messages=messages)

    async def completions(request: Request) -> Response:
        body = await read_body(request)
        check_model(body, name)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string", "prompt")
        return await respond(request, body, "text", prompt=prompt)

    async def respond(request: Request, body: dict, kind: str, *, messages=None, prompt=None) -> Response:
        settings = parse_settings(body, limits)
        check_prompt_length(versions.current, messages, prompt, limits)
        events, emit = worker_events()
        ask = Ask(messages=messages, prompt=prompt, emit=emit, timeout=limits.timeout, **settings)
        if not engine.submit(ask):
            return error(429, f"busy: {engine.waiting.maxsize} requests are already waiting; try again shortly",
                         kind="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "2"})
        made = Made(kind, name)
        try:
            first = await next_event(request, events, ask)
        except asyncio.CancelledError:
            ask.cancel.set()
            raise
        if first is None:  # the client went away before its answer began
            return Response(status_code=499)
        if first["type"] == "error":
            return error(500, first["message"], kind="server_error")
        version = first["version"]
        made.start(version, first["prompt_tokens"])
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream(made, events, ask, usage, messages, prompt), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", **version_headers(version)})
        text, end = [], None
        while end is None:
            event = await next_event(request, events, ask)
            if event is None:
                return Response(status_code=499)
            if event["type"] == "text":
                text.append(event["text"])
            elif event["type"] == "error":
                return error(500, event["message"], kind="server_error")
            elif event["type"] == "end":
                end = event
        answer = "".join(text)
        served(made, messages, prompt, answer)
        return JSONResponse(made.whole(answer, end), headers=version_headers(version))

    async def stream(made: "Made", events: asyncio.Queue, ask: Ask, usage: bool, messages, prompt):
        text = []
        try:
            yield sse(made.chunk(role=True))
            while True:
                event = await events.get()
                if event["type"] == "text":
                    text.append(event["text"])
                    yield sse(made.chunk(event["text"]))
                elif event["type"] == "error":
                    yield sse({"error": {"message": event["message"], "type": "server_error", "param": None,
                                         "code": None}})
                    return
                elif event["type"] == "end":
                    yield sse(made.chunk(finish=event["reason"]))
                    if usage:
                        yield sse(made.usage_chunk(event))
                    served(made, messages, prompt, "".join(text))
                    yield "data: [DONE]\n\n"
                    return
        finally:  # finished, or the client went away: its generation stops at the next token
            ask.cancel.set()

    def served(made: "Made", messages, prompt, answer: str) -> None:
        if feedback is not None:
            feedback.served(made.id, messages=messages, prompt=prompt, answer=answer, version=made.version.label,
                            step=made.version.target.step)

    async def rate(request: Request) -> Response:
        if feedback is None:
            raise BadRequest("feedback is not collected by this server (start it with --collect-feedback)",
                             status=404, code="feedback_off")
        body = await read_body(request)
        return JSONResponse(await run_in_threadpool(feedback.rate, body))  # it waits for the disk

    routes = [Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/feedback", rate, methods=["POST"])]
    return Starlette(routes=routes, middleware=[Middleware(Guard), Middleware(ApiAccess, access=access)],
                     exception_handlers={BadRequest: bad_request, HTTPException: http_error, Exception: server_error})


class Made:
    """The pieces of one answer in OpenAI's shapes."""

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.version: Version | None = None
        self.prompt_tokens = 0

    def start(self, version: Version, prompt_tokens: int) -> None:
        self.version, self.prompt_tokens = version, prompt_tokens

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": f"{self.name}:{self.version.label}",
                "system_fingerprint": fingerprint(self.version)}

    def usage(self, end: dict) -> dict:
        return {"prompt_tokens": end["prompt_tokens"], "completion_tokens": end["completion_tokens"],
                "total_tokens": end["prompt_tokens"] + end["completion_tokens"]}

    def whole(self, text: str, end: dict) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": end["reason"]}
            return {**self.head("chat.completion"), "choices": [choice], "usage": self.usage(end)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": end["reason"]}
        return {**self.head("text_completion"), "choices": [choice], "usage": self.usage(end)}

    def chunk(self, text: str | None = None, *, role: bool = False, finish: str | None = None) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            return {**self.head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return {**self.head("text_completion"),
                "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

    def usage_chunk(self, end: dict) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self.head(obj), "choices": [], "usage": self.usage(end)}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def describe(v: Version) -> dict:
    return {"version": v.label, "step": v.target.step, "checkpoint": v.target.checkpoint,
            "files": list(v.target.files), "loaded_at": v.loaded_at,
            "load_seconds": round(v.load_seconds, 3)}


def fingerprint(v: Version) -> str:
    return f"evertrain-{v.label}-files-{len(v.target.files)}"


def version_headers(v: Version) -> dict:
    return {"X-Evertrain-Version": v.label, "X-Evertrain-Checkpoint": v.target.checkpoint or "base",
            "X-Evertrain-Files": str(len(v.target.files)),
            **({"X-Evertrain-Last-File": quote(v.target.files[-1])} if v.target.files else {})}


async def next_event(request: Request, events: asyncio.Queue, ask: Ask) -> dict | None:
    """The request's next event; None (and its generation cancelled) when its client has gone away."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                ask.cancel.set()
                return None


# ------------------------------------------------------------------------------------------------- requests

async def read_body(request: Request) -> dict:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadRequest(f"the request is larger than {MAX_BODY} bytes", status=413)
    try:
        data = json.loads(body)
    except ValueError as e:
        raise BadRequest(f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def check_model(body: dict, name: str) -> None:
    model = body.get("model")
    if model is None:
        raise BadRequest("'model' is required (this server serves one: " + repr(name) + ")", "model")
    if not isinstance(model, str) or (model != name and not model.startswith(name + ":")):
        raise BadRequest(f"the model {str(model)[:80]!r} does not exist; this server serves {name!r}", "model",
                         "model_not_found", status=404)


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object with 'role' and 'content'", where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRequest(f"{where}.role must be one of {sorted(ROLES)}, not {str(role)[:40]!r}", f"{where}.role")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadRequest(f"{where}.content: only text parts are served ({{'type': 'text', 'text': ...}})",
                                     f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadRequest(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_settings(body: dict, limits: Limits) -> dict:
    """max_tokens (or max_completion_tokens), temperature, top_p, stop, seed; n must be 1."""
    given = [k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
    max_tokens = body[given[0]] if given else limits.max_tokens
    if not _integer(max_tokens) or not 1 <= max_tokens <= limits.max_tokens:
        raise BadRequest(f"'{given[0] if given else 'max_tokens'}' must be a whole number from 1 to "
                         f"{limits.max_tokens} (this server's --max-tokens)", given[0] if given else "max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise BadRequest("'top_p' must be above 0", "top_p")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and not _integer(seed):
        raise BadRequest("'seed' must be a whole number", "seed")
    if body.get("n", 1) != 1:
        raise BadRequest("'n' must be 1: this server makes one answer per request", "n")
    if body.get("logprobs") or body.get("tools") or body.get("functions"):
        which = next(k for k in ("logprobs", "tools", "functions") if body.get(k))
        raise BadRequest(f"'{which}' is not supported by this server", which)
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be true or false", "stream")
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "stop": stop, "seed": seed}


def check_prompt_length(version: Version, messages, prompt, limits: Limits) -> None:
    from evertrain.export.chat import prompt_ids

    tok = version.tokenizer
    n = (prompt_ids(tok, messages) if messages is not None else tok(prompt, return_tensors="pt"))["input_ids"].shape[1]
    if n > limits.max_prompt_tokens:
        raise BadRequest(f"the prompt has {n} tokens, more than this server's --max-prompt-tokens "
                         f"({limits.max_prompt_tokens})", "messages" if messages is not None else "prompt",
                         "context_length_exceeded")


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    x = body.get(key)
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not low <= x <= high:
        raise BadRequest(f"'{key}' must be a number from {low:g} to {high:g}", key)
    return float(x)


# ------------------------------------------------------------------------------------------------- errors

async def bad_request(request: Request, exc: BadRequest) -> Response:
    return error(exc.status, str(exc), kind=exc.kind, param=exc.param, code=exc.code, headers=exc.headers)


async def http_error(request: Request, exc: HTTPException) -> Response:
    return error(exc.status_code, str(exc.detail).lower(), headers=exc.headers,
                 kind="not_found_error" if exc.status_code == 404 else "invalid_request_error")


async def server_error(request: Request, exc: Exception) -> Response:
    return error(500, "internal error: the server's log says what went wrong", kind="server_error")


class ApiAccess:
    """web/access.py's rules in OpenAI's error shape; and a browser's request (one with an Origin) must come
    from this server's own page: another site's script cannot spend this server's answers or post feedback."""

    def __init__(self, app: ASGIApp, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refused = self.access.refusal(request)
        if refused is None and request.headers.get("origin"):
            refused = self.access.refusal_to_change(request)
        if refused is not None:
            message = json.loads(refused.body)["error"]
            headers = {k: v for k, v in refused.headers.items() if k.lower() == "www-authenticate"}
            kind = "authentication_error" if refused.status_code == 401 else "permission_error"
            return await error(refused.status_code, message, kind=kind, headers=headers)(scope, receive, send)
        await self.app(scope, receive, send)
