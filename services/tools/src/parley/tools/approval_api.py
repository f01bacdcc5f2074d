"""The approval API: a human (or their software) approves or denies a sensitive tool call.

``POST /v1/tool-calls/{tool_call_id}/approve`` and ``…/deny`` (optional JSON body
``{"reason": "..."}``), authenticated with an org API key in ``X-API-Key`` holding the
``tools:approve`` scope. The key's org scopes the lookup, so another org's tool call is a 404.
The decision and its event (``tool.approved`` / ``tool.denied``) are written together in the
journal and published at once; the tools workers then run an approved call. Once committed, a
decision stands: if publishing fails (NATS away), the answer is still 200 and the tools
service's sweep publishes the journaled event. The same decision again is answered as the first
was (200, same event), so a client that lost the answer may ask again; the opposite decision is
a 409 naming the one that stands, as is any decision on a call that needed no approval or whose
deadline passed.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from parley.common.bus import Bus
from parley.common.configuration import ApiKey, verify_api_key
from parley.common.events import ToolApproved, ToolDenied
from parley.common.problems import Problem, problem_middleware
from parley.common.request_bodies import decode_json, read_body

from . import journal

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
APPROVE_SCOPE = "tools:approve"
PATH = "/v1/tool-calls/{tool_call_id}"
MAX_BODY_BYTES = 64 * 1024

POOL: web.AppKey[AsyncConnectionPool[Any]] = web.AppKey("parley_tools_pool")
BUS = web.AppKey("parley_tools_bus", Bus)


class DecisionBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Optional body of approve/deny."""

    reason: str = ""


_decision_decoder = msgspec.json.Decoder(DecisionBody)


def create_app(*, pool: AsyncConnectionPool[Any], bus: Bus) -> web.Application:
    """The approval API over the tools service's pool and bus (owned by the caller)."""
    app = web.Application(middlewares=[problem_middleware], client_max_size=MAX_BODY_BYTES)
    app[POOL] = pool
    app[BUS] = bus
    app.router.add_post(PATH + "/approve", approve)
    app.router.add_post(PATH + "/deny", deny)
    return app


async def approve(request: web.Request) -> web.Response:
    """Approve a waiting tool call."""
    return await _decide(request, approve=True)


async def deny(request: web.Request) -> web.Response:
    """Deny a waiting tool call."""
    return await _decide(request, approve=False)


async def _decide(request: web.Request, *, approve: bool) -> web.Response:
    key = await authenticate(request)
    body = await _body(request)
    tool_call_id = request.match_info["tool_call_id"]
    not_found = Problem(404, "Not Found", f"no tool call {tool_call_id[:64]!r} in this org",
                        kind="tool-call-not-found")
    if "\x00" in tool_call_id:  # no id holds one (Postgres text cannot)
        raise not_found
    async with request.app[POOL].connection() as conn:
        outcome, event = await journal.decide(conn, key.org_id, tool_call_id, approve=approve,
                                              by=f"api_key:{key.key_id}", reason=body.reason)
        if outcome == "not_found":
            raise not_found
        if outcome == "already_decided":
            earlier = await journal.decision_of(conn, key.org_id, tool_call_id)
            if earlier is None:
                raise Problem(409, "Conflict", "the tool call did not ask for approval",
                              kind="tool-call-not-waiting")
            decision, by = earlier
            raise Problem(409, "Conflict", f"the tool call was already {decision} by {by}",
                          kind="tool-call-not-waiting",
                          extra={"decision": decision, "decided_by": by})
        if outcome == "expired":
            raise Problem(409, "Conflict", "the approval deadline has passed; the call was "
                          "denied", kind="approval-expired")
        assert isinstance(event, ToolApproved | ToolDenied)
        try:
            await journal.publish_pending(conn, request.app[BUS], call_id=event.call_id,
                                          tool_call_id=tool_call_id)
        except Exception as exc:  # the decision is committed; the sweep publishes it
            log.warning("tool call %s: decision %s not published yet, left to the sweep: %r",
                        tool_call_id, event.id, exc)
    by = event.approved_by if isinstance(event, ToolApproved) else event.denied_by
    return web.json_response({"tool_call_id": tool_call_id, "call_id": event.call_id,
                              "state": "approved" if approve else "denied",
                              "decided_by": by, "event_id": str(event.id)})


async def authenticate(request: web.Request) -> ApiKey:
    """The live key presented in ``X-API-Key``; it must hold ``tools:approve``.

    No key or an unknown/revoked one → 401; a valid key without the scope → 403.
    """
    token = request.headers.get(API_KEY_HEADER, "").strip()
    if not token:
        raise Problem(401, "Unauthorized", f"send an API key in the {API_KEY_HEADER} header",
                      kind="missing-api-key")
    async with request.app[POOL].connection() as conn:
        key = await verify_api_key(conn, token)
    if key is None:
        raise Problem(401, "Unauthorized", "the API key is not valid (unknown or revoked)",
                      kind="invalid-api-key")
    if APPROVE_SCOPE not in key.scopes:
        raise Problem(403, "Forbidden", f"the API key lacks the {APPROVE_SCOPE} scope",
                      kind="insufficient-scope", extra={"required_scope": APPROVE_SCOPE})
    return key


async def _body(request: web.Request) -> DecisionBody:
    """The decision's body (none: no reason); a 400 problem if it is not one, 413 over 64 KiB.

    Read as JSON whatever its Content-Type (``curl -d`` sends a form's).
    """
    raw = await read_body(request, MAX_BODY_BYTES)
    if not raw.strip():
        return DecisionBody()
    try:
        return decode_json(raw, _decision_decoder, kind="invalid-body")
    except msgspec.ValidationError as exc:
        raise Problem(400, "Bad Request", f"invalid body: {exc}", kind="invalid-body") from exc
