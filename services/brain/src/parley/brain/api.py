"""The knowledge API the brain serves: upload documents, list them, try a search.

    POST /v1/agents/{agent_id}/knowledge          upload (multipart ``file``, or the raw body
                                                  with ``?source=name.pdf``); ``?org_wide=true``
                                                  stores it for every agent of the org
    GET  /v1/agents/{agent_id}/knowledge          the documents the agent sees
    GET  /v1/agents/{agent_id}/knowledge/search   ``?q=...&k=4``: what a caller's question finds

Every request carries an org API key in ``X-API-Key`` holding the endpoint's scope —
``knowledge:write`` to upload (what every agent may then read out to callers),
``knowledge:read`` to list and search — and the key's org scopes everything, so an agent of
another org is a 404 like an unknown one. Errors are RFC 9457 problem documents: 400 for a file
that gives no text (unsupported type, corrupt, empty) or a bad parameter, 401 for a missing or
invalid key, 403 for a key without the scope, 404 for an unknown agent, 413 past
``max_upload_bytes`` (however the body is sent: the file is read only up to a chunk past it,
and a multipart body's other parts only up to ``_MULTIPART_SLACK``), 400 for a multipart body
that cannot be read (no boundary, none found, a file name that is not UTF-8).
Ingesting writes ``knowledge.ingested`` to the configuration outbox in the same transaction;
the gateway's outbox relay publishes it.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from aiohttp import BodyPartReader, web
from psycopg_pool import AsyncConnectionPool

from parley.common.configuration import ApiKey, get_agent, verify_api_key
from parley.common.problems import Problem, problem_middleware
from parley.common.request_bodies import read_capped

from .knowledge import ExtractionError, KnowledgeError, ingest, list_documents, retrieve
from .knowledge.extract import content_type

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
READ_SCOPE, WRITE_SCOPE = "knowledge:read", "knowledge:write"
PATH = "/v1/agents/{agent_id}/knowledge"
MAX_SEARCH_K = 20
MAX_SOURCE_CHARS = 255  # as a file name
_MULTIPART_SLACK = 64 * 1024  # boundaries, part headers and other fields around the file
_MAX_OTHER_PARTS = 16  # form fields sent before the file

POOL: web.AppKey[AsyncConnectionPool[Any]] = web.AppKey("parley_brain_pool")
MAX_UPLOAD: web.AppKey[int] = web.AppKey("parley_brain_max_upload", int)


def create_app(*, pool: AsyncConnectionPool[Any],
               max_upload_bytes: int = 20 * 1024 * 1024) -> web.Application:
    """The knowledge API over the brain's pool (owned by the caller)."""
    app = web.Application(middlewares=[problem_middleware],
                          client_max_size=max_upload_bytes + _MULTIPART_SLACK)
    app[POOL] = pool
    app[MAX_UPLOAD] = max_upload_bytes
    app.router.add_post(PATH, upload)
    app.router.add_get(PATH, documents)
    app.router.add_get(PATH + "/search", search)
    return app


async def upload(request: web.Request) -> web.Response:
    """Ingest one document for the agent (or, with ``org_wide=true``, for the whole org)."""
    key, agent_id = await _agent_of_key(request, WRITE_SCOPE)
    org_wide = _flag(request, "org_wide")
    source, data = await _document(request)
    try:
        result = await ingest(request.app[POOL], key.org_id, None if org_wide else agent_id,
                              source, data, actor=f"api_key:{key.key_id}")
    except ExtractionError as exc:
        raise Problem(400, "Bad Request", str(exc), kind="unreadable-document") from None
    except KnowledgeError as exc:  # the agent was deleted meanwhile
        raise Problem(404, "Not Found", str(exc), kind="agent-not-found") from None
    body = {**msgspec.to_builtins(result), "agent_id": None if org_wide else agent_id,
            "org_wide": org_wide}
    return web.json_response(body, status=200 if result.unchanged else 201,
                             headers={"Location": request.path})


async def documents(request: web.Request) -> web.Response:
    """The documents the agent sees: its own and the org-wide ones."""
    key, agent_id = await _agent_of_key(request, READ_SCOPE)
    found = await list_documents(request.app[POOL], key.org_id, agent_id)
    return _json({"documents": found})


async def search(request: web.Request) -> web.Response:
    """The chunks a caller's question would retrieve for the agent."""
    key, agent_id = await _agent_of_key(request, READ_SCOPE)
    query = request.query.get("q", "").replace("\x00", "").strip()
    if not query:
        raise Problem(400, "Bad Request", "give the question in ?q=", kind="missing-query")
    k = _int(request, "k", default=4, low=1, high=MAX_SEARCH_K)
    chunks = await retrieve(request.app[POOL], key.org_id, agent_id, query, k=k)
    return _json({"query": query, "chunks": chunks})


