"""RFC 9457 problem details: every 4xx/5xx a Parley HTTP API answers has a JSON body.

Shared by the gateway's public API, the tools service's approval API and the brain's knowledge
API.

Handlers raise :class:`Problem` (or any ``web.HTTPException``); :func:`problem_middleware`
renders it as ``application/problem+json`` with ``type``, ``title``, ``status`` and ``detail``.
A body aiohttp cannot read (a Content-Encoding that does not decode, broken chunked framing) is
a 400, wherever in the handler it was read. Unexpected exceptions become a 500 problem and are
logged with the traceback.
"""

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
    """A ready ``application/problem+json`` response."""
    body = {"type": PROBLEM_BASE + (kind or title.lower().replace(" ", "-")), "title": title,
            "status": status, "detail": detail, **(extra or {})}
    return web.Response(status=status, body=msgspec.json.encode(body),
                        content_type=PROBLEM_CONTENT_TYPE)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render Problems, HTTP errors and crashes as problem documents."""
    try:
        response = await handler(request)
    except Problem as exc:
        return problem_response(exc.status, exc.title, exc.detail, kind=exc.kind,
                                extra=exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_exception(exc)
    except web.RequestPayloadError as exc:  # raised by reading the request's body, never a reply
        log.info("unreadable body on %s %s: %r", request.method, request.path,
                 exc.__cause__ or exc)
        response = problem_response(400, "Bad Request", "the body cannot be read: its "
                                    "Content-Encoding does not decode or its chunked framing "
                                    "is broken", kind="unreadable-body")
        response.force_close()  # the rest of the body cannot be found: no next request on it
        return response
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(500, "Internal Server Error", "the server failed; see its logs",
                                kind="internal")
    if response.status >= 400 and not response.prepared and _is_plain(response):
        text = response.text if isinstance(response, web.Response) else ""
        return problem_response(response.status, response.reason or "Error", text or "")
    return response


def _from_http_exception(exc: web.HTTPException) -> web.Response:
    detail = exc.text or ""
    if detail.startswith(f"{exc.status}:"):  # aiohttp's default body, "404: Not Found"
        detail = ""
    response = problem_response(exc.status, exc.reason, detail)
    for name in ("Allow",):
        if name in exc.headers:
            response.headers[name] = exc.headers[name]
    return response


def _is_plain(response: web.StreamResponse) -> bool:
    return response.content_type in ("text/plain", "application/octet-stream", "")
