"""Route registration for parley.gateway.plivo: callbacks, the stream socket, the REST client."""

from __future__ import annotations

from aiohttp import web

from . import stream, webhooks
from .rest import plivo_rest_context


def add_routes(app: web.Application) -> None:
    """Register Plivo's routes, and the REST client's ``cleanup_ctx``, on the gateway app."""
    app.cleanup_ctx.append(plivo_rest_context)
    webhooks.add_routes(app)
    stream.add_routes(app)
