"""Gateway settings, from ``PARLEY_*`` environment variables."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

import msgspec

from parley.common.config import CommonConfig


class GatewayConfig(CommonConfig, kw_only=True):
    """``PARLEY_PUBLIC_BASE_URL``, ``PARLEY_TWILIO_AUTH_TOKEN`` etc.; see CommonConfig too.

    ``public_base_url`` is the address carriers use (``https://voice.example.com``): what Twilio
    signs, and where the ``wss://`` stream URLs in TwiML point. The server itself may listen on
    plain HTTP behind a TLS proxy, so signatures are never checked against the request's own URL.
    """

    public_base_url: str = "http://127.0.0.1:8080"
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    twilio_account_sid: str = ""
    twilio_auth_token: str = ""
    # The secret of the SharedKey a Twilio Webhook Rule signs with: such webhooks carry
    # X-Twilio-Webhooks-Signature-Settings and are refused (403) while this is empty.
    twilio_webhook_shared_key_secret: str = ""
    # Where the twilio SDK sends REST calls; empty = Twilio itself. Tests point it at the emulator.
    twilio_api_base_url: str = ""
    plivo_auth_id: str = ""
    plivo_auth_token: str = ""
    plivo_api_base_url: str = ""
    # Plivo's V3 signature carries no time: a nonce is remembered this long (in Postgres, so
    # across instances) and a request bearing it again is refused 403 (replays.py).
    plivo_nonce_window_s: Annotated[float, msgspec.Meta(gt=0)] = 86400.0
    # The one-time token a Twilio <Connect><Stream> carries is good this long after it was
    # issued (after the digits, for a DTMF redirect's); a stream start without a token of its
    # call, unused and unexpired, is refused (close 4406; replays.py).
    gateway_stream_token_ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    # Off for the first phase of the rolling deploy that brings stream tokens in: instances of
    # the older code still answer calls then, with TwiML carrying no token and an action naming
    # no connect, whose stream or action may reach an instance of the new code. Off, a start
    # without a token and such an action are let through (tokens are issued all the same); on
    # once no instance of the older code is left.
    gateway_stream_tokens_enforced: bool = True
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 65536
    # A media socket that has not sent ``start`` this long after the upgrade is closed.
    stream_start_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    # A carrier socket that died without closing (partition, NAT timeout, crashed proxy) sends
    # nothing and is never closed by its peer (twilio/liveness.py). Nothing heard for
    # gateway_carrier_ping_s: ping it, and take it for dead without a pong within half that.
    # Twilio Media Streams / Plivo streams (audio all call long) are also dead after
    # gateway_carrier_silence_s without a message, pongs or not. A dead socket is closed; if the
    # carrier has not come back through the reconnect URL gateway_carrier_reconnect_wait_s
    # later, the call is hung up (call.ended reason error). 0 turns a check off; a wait of 0
    # is no wait: the call is hung up at once. The same wait, after the digits have played,
    # bounds a DTMF redirect's wait for the call's next stream (twilio/next_stream.py).
    gateway_carrier_ping_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    gateway_carrier_silence_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    gateway_carrier_reconnect_wait_s: Annotated[float, msgspec.Meta(ge=0)] = 15.0
    # Calls no instance holds the socket of (their gateway was killed): each instance looks
    # every gateway_orphan_check_s (0: never) and asks the carrier (Twilio, Plivo) about a call
    # found so twice in a row: over → call.ended; still up → hung up, reason error (orphans.py).
    gateway_orphan_check_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    # Reconnects of one call to a new stream through the <Connect action> URL before we hang up.
    max_reconnects: Annotated[int, msgspec.Meta(ge=0)] = 5
    db_pool_max_size: Annotated[int, msgspec.Meta(ge=1)] = 10
    # POST /v1/calls per org and per instance: a bucket of gateway_call_burst calls refilled at
    # gateway_call_rate_per_s (0: no limit); over it, 429 with Retry-After and nothing dialled.
    gateway_call_rate_per_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    gateway_call_burst: Annotated[int, msgspec.Meta(ge=1)] = 50
    # The callbacks schedule_callback books are dialled when due (due_callbacks.py): each
    # instance looks every gateway_callback_interval_s (0: this instance dials none); a carrier
    # that failed for a reason other than the number is tried again after
    # gateway_callback_retry_s, then twice that, and the callback fails after its third attempt.
    gateway_callback_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    gateway_callback_retry_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    # POST /v1/calls Idempotency-Keys older than 24 h are deleted every
    # gateway_idempotency_sweep_s by each instance (0: this one deletes none; api/idempotency.py).
    gateway_idempotency_sweep_s: Annotated[float, msgspec.Meta(ge=0)] = 600.0
    # Refused signatures: one security.signature_rejected per (carrier, route, remote, reason,
    # called number) per interval, the rest folded into its count; keys tracked at once, the
    # rest folded together (under org "unknown").
    gateway_signature_audit_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    gateway_signature_audit_max_sources: Annotated[int, msgspec.Meta(ge=1)] = 100
    outbox_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 0.5

    @property
    def public_base(self) -> str:
        """The public base URL without a trailing slash."""
        return self.public_base_url.rstrip("/")

    @property
    def public_ws_base(self) -> str:
        """``wss://host[:port]`` (or ``ws://`` when the public URL is plain http)."""
        parts = urlsplit(self.public_base)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}"

    @property
    def gateway_instance(self) -> str:
        """The name of this instance in call.stream_started (who holds the socket)."""
        return self.instance_id or "gateway"
