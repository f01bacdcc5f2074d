"""``X-API-Key`` authentication for the public API: hashed, per-org keys with scopes."""

from __future__ import annotations

from aiohttp import web

from parley.common.configuration import ApiKey, verify_api_key
from parley.common.problems import Problem

from ..keys import METRICS, POOL

API_KEY_HEADER = "X-API-Key"


async def authenticate(request: web.Request, scope: str) -> ApiKey:
    """The live key presented with the request, which must hold ``scope``.

    No key or an unknown/revoked one → 401; a valid key without the scope → 403.
    """
    token = request.headers.get(API_KEY_HEADER, "").strip()
    if not token:
        _count(request, "missing")
        raise Problem(401, "Unauthorized", f"send an API key in the {API_KEY_HEADER} header",
                      kind="missing-api-key")
    async with request.app[POOL].connection() as conn:
        key = await verify_api_key(conn, token)
    if key is None:
        _count(request, "invalid")
        raise Problem(401, "Unauthorized", "the API key is not valid (unknown or revoked)",
                      kind="invalid-api-key")
    if scope not in key.scopes:
        _count(request, "forbidden")
        raise Problem(403, "Forbidden", f"the API key lacks the {scope} scope",
                      kind="insufficient-scope", extra={"required_scope": scope})
    return key


def _count(request: web.Request, outcome: str) -> None:
    request.app[METRICS].counter(
        "gateway_api_auth_failures", "Public API requests refused at authentication",
        ["outcome"]).labels(outcome).inc()
