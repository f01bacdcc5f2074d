"""Call control through the twilio SDK's REST client (fetch, hang up, redirect to new TwiML).

The SDK is used asynchronously (``update_async``) so a slow Twilio never blocks the event loop,
over :class:`AiohttpTwilioClient` — the SDK's own ``AsyncTwilioHttpClient`` uses aiohttp's
deprecated ``BasicAuth``. ``base_url`` points the SDK elsewhere (the devkit's Twilio emulator in
tests) by overriding the API domain's base URL, from which the SDK builds every Calls URL.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import aiohttp
from twilio.http import AsyncHttpClient
from twilio.http.response import Response
from twilio.rest import Client
from twilio.rest.api.v2010.account.call import CallInstance

log = logging.getLogger(__name__)


class AiohttpTwilioClient(AsyncHttpClient):  # type: ignore[misc]  # untyped SDK
    """The twilio SDK's transport over an aiohttp session (closed only if created here)."""

    def __init__(self, *, session: aiohttp.ClientSession | None = None,
                 timeout_s: float = 10.0) -> None:
        super().__init__(log, True, timeout_s)
        self._session = session or aiohttp.ClientSession()
        self._owns_session = session is None

    async def request(self, method: str, url: str, params: Any = None, data: Any = None,
                      headers: dict[str, str] | None = None,
                      auth: tuple[str, str] | None = None,
                      timeout: float | None = None,  # noqa: ASYNC109 - the SDK's signature
                      allow_redirects: bool = False) -> Response:
        """Send one request the way the SDK asks for it."""
        all_headers = dict(headers or {})
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            all_headers["Authorization"] = f"Basic {token}"
        async with self._session.request(
                method.upper(), url, params=params, data=data, headers=all_headers,
                allow_redirects=allow_redirects,
                timeout=aiohttp.ClientTimeout(total=timeout or self.timeout)) as response:
            return Response(response.status, await response.text(), response.headers)

    async def close(self) -> None:
        """Close the session if this client created it."""
        if self._owns_session:
            await self._session.close()


class TwilioCalls:
    """The REST operations the gateway performs on live calls."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @classmethod
    def create(cls, account_sid: str, auth_token: str, *, base_url: str = "",
               timeout_s: float = 10.0,
               session: aiohttp.ClientSession | None = None) -> TwilioCalls:
        """A client over ``session`` (or its own; call from a running event loop)."""
        client = Client(account_sid, auth_token,
                        http_client=AiohttpTwilioClient(session=session, timeout_s=timeout_s))
        if base_url:
            client.edge = client.region = None  # TWILIO_EDGE/REGION would rewrite the host
            client.api.base_url = base_url.rstrip("/")
        return cls(client)

    async def fetch(self, call_sid: str) -> CallInstance:
        """The call as Twilio has it now.

        ``status`` (``in-progress``, ``completed``…) and, once it ended, ``duration``
        (seconds, a string).
        """
        return await self.client.calls(call_sid).fetch_async()

    async def hangup(self, call_sid: str) -> None:
        """End the call (``Status=completed``)."""
        await self.client.calls(call_sid).update_async(status="completed")

    async def redirect(self, call_sid: str, twiml: str) -> None:
        """Replace what the call is executing with ``twiml`` (ends the current stream)."""
        await self.client.calls(call_sid).update_async(twiml=twiml)

    async def start_recording(self, call_sid: str, callback_url: str) -> None:
        """Record both legs; Twilio posts the result to ``callback_url``."""
        await self.client.calls(call_sid).recordings.create_async(
            recording_status_callback=callback_url, recording_channels="dual")

    async def close(self) -> None:
        """Close the transport (its session, if it owns one)."""
        http_client = self.client.http_client
        if isinstance(http_client, AiohttpTwilioClient):
            await http_client.close()
