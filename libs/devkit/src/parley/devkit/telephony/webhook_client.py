"""Twilio's outgoing HTTP: signed webhook requests, the parameters it sends, public URL mapping.

Twilio signs the URL it was given (the gateway's public one, e.g. ``https://voice.example.com``),
so when that host is really served by a local process, the request travels to the local address
while the signature still covers the public URL: :class:`UrlMap` makes that translation.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from email.utils import formatdate

import aiohttp
from yarl import URL

from parley.devkit.telephony.twilio_protocol import SIGNATURE_HEADER, compute_signature

API_VERSION = "2010-04-01"
USER_AGENT = "TwilioProxy/1.1"


class WebhookError(RuntimeError):
    """A webhook answered with an error status or could not be reached."""


class UrlMap:
    """Maps URLs on the public base URL to the address that actually serves them.

    ``UrlMap(public_url="https://voice.example.com", actual_url="http://127.0.0.1:8080")`` sends
    ``wss://voice.example.com/twilio/stream`` to ``ws://127.0.0.1:8080/twilio/stream``. URLs on
    other hosts, or every URL when no public URL is given, are used as they are (``wss``/``https``
    schemes are kept).
    """

    def __init__(self, *, public_url: str | None = None, actual_url: str | None = None) -> None:
        self.public = URL(public_url) if public_url else None
        self.actual = URL(actual_url) if actual_url else None

    def actual_for(self, url: str) -> str:
        """The address to connect to for ``url``."""
        target = URL(url)
        if self.public is None or self.actual is None:
            return url
        if (target.host, _port(target)) != (self.public.host, _port(self.public)):
            return url
        prefix = self.public.path.rstrip("/")
        if prefix and not target.path.startswith(prefix + "/") and target.path != prefix:
            return url
        websocket = target.scheme in ("ws", "wss")
        scheme = self.actual.scheme
        if websocket:
            scheme = "wss" if scheme == "https" else "ws"
        path = self.actual.path.rstrip("/") + target.path[len(prefix):]
        mapped = self.actual.with_scheme(scheme).with_path(path)
        return str(mapped.with_query(target.query) if target.query_string else mapped)


def _port(url: URL) -> int | None:
    if url.explicit_port is not None:
        return url.explicit_port
    return {"http": 80, "ws": 80, "https": 443, "wss": 443}.get(url.scheme)


def voice_params(*, account_sid: str, call_sid: str, from_number: str, to_number: str,
                 direction: str, call_status: str) -> dict[str, str]:
    """The parameters of a voice webhook, as Twilio sends them (geography left empty)."""
    params = {
        "AccountSid": account_sid, "ApiVersion": API_VERSION, "CallSid": call_sid,
        "CallStatus": call_status, "Called": to_number, "Caller": from_number,
        "Direction": direction, "From": from_number, "To": to_number,
    }
    for party in ("Called", "Caller", "From", "To"):
        for place in ("City", "State", "Zip"):
            params[party + place] = ""
        params[party + "Country"] = "US"
    return params


def status_params(base: Mapping[str, str], *, call_status: str, sequence: int,
                  duration_seconds: int | None = None) -> dict[str, str]:
    """A status callback's parameters: the voice parameters plus the progress fields."""
    params = {**base, "CallStatus": call_status, "CallbackSource": "call-progress-events",
              "SequenceNumber": str(sequence), "Timestamp": formatdate(usegmt=True)}
    if duration_seconds is not None:
        params["CallDuration"] = str(duration_seconds)
        params["Duration"] = str(max(1, -(-duration_seconds // 60)))  # billed minutes
    return params


async def send_webhook(session: aiohttp.ClientSession, url_map: UrlMap, *, url: str,
                       params: Mapping[str, str], auth_token: str,
                       method: str = "POST") -> str:
    """Request ``url`` as Twilio does (signed, form-encoded) and return the body.

    ``POST`` signs the URL plus the sorted parameters; ``GET`` puts the parameters in the query
    string and signs the whole URL. Raises :class:`WebhookError` on a non-2xx answer.
    """
    headers = {"User-Agent": USER_AGENT, "I-Twilio-Idempotency-Token": secrets.token_hex(16)}
    target = url_map.actual_for(url)
    if method.upper() == "GET":
        signed = str(URL(url).update_query(dict(params)))
        headers[SIGNATURE_HEADER] = compute_signature(auth_token, signed, {})
        request = session.get(url_map.actual_for(signed), headers=headers)
    else:
        headers[SIGNATURE_HEADER] = compute_signature(auth_token, url, params)
        request = session.post(target, data=dict(params), headers=headers)
    try:
        async with request as response:
            body = await response.text()
    except aiohttp.ClientError as error:
        raise WebhookError(f"{method} {url} (at {target}): {error}") from error
    if response.status >= 300:
        raise WebhookError(f"{method} {url} answered {response.status}: {body[:300]}")
    return body
