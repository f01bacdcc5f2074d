"""Reading a request's body at an HTTP API's edge: capped, and refused as a problem.

Shared by the gateway's public API, the tools service's approval API and the brain's knowledge
API, so that none of them answers 500 to a body it cannot read. A body is read only up to one
chunk past its cap, whether or not it came with a Content-Length (a chunked one has none, and
``client_max_size`` does not cover a body read as a stream). JSON that is not JSON is a 400:
msgspec raises its DecodeError for bad syntax but UnicodeDecodeError for a string or key that
is not UTF-8, so both are caught.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from aiohttp import web

from .problems import Problem

T = TypeVar("T")

READ_CHUNK = 64 * 1024


def too_large(limit: int, detail: str = "") -> Problem:
    """The 413 problem for a body over ``limit`` bytes."""
    return Problem(413, "Content Too Large", detail or f"the body is over {limit} bytes")


async def read_capped(read: Callable[[int], Awaitable[bytes]], limit: int,
                      refusal: Problem | None = None) -> bytes:
    """What ``read(size)`` gives until it gives nothing; ``refusal`` (a 413) past ``limit``.

    Read in chunks of :data:`READ_CHUNK` (aiohttp's multipart reader refuses a size shorter
    than its boundary), so at most one chunk past ``limit`` is read before the answer.
    """
    data = bytearray()
    while chunk := await read(READ_CHUNK):
        data += chunk
        if len(data) > limit:
            raise refusal or too_large(limit)
    return bytes(data)


async def read_body(request: web.Request, limit: int, refusal: Problem | None = None) -> bytes:
    """The request's body, or ``refusal`` (a 413) once it is over ``limit`` bytes.

    By its Content-Length when it has one, before anything is read.
    """
    if request.content_length is not None and request.content_length > limit:
        raise refusal or too_large(limit)
    return await read_capped(request.content.read, limit, refusal)


def decode_json(body: bytes, decoder: msgspec.json.Decoder[T], *,
                kind: str = "malformed-json") -> T:
    """``body`` decoded, or a 400 problem of ``kind`` when it is not JSON (or not UTF-8).

    A body that is JSON of the wrong shape raises msgspec's ValidationError, and one nested
    deeper than Python recurses RecursionError, both left for the caller to answer (a 422
    naming the field, say).
    """
    try:
        return decoder.decode(body)
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError as exc:
        raise Problem(400, "Bad Request", f"the body is not valid JSON: {exc}",
                      kind=kind) from None
    except UnicodeDecodeError as exc:
        raise Problem(400, "Bad Request", "the body is not valid JSON: a string in it is not "
                      f"UTF-8 ({exc.reason})", kind=kind) from None
