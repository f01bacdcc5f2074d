"""Point the real twilio SDK at the emulator, and drive it over an injected aiohttp session.

The SDK builds every Calls URL from ``client.api.base_url`` (``https://api.twilio.com``), an
ordinary attribute of the cached ``Api`` domain object, so replacing it sends the SDK's requests
— sync or async, with basic auth and form encoding unchanged — to the emulator. Production code
can do the same with a configurable API base URL.

:class:`SessionHttpClient` is the SDK's async HTTP client interface over an aiohttp session the
caller owns. The SDK's own ``AsyncTwilioHttpClient`` opens a session of its own in its
constructor and builds ``aiohttp.BasicAuth``, which aiohttp ≥ 3.14 deprecates (a
DeprecationWarning, so an error under ``filterwarnings=error``).
"""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING, Any

import aiohttp
from twilio.http import AsyncHttpClient
from twilio.http.response import Response

if TYPE_CHECKING:
    from twilio.http import HttpClient
    from twilio.rest import Client

_logger = logging.getLogger("parley.devkit.twilio_sdk")


def twilio_client_for(emulator_url: str, account_sid: str, auth_token: str, *,
                      http_client: HttpClient | None = None) -> Client:
    """A ``twilio.rest.Client`` whose Calls API is the emulator at ``emulator_url``.

    For ``create_async``/``update_async`` pass ``http_client=SessionHttpClient(session)``. The
    default (sync) client keeps a ``requests`` session: close it with
    ``client.http_client.session.close()``.
    """
    from twilio.rest import Client

    client = Client(account_sid, auth_token, http_client=http_client)
    client.edge = client.region = None  # TWILIO_EDGE/REGION would rewrite the emulator's host
    client.api.base_url = emulator_url.rstrip("/")
    return client


class SessionHttpClient(AsyncHttpClient):  # type: ignore[misc]
    """The twilio SDK's async HTTP client over an injected ``aiohttp.ClientSession``.

    The session belongs to the caller and is never closed here.
    """

    def __init__(self, session: aiohttp.ClientSession, *, timeout: float | None = None) -> None:
        super().__init__(_logger, True, timeout)
        self.session = session

    async def request(self, method: str, url: str, params: Any = None,
                      data: dict[str, object] | None = None,
                      headers: dict[str, str] | None = None,
                      auth: tuple[str, str] | None = None,
                      timeout: float | None = None,  # noqa: ASYNC109 (the SDK's signature)
                      allow_redirects: bool = False) -> Response:
        """Send one SDK request; lists in ``data`` become repeated form fields, as Twilio wants."""
        headers = dict(headers or {})
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        form = None
        if data:
            form = [(key, str(item)) for key, value in data.items()
                    for item in (value if isinstance(value, list) else [value])]
        limit = timeout or self.timeout
        timeouts = aiohttp.ClientTimeout(total=limit) if limit else self.session.timeout
        async with self.session.request(method.upper(), url, params=params, data=form,
                                        headers=headers, allow_redirects=allow_redirects,
                                        timeout=timeouts) as response:
            text = await response.text()
        return Response(response.status, text, response.headers)
