"""The dashboard's answers, shared by every route: JSON that the browser can parse, and a bad query as a 400.

    curl -s http://127.0.0.1:8777/api/metrics?since=x      # {"error": "since must be a step number ..."}
"""

from __future__ import annotations

import math

from starlette.responses import JSONResponse, Response

MAX_STEP = 10**12        # far past any run: a longer number is a mistake, not a step


class BadQuery(ValueError):
    """A query value the page never sends: answered 400 with this message."""


def step_number(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_STEP)) or int(text) > MAX_STEP:
        raise BadQuery(f"{what} must be a step number from 0 to {MAX_STEP}, not {text[:40]!r}")
    return int(text)


def finite(x):
    """JSON has no NaN/Infinity (the browser's parser refuses them): send null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def as_json(data, status: int = 200, headers: dict | None = None) -> Response:
    return JSONResponse(finite(data), status, headers={"Cache-Control": "no-store", **(headers or {})})