# ---------------------------------------------------------------------------------- helpers


async def _agent_of_key(request: web.Request, scope: str) -> tuple[ApiKey, str]:
    """The caller's key, which must hold ``scope``, and the path's agent, of the key's org."""
    token = request.headers.get(API_KEY_HEADER, "").strip()
    if not token:
        raise Problem(401, "Unauthorized", f"send an API key in the {API_KEY_HEADER} header",
                      kind="missing-api-key")
    agent_id = request.match_info["agent_id"]
    async with request.app[POOL].connection() as conn:
        key = await verify_api_key(conn, token)
        if key is None:
            raise Problem(401, "Unauthorized", "the API key is not valid (unknown or revoked)",
                          kind="invalid-api-key")
        if scope not in key.scopes:
            raise Problem(403, "Forbidden", f"the API key lacks the {scope} scope",
                          kind="insufficient-scope", extra={"required_scope": scope})
        # (no id holds a NUL, which Postgres text cannot)
        agent = None if "\x00" in agent_id else await get_agent(conn, agent_id,
                                                                org_id=key.org_id)
    if agent is None:
        raise Problem(404, "Not Found", f"no agent {agent_id[:64]!r} in this org",
                      kind="agent-not-found")
    return key, agent_id


async def _document(request: web.Request) -> tuple[str, bytes]:
    """The uploaded file's name and bytes, read up to the size limit."""
    limit = request.app[MAX_UPLOAD]
    if request.content_length is not None and request.content_length > limit + _MULTIPART_SLACK:
        raise _too_large(limit)
    source = request.query.get("source", "").strip()
    if request.content_type.startswith("multipart/"):
        try:
            return await _file_part(request, source, limit)
        except ValueError as exc:  # aiohttp's reader: no boundary, none found, a bad header
            raise Problem(400, "Bad Request", f"the multipart body cannot be read: {exc}",
                          kind="malformed-multipart") from None
    if not source:
        raise Problem(400, "Bad Request", "name the document with ?source=name.pdf "
                      "(its extension gives the format), or upload it as multipart form data",
                      kind="missing-source")
    _check_type(source)
    return source, _not_empty(await read_capped(request.content.read, limit, _too_large(limit)))


async def _file_part(request: web.Request, source: str, limit: int) -> tuple[str, bytes]:
    """The first file of a multipart body; what comes before it is read up to the slack."""
    reader = await request.multipart()
    slack = _MULTIPART_SLACK
    for _ in range(_MAX_OTHER_PARTS + 1):
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise Problem(400, "Bad Request", "a part of the multipart body is itself "
                          "multipart; send the file as a part of its own", kind="missing-file")
        if part.filename:
            source = source or part.filename
            _check_type(source)
            return source, _not_empty(await read_capped(part.read_chunk, limit,
                                                        _too_large(limit)))
        slack -= len(await read_capped(part.read_chunk, slack, _too_large(limit)))
    else:
        raise Problem(400, "Bad Request", f"the file is not among the multipart body's first "
                      f"{_MAX_OTHER_PARTS + 1} parts", kind="missing-file")
    raise Problem(400, "Bad Request", "the multipart body has no file part",
                  kind="missing-file")


def _not_empty(data: bytes) -> bytes:
    if not data:
        raise Problem(400, "Bad Request", "the document is empty", kind="unreadable-document")
    return data


def _check_type(source: str) -> None:
    if "\x00" in source:  # Postgres text cannot hold it
        raise Problem(400, "Bad Request", "the document's name contains a NUL character",
                      kind="bad-source")
    if not _utf8(source):  # a multipart file name's raw bytes, read as surrogates
        raise Problem(400, "Bad Request", "the document's name is not UTF-8", kind="bad-source")
    if len(source) > MAX_SOURCE_CHARS:  # names are indexed: a btree row holds ~2.7 kB
        raise Problem(400, "Bad Request", f"the document's name is longer than "
                      f"{MAX_SOURCE_CHARS} characters", kind="bad-source")
    try:
        content_type(source)
    except ExtractionError as exc:
        raise Problem(400, "Bad Request", str(exc), kind="unreadable-document") from None


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _too_large(limit: int) -> Problem:
    return Problem(413, "Content Too Large", f"documents are limited to {limit:,} bytes",
                   kind="document-too-large")


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("", "0", "false", "no"):
        return False
    raise Problem(400, "Bad Request", f"?{name}= takes true or false, not {value!r}",
                  kind="invalid-parameter")


def _int(request: web.Request, name: str, *, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise Problem(400, "Bad Request", f"?{name}= takes a whole number from {low} to {high}",
                      kind="invalid-parameter")
    return value


def _json(body: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")
