"""Who may use the dashboard: one set of rules for every route of the page, those that only read and those
that change something (the controls and the upload of actions.py, a box that asks the model).

    pytest tests/test_access.py tests/test_dashboard.py -k "token or credential or host or origin or rules"

- The page binds 127.0.0.1 unless told otherwise (`--host`).
- A token given with `--token` must have at least MIN_TOKEN characters, or the server refuses to start
  (`TokenRefused`; `evertrain dashboard` exits 2). Off loopback, with no `--token`, a random one is made and
  printed in the page's URL.
- With a token, every request must carry it: `?token=T` (answered by a redirect to the same address without
  it, setting an HttpOnly, SameSite=Strict cookie), `Authorization: Bearer T`, or that cookie. Compared in
  constant time; an empty credential never passes.
- Bound to loopback without a token, a request must name a loopback Host: a page elsewhere that rebinds its
  own domain to 127.0.0.1 sends its own name, and is refused.
- A request that changes state (any method but GET and HEAD) needs all of the above AND an `Origin` header
  equal to the page's own origin (scheme and Host): a form or script on another site cannot post with the
  user's cookie. `AccessMiddleware` applies this to every such request; `Access.refusal_to_change` is the
  same check for a route that wants to call it itself.

A new route (a POST for a control, an upload, a prompt) needs nothing of its own: added to the app that
`server.build_app` wraps in `AccessMiddleware`, it gets these rules. No CORS headers are ever sent, so a
preflight from another origin is refused like any other change.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

MIN_TOKEN = 16
COOKIE = "evertrain_token"
READ_METHODS = frozenset({"GET", "HEAD"})
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class TokenRefused(ValueError):
    """A token too weak to put a page on a network: said at start, before anything listens."""


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(request: Request) -> str:
    """The name in the request's Host header ('' when it does not parse: a foreign name, for these rules)."""
    try:
        return urlsplit(f"//{request.headers.get('host', '')}").hostname or ""
    except ValueError:
        return ""


def refuse(status: int, message: str, headers: dict | None = None) -> Response:
    return JSONResponse({"error": message}, status, headers={"Cache-Control": "no-store", **(headers or {})})


@dataclass(frozen=True)
class Access:
    token: str | None   # None: no token (loopback only)
    loopback: bool      # bound to a loopback address

    @classmethod
    def for_binding(cls, host: str, token: str | None) -> "Access":
        if token is not None and len(token) < MIN_TOKEN:
            raise TokenRefused(f"--token must have at least {MIN_TOKEN} characters (this one has {len(token)}); "
                               "leave it out to have a random one made and printed")
        loopback = is_loopback(host)
        if token is None and not loopback:
            token = secrets.token_urlsafe(24)
        return cls(token, loopback)

    def credentials(self, request: Request) -> list[str]:
        """What the request offers as the token, from each place it may be; empty ones are not offers."""
        given = []
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given.append(value.strip())
        given += request.query_params.getlist("token")
        cookie = SimpleCookie()
        try:
            cookie.load(request.headers.get("cookie", ""))
        except CookieError:
            pass  # a malformed cookie header offers nothing
        if COOKIE in cookie:
            given.append(cookie[COOKIE].value)
        return [g for g in given if g]

    def has_token(self, request: Request) -> bool:
        expected = self.token.encode()
        return any(hmac.compare_digest(g.encode(), expected) for g in self.credentials(request))

    def refusal(self, request: Request) -> Response | None:
        """Why this request may not read the page (a response to send), or None: it may."""
        if self.token is not None:
            if self.has_token(request):
                return None
            return refuse(401, "token required: open the URL with ?token=... that `evertrain dashboard` printed",
                          {"WWW-Authenticate": "Bearer"})
        host = host_name(request)
        if self.loopback and not is_loopback(host):
            return refuse(403, f"bound to loopback, this dashboard answers only to localhost or 127.0.0.1, not "
                               f"{host!r}; to reach it by another name, start it with --host and use the token "
                               "it prints")
        return None

    def refusal_to_change(self, request: Request) -> Response | None:
        """`refusal`, and a request that changes state must come from the page itself (its Origin)."""
        refused = self.refusal(request)
        if refused is not None:
            return refused
        origin = request.headers.get("origin", "")
        own = f"{request.scope.get('scheme', 'http')}://{request.headers.get('host', '')}"
        if not origin or origin.lower() != own.lower():
            return refuse(403, f"a {request.method} must come from the dashboard's own page ({own}), "
                               f"not from {origin or 'a request without an Origin header'}")
        return None


class AccessMiddleware:
    """`Access` in front of every route: reads need `refusal` to pass, anything else `refusal_to_change`."""

    def __init__(self, app: ASGIApp, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        reading = request.method in READ_METHODS
        refused = self.access.refusal(request) if reading else self.access.refusal_to_change(request)
        if refused is None and reading and self.access.token and "token" in request.query_params:
            refused = self.keep_in_cookie(request)
        if refused is not None:
            return await refused(scope, receive, send)
        await self.app(scope, receive, send)

    def keep_in_cookie(self, request: Request) -> Response:
        """The token from the address into a cookie, and out of the address bar, history and links."""
        url = request.url.remove_query_params("token")
        response = RedirectResponse(url.path + (f"?{url.query}" if url.query else ""), 303)
        response.set_cookie(COOKIE, self.access.token, path="/", httponly=True, samesite="strict")
        return response
