"""Typed application keys shared by every part of the gateway (Twilio, Plivo, the APIs).

Values are put in place by :func:`parley.gateway.app.create_app` (injected, or created in a
``cleanup_ctx``); route modules only read them: ``request.app[POOL]``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from parley.common.bus import Bus
from parley.common.metrics import Metrics

from .api.rate_limit import CallRateLimiter
from .call_outboxes import CallOutboxes
from .config import GatewayConfig
from .registry import CallRegistry
from .signature_audit import SignatureAudit
from .twilio.rest import TwilioCalls

Clock = Callable[[], datetime]

CONFIG = web.AppKey("parley_gateway_config", GatewayConfig)
BUS = web.AppKey("parley_gateway_bus", Bus)
POOL: web.AppKey[AsyncConnectionPool[Any]] = web.AppKey("parley_gateway_pool")
METRICS = web.AppKey("parley_gateway_metrics", Metrics)
CLOCK: web.AppKey[Clock] = web.AppKey("parley_gateway_clock")
# The live calls whose socket this instance holds (commands, shutdown with GOING_AWAY).
CALLS = web.AppKey("parley_gateway_calls", CallRegistry)
# Each call's outbox: what its sockets report, then its end (call_outboxes.py).
CALL_OUTBOXES = web.AppKey("parley_gateway_call_outboxes", CallOutboxes)
# The twilio SDK REST client (hang up, redirect, transfer), or None when not configured.
TWILIO_REST: web.AppKey[TwilioCalls | None] = web.AppKey("parley_gateway_twilio_rest")
# POST /v1/calls per org (this instance's token buckets).
CALL_RATE_LIMITER = web.AppKey("parley_gateway_call_rate_limiter", CallRateLimiter)
# Refused signatures, audited one event per source and reason per interval.
SIGNATURE_AUDIT = web.AppKey("parley_gateway_signature_audit", SignatureAudit)
