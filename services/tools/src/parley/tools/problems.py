"""RFC 9457 problem details for the approval API (``application/problem+json``)."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_BASE = "https://parley.dev/problems/"


class Problem(Exception):
    """An error answered to the client as a problem document."""

    def __init__(self, status: int, title: str, detail: str = "", *, kind: str = "",
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.kind = kind or title.lower().replace(" ", "-")
        self.extra = extra or {}


def problem_response(status: int, title: str, detail: str = "", *, kind: str = "",
                     extra: dict[str, Any] | None = None) -> web.Response:
    """A ready problem document response."""
    body = {"type": PROBLEM_BASE + (kind or title.lower().replace(" ", "-")), "title": title,
            "status": status, "detail": detail, **(extra or {})}
    return web.Response(status=status, body=msgspec.json.encode(body),
                        content_type=PROBLEM_CONTENT_TYPE)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render Problems, HTTP errors and crashes as problem documents."""
    try:
        return await handler(request)
    except Problem as exc:
        return problem_response(exc.status, exc.title, exc.detail, kind=exc.kind,
                                extra=exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = "" if (exc.text or "").startswith(f"{exc.status}:") else (exc.text or "")
        response = problem_response(exc.status, exc.reason, detail)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(500, "Internal Server Error", "the server failed; see its logs",
                                kind="internal")
