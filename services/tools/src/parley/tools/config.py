"""Tools service settings, from ``PARLEY_*`` environment variables."""

from __future__ import annotations

from typing import Annotated

import msgspec

from parley.common.config import CommonConfig


class ToolsConfig(CommonConfig, kw_only=True):
    """``PARLEY_TOOLS_HTTP_PORT`` etc.; see CommonConfig for the shared ones.

    ``tools_http_*`` is where the approval API listens (``0`` picks a free port).
    ``tools_concurrency`` is how many tool requests one instance takes in at once (pullers on
    the shared work-queue consumer: lookup, validation, journal); the runs then go on in the
    background, up to ``tools_max_running`` at once, so slow endpoints and hang-ups waiting
    for their goodbye to play never hold up another call's tools.
    """

    tools_http_host: str = "127.0.0.1"
    tools_http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8082
    tools_concurrency: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    tools_max_running: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 256
    # How often approval deadlines and interrupted runs are checked, and unpublished events
    # older than tools_republish_after_s are published again.
    tools_sweep_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    tools_republish_after_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    # Gateway command round trip (end_call, transfer_call, send_dtmf).
    tools_command_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    # How long a hang-up or transfer waits for the gateway's answer before it is taken as under
    # way: longer than the gateway's own REST timeout (10 s), so that a refusal it reports late
    # still fails the tool (the model then tells the caller) rather than being dropped.
    tools_handoff_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 15.0
    # Redelivery of an unacked tool.requested; the journal keeps a redelivery from re-running.
    tools_ack_wait_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    # Added to a tool's worst-case duration to form its running lease (after which a crashed
    # run is reported failed).
    tools_lease_margin_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    db_pool_max_size: Annotated[int, msgspec.Meta(ge=1)] = 10
