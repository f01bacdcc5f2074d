"""Route registration for parley.gateway.api: the public calls API under ``/v1``."""

from __future__ import annotations

from aiohttp import web

from .calls import CALLS_PATH, get_call, place_call


def add_routes(app: web.Application) -> None:
    """Register ``POST /v1/calls`` and ``GET /v1/calls/{call_id}``."""
    app.router.add_post(CALLS_PATH, place_call)
    app.router.add_get(CALLS_PATH + "/{call_id}", get_call)
