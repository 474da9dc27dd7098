"""The HTTP server under the dashboard and the model server: uvicorn with limits on what a client may hold.

    python bench/dashboard_load.py       # 500 clients at once, 1,000 half-sent requests

Every answer gets SECURITY_HEADERS; an address longer than MAX_URL is refused (414); a request's head must come
within HEAD_TIMEOUT; past MAX_CONNECTIONS a request is answered 503 at once.
"""

from __future__ import annotations

import asyncio
import resource
import socket
from collections.abc import Callable

import h11
import uvicorn
from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # uPlot positions its parts with inline styles; scripts come only from /static.
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                               "frame-ancestors 'none'",
}
MAX_CONNECTIONS = 2048   # uvicorn's limit_concurrency: past it a request is answered 503 at once
BACKLOG = 2048           # connections the kernel holds until they are accepted (uvicorn's default)
HEAD_TIMEOUT = 10        # seconds for a request's line and headers to arrive
KEEP_ALIVE = 5           # seconds a connection may sit idle between requests
MAX_HEAD = 16384         # bytes of request line and headers while they arrive (h11): then 400
MAX_URL = 4096           # bytes of path and query: the page's own are under 100


class Guard:
    """SECURITY_HEADERS on every answer, refusals included; an address longer than MAX_URL refused (414):
    h11 bounds only a head that arrives in pieces, not one that came whole."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
            await send(message)

        if len(scope["raw_path"]) + len(scope["query_string"]) > MAX_URL:
            return await JSONResponse({"error": f"address longer than {MAX_URL} bytes"}, 414)(
                scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


class Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 with a deadline for each request's head. uvicorn times out a connection only while
    it is idle between requests: one that sent half a request would keep it, and its place under
    MAX_CONNECTIONS, for ever."""

    head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.await_head()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is h11.IDLE:  # the next request's head has not (entirely) come
            self.await_head()
        else:
            self.stop_waiting()

    def connection_lost(self, exc) -> None:
        self.stop_waiting()
        super().connection_lost(exc)

    def await_head(self) -> None:
        if self.head_deadline is None:  # from the first byte it waited for, not the last it got
            self.head_deadline = self.loop.call_later(HEAD_TIMEOUT, self.head_too_slow)

    def stop_waiting(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def head_too_slow(self) -> None:
        self.head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class Listener:
    """An ASGI app served by uvicorn with the limits above, on a socket bound and listening from here on
    (port 0: one the OS chose), so a client may connect before `serve_forever` runs."""

    def __init__(self, app: ASGIApp, host: str, port: int):
        # IPPROTO_TCP by name: asyncio sets TCP_NODELAY only on sockets that say so, and without it a
        # keep-alive client waits out the delayed ACK (40 ms) for every answer.
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                                    socket.IPPROTO_TCP)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.server = uvicorn.Server(uvicorn.Config(
            app, http=Protocol, loop="asyncio", ws="none", lifespan="on", interface="asgi3",
            limit_concurrency=MAX_CONNECTIONS, backlog=BACKLOG, timeout_keep_alive=KEEP_ALIVE,
            timeout_graceful_shutdown=KEEP_ALIVE,
            h11_max_incomplete_event_size=MAX_HEAD, proxy_headers=False, server_header=False,
            access_log=False, log_level="warning"))

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    def serve_forever(self) -> None:
        """Until `shutdown` (from another thread) or, in the main thread, SIGINT/SIGTERM."""
        self.server.run(sockets=[self.socket])

    def serve_until_stopped(self) -> None:
        """`serve_forever`, then `close` however it ended: how a command runs its server to the end."""
        try:
            self.serve_forever()
        except KeyboardInterrupt:  # uvicorn stops on SIGINT, then raises it again for the caller
            pass
        finally:
            self.close()

    def shutdown(self) -> None:
        self.server.should_exit = True

    def close(self) -> None:
        self.socket.close()


def worker_events() -> tuple[asyncio.Queue, Callable[[dict], None]]:
    """A queue on the running event loop and the `emit` a worker thread puts its events into it with."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict] = asyncio.Queue()

    def emit(event: dict) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the server stopped while the worker answered: nobody is listening
            pass

    return events, emit


def room_for_connections() -> None:
    """A soft limit of 1,024 open files (common) would refuse connections far below MAX_CONNECTIONS."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_CONNECTIONS + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard),
                                                    hard))
