"""Call control through the plivo SDK's REST client: place, look up, hang up, transfer, DTMF.

The SDK is synchronous (``requests``), so every call runs in a worker thread and a slow Plivo
never blocks the event loop. ``base_url`` points it elsewhere — an emulator in tests — by
rewriting the ``https://api.plivo.com`` prefix of each prepared request: the SDK resets its own
``base_uri`` from module constants on every request, so overriding that attribute is not enough.

The SDK client keeps per-request state (``base_uri``, a retry counter) and a ``requests``
session, neither promised to be thread-safe, so each worker thread gets a client of its own.

:data:`PLIVO_REST` holds the client (or None when no Plivo account is configured); it is
created in a ``cleanup_ctx`` unless one was injected, and its HTTP sessions are closed there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import msgspec
import plivo
from aiohttp import web
from plivo import exceptions as plivo_errors
from plivo.rest.client import PLIVO_API, fetch_credentials
from requests import PreparedRequest
from requests import RequestException as TransportError
from requests.exceptions import ChunkedEncodingError, Timeout
from requests.exceptions import ConnectionError as ConnectionLost
from urllib3.exceptions import MaxRetryError

from ..keys import CONFIG

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that are the request's fault (a bad or unreachable number), not ours or Plivo's.
CALLER_ERRORS: tuple[type[Exception], ...] = (
    plivo_errors.ValidationError, plivo_errors.GeoPermissionError)


class PlivoCallError(Exception):
    """Plivo refused or failed a REST call; ``caller_fault`` if the request itself was bad.

    ``ambiguous``: Plivo never answered a request that was sent (a timeout, the connection
    lost), or answered without the id it owes, so it may have done what was asked.
    """

    def __init__(self, message: str, *, caller_fault: bool, ambiguous: bool = False) -> None:
        super().__init__(message)
        self.caller_fault = caller_fault
        self.ambiguous = ambiguous


class Dialed(msgspec.Struct, frozen=True, kw_only=True):
    """What ``calls.create`` answered: Plivo's request id.

    The call's own id (``CallUUID``) comes later, with its callbacks, next to this
    ``RequestUUID``.
    """

    request_uuid: str
    message: str = ""


class AtPlivo(msgspec.Struct, frozen=True, kw_only=True):
    """A call as Plivo has it.

    Live: ``status`` is its ``call_status`` (``ringing``, ``in-progress``…; ``queued`` for an
    outbound call Plivo has not dialled yet). Over: ``status``
    is ``completed``, ``duration_s`` its record's ``call_duration``, ``answered`` whether the
    record has an ``answer_time``, and ``hangup_cause``/``hangup_code`` its
    ``hangup_cause_name``/``hangup_cause_code`` (why it ended).
    """

    status: str
    duration_s: float | None = None
    answered: bool = True
    hangup_cause: str = ""
    hangup_code: int | None = None

    @property
    def live(self) -> bool:
        """Whether Plivo has the call up."""
        return self.status != "completed"

    @property
    def failure(self) -> str | None:
        """The call.failed reason of a call over and never answered (None: it was answered).

        The reasons Plivo's hangup callback gives (``CallStatus`` busy, no-answer, cancel…),
        from the record's hangup cause (Plivo's "hangup causes" page): 1000-1099 canceled
        (by the Hangup API before an answer, out of credits, the dial limit), 2000-2999 the
        destination (invalid, out of service, barred: failed); the recipient's causes by name
        (busy or rejected → busy, no answer or a ring timeout → no_answer); anything else
        failed.
        """
        if self.live or self.answered:
            return None
        name = self.hangup_cause.lower()
        code = self.hangup_code if self.hangup_code is not None else -1
        if 1000 <= code < 2000 or "cancel" in name:
            return "canceled"
        if 2000 <= code < 3000:
            return "failed"
        if "busy" in name or "reject" in name:
            return "busy"
        if "no answer" in name or "timeout" in name:
            return "no_answer"
        return "failed"


class _RebasedClient(plivo.RestClient):  # type: ignore[misc]  # the SDK is untyped
    """The SDK's client, sending every request to ``base_url`` instead of Plivo's API."""

    def __init__(self, auth_id: str, auth_token: str, *, base_url: str, timeout: float) -> None:
        super().__init__(auth_id, auth_token, timeout=timeout)
        self._base_url = base_url.rstrip("/")

    def create_request(self, method: str, path: Any = None, data: Any = None,
                       **kwargs: Any) -> PreparedRequest:
        prepared: PreparedRequest = super().create_request(method, path, data, **kwargs)
        url = prepared.url or ""
        if self._base_url and url.startswith(PLIVO_API):
            prepared.prepare_url(self._base_url + url[len(PLIVO_API):], None)
        return prepared


class PlivoCalls:
    """The REST operations the gateway performs on Plivo calls."""

    def __init__(self, make_client: Callable[[], Any]) -> None:
        self._make_client = make_client
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()

    @classmethod
    def create(cls, auth_id: str, auth_token: str, *, base_url: str = "",
               timeout_s: float = 10.0) -> PlivoCalls:
        """A client for the account; ``base_url`` replaces ``https://api.plivo.com``."""
        fetch_credentials(auth_id, auth_token)  # a malformed auth id fails now, not mid-call
        return cls(lambda: _RebasedClient(auth_id, auth_token, base_url=base_url,
                                          timeout=timeout_s))

    def _client(self) -> Any:
        """The SDK client of the calling thread (created on first use)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._make_client()
            with self._clients_lock:
                self._clients.append(client)
        return client

    async def dial(self, *, from_number: str, to_number: str, answer_url: str,
                   hangup_url: str, ring_url: str, time_limit_s: int) -> Dialed:
        """Place an outbound call; Plivo requests ``answer_url`` when it is picked up."""
        response = await self._run(lambda: self._client().calls.create(
            from_=from_number, to_=to_number, answer_url=answer_url, answer_method="POST",
            hangup_url=hangup_url, hangup_method="POST", ring_url=ring_url,
            ring_method="POST", time_limit=time_limit_s))
        request_uuid = _field(response, "request_uuid")
        if not isinstance(request_uuid, str) or not request_uuid:
            raise PlivoCallError("Plivo accepted the call without a request_uuid",
                                 caller_fault=False, ambiguous=True)
        return Dialed(request_uuid=request_uuid, message=str(_field(response, "message") or ""))

    async def fetch(self, call_uuid: str) -> AtPlivo | None:
        """The call as Plivo has it now (None: Plivo knows no such call).

        Asked as a live call first; one no longer live (404) is asked for its record; one
        with no record either, as a queued call (``status`` ``queued``, live).

        ``call_uuid`` may be the ``RequestUUID`` of an outbound call no callback re-keyed:
        Plivo's queued call lookup (``GET Call/{id}/?status=queued``) takes that id while
        the call waits in the account's queue, but once dequeued the call is live, then
        recorded, under a ``CallUUID`` of its own, and the live call and record lookups take
        only that (the record has no ``request_uuid``, and listing records cannot filter on
        one): only the call's callbacks (``RequestUUID`` next to ``CallUUID``) tell it. So a
        request no longer queued whose callbacks never reached us is None, as unknown.
        """
        live = await self._run(lambda: _found(lambda: self._client().live_calls.get(call_uuid)))
        if live is not None:
            return AtPlivo(status=str(_field(live, "call_status") or ""))
        record = await self._run(lambda: _found(lambda: self._client().calls.get(call_uuid)))
        if record is None:
            queued = await self._run(
                lambda: _found(lambda: self._client().queued_calls.get(call_uuid)))
            if queued is not None:  # not dialled yet: Plivo dials it as its rate allows
                return AtPlivo(status=str(_field(queued, "call_status") or "queued"))
            return None
        duration, code = _field(record, "call_duration"), _field(record, "hangup_cause_code")
        return AtPlivo(status="completed",
                       duration_s=float(duration) if duration is not None else None,
                       answered=_answered(record, duration),
                       hangup_cause=str(_field(record, "hangup_cause_name") or ""),
                       hangup_code=code if isinstance(code, int) else None)

    async def hangup(self, call_uuid: str) -> None:
        """End a live call."""
        await self._run(lambda: self._client().calls.delete(call_uuid))

    async def transfer(self, call_uuid: str, xml_url: str) -> None:
        """Make the caller's leg execute the XML at ``xml_url`` (a ``<Dial>``)."""
        await self._run(lambda: self._client().calls.update(
            call_uuid, legs="aleg", aleg_url=xml_url, aleg_method="POST"))

    async def send_digits(self, call_uuid: str, digits: str) -> None:
        """Play DTMF tones to the caller."""
        await self._run(lambda: self._client().calls.send_digits(call_uuid, digits,
                                                                 leg="aleg"))

    async def close(self) -> None:
        """Close every SDK client's HTTP sessions (their pooled sockets)."""
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.session.close()
            client.multipart_session.close()

    @staticmethod
    async def _run(operation: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(operation)
        except CALLER_ERRORS as exc:
            raise PlivoCallError(_message(exc), caller_fault=True) from exc
        except TransportError as exc:
            # requests names the URL, and Plivo's hold the account's Auth ID: this message
            # reaches the org that placed the call (the API's problem, call.failed), so it
            # says only what happened; the whole of it is for our log.
            ambiguous = _unanswered(exc)
            log.warning("Plivo request failed: %s", exc)
            raise PlivoCallError(f"{'no answer from' if ambiguous else 'could not reach'} "
                                 f"Plivo ({type(exc).__name__})", caller_fault=False,
                                 ambiguous=ambiguous) from exc
        except plivo_errors.PlivoRestError as exc:
            raise PlivoCallError(_message(exc), caller_fault=False) from exc


def _unanswered(exc: Exception) -> bool:
    """Whether the request was sent and no answer came back (not: no connection was made)."""
    if not isinstance(exc, Timeout | ConnectionLost | ChunkedEncodingError):
        return False
    return not (exc.args and isinstance(exc.args[0], MaxRetryError))  # connecting failed


def _found(operation: Callable[[], T]) -> T | None:
    """``operation``'s answer, or None if Plivo answered 404."""
    try:
        return operation()
    except plivo_errors.ResourceNotFoundError:
        return None


def _answered(record: Any, duration: Any) -> bool:
    """Whether an ended call's record says it was answered.

    By its ``answer_time`` (null if it never was); a record without the field, by its duration.
    """
    try:
        has_answer_time = "answer_time" in record
    except TypeError:
        has_answer_time = False
    if has_answer_time:
        return bool(_field(record, "answer_time"))
    return isinstance(duration, int | float) and duration > 0


def _field(response: Any, name: str) -> Any:
    if isinstance(response, dict):
        return response.get(name)
    return getattr(response, name, None)


def _message(exc: Exception) -> str:
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return text or type(exc).__name__


PLIVO_REST: web.AppKey[PlivoCalls | None] = web.AppKey("parley_gateway_plivo_rest")


async def plivo_rest_context(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: create the client from the config unless one was injected."""
    if PLIVO_REST in app:
        yield
        return
    config = app[CONFIG]
    client = None
    if config.plivo_auth_id and config.plivo_auth_token:
        client = PlivoCalls.create(config.plivo_auth_id, config.plivo_auth_token,
                                   base_url=config.plivo_api_base_url)
    app[PLIVO_REST] = client
    try:
        yield
    finally:
        if client is not None:
            await client.close()
