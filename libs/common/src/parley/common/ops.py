"""The small HTTP server every service runs for probes and scraping.

``GET /healthz`` answers while the process is alive, ``GET /readyz`` asks the service whether it
can take work (connected to NATS, consumers bound, ...), and ``GET /metrics`` serves Prometheus
text from the service's own registry.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from .metrics import render

__all__ = ["OpsServer", "ReadyCheck", "create_ops_app"]

ReadyCheck = Callable[[], Awaitable[bool] | bool]

SERVICE_KEY = web.AppKey("parley_ops_service", str)
REGISTRY_KEY = web.AppKey("parley_ops_registry", CollectorRegistry)
READY_KEY: web.AppKey[ReadyCheck] = web.AppKey("parley_ops_ready")

log = logging.getLogger(__name__)


def create_ops_app(
    *, service: str, registry: CollectorRegistry, ready: ReadyCheck
) -> web.Application:
    """Build the ops application; ``ready`` may be a plain or an async callable."""
    app = web.Application()
    app[SERVICE_KEY] = service
    app[REGISTRY_KEY] = registry
    app[READY_KEY] = ready
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "service": request.app[SERVICE_KEY]})


async def _readyz(request: web.Request) -> web.Response:
    try:
        outcome = request.app[READY_KEY]()
        ready = bool(await outcome) if inspect.isawaitable(outcome) else bool(outcome)
    except Exception:
        # A failing check means "not ready"; the reason belongs in the log, not in the probe body.
        log.exception("readiness check failed")
        ready = False
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = render(request.app[REGISTRY_KEY])
    # Set the header directly: aiohttp's content_type= argument rejects the charset parameter.
    return web.Response(body=body, headers={"Content-Type": content_type})


class OpsServer:
    """Serve an ops application on a TCP port until stopped."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start listening and return the bound port (``port=0`` picks a free one)."""
        if self._runner is not None:
            raise RuntimeError("ops server already started")
        # Probes hit these endpoints every few seconds; access logs would only be noise.
        runner = web.AppRunner(self._app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("ops server listening", extra={"ops_host": host, "ops_port": self.port})
        return self.port

    async def stop(self) -> None:
        """Stop listening and release the application's resources; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self.port = None
