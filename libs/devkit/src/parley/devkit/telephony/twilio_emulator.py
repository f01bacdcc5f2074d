"""A Twilio REST emulator for Calls: the twilio SDK talks to it, and it "dials" the gateway.

Endpoints (HTTP basic auth ``AccountSid:AuthToken``, Twilio's JSON and error shapes):

- ``POST /2010-04-01/Accounts/{AccountSid}/Calls.json``: create (201, status ``queued``), then
  dial in a tracked task (see :mod:`.emulated_call`).
- ``GET  /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json``: fetch.
- ``POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json``: update — ``Status=completed``
  or ``canceled`` hangs up, ``Twiml``/``Url`` redirects a live call.
- ``POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}/Recordings.json``: start recording.
- ``GET  /2010-04-01/Accounts/{AccountSid}/Recordings/{RecordingSid}[.wav]``: the WAV.

Point the SDK here with :func:`parley.devkit.telephony.twilio_sdk.twilio_client_for`. Tests set
up who answers which number through :attr:`TwilioEmulator.callees`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import MultiDictProxy

from parley.devkit.telephony.emulated_call import Callee, CallRequest, Dialer, EmulatedCall
from parley.devkit.telephony.twilio_resources import (
    call_resource,
    not_found,
    recording_resource,
    twilio_error,
)
from parley.devkit.telephony.webhook_client import UrlMap

_ACCOUNT = "/2010-04-01/Accounts/{account_sid}"
_EVENTS = {"initiated", "ringing", "answered", "completed"}
_AMD = {"Enable", "DetectMessageEnd"}


class TwilioEmulator:
    """The emulator's state: calls, recordings, the callee registry and the dialing tasks."""

    def __init__(self, *, gateway_url: str, auth_token: str, account_sid: str,
                 public_url: str | None = None, callees: Mapping[str, Callee] | None = None,
                 default_callee: Callee | None = None, emulator_url: str | None = None,
                 max_call_seconds: float = 600.0) -> None:
        self.auth_token, self.account_sid = auth_token, account_sid
        self.url_map = UrlMap(public_url=public_url, actual_url=gateway_url)
        self.callees: dict[str, Callee] = dict(callees or {})
        self.default_callee = default_callee or Callee()
        self.emulator_url = emulator_url
        self.max_call_seconds = max_call_seconds
        self.calls: dict[str, EmulatedCall] = {}
        self.recordings: dict[str, bytes] = {}
        self._dialer: Dialer | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def open(self) -> None:
        """Create the HTTP session the calls use."""
        session = aiohttp.ClientSession()
        self._dialer = Dialer(session=session, url_map=self.url_map, auth_token=self.auth_token,
                              account_sid=self.account_sid, recordings=self.recordings,
                              max_call_seconds=self.max_call_seconds)

    async def close(self) -> None:
        """Cancel every call still dialing and close the session."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._dialer is not None:
            await self._dialer.session.close()

    def dial(self, request: CallRequest, recording_base_url: str) -> EmulatedCall:
        """Create a call and start dialing it."""
        assert self._dialer is not None, "the emulator app is not running"
        call = EmulatedCall(dialer=self._dialer, request=request,
                            callee=self.callees.get(request.to, self.default_callee),
                            recording_base_url=self.emulator_url or recording_base_url)
        self.calls[call.sid] = call
        self._tasks[call.sid] = asyncio.create_task(call.run(), name=f"twilio-call-{call.sid}")
        return call

    async def wait_for_call(self, call_sid: str) -> EmulatedCall:
        """Wait until a call has ended and every callback has been posted."""
        await self._tasks[call_sid]
        return self.calls[call_sid]


EMULATOR = web.AppKey("twilio_emulator", TwilioEmulator)


def create_emulator_app(*, gateway_url: str, auth_token: str, account_sid: str,
                        public_url: str | None = None,
                        callees: Mapping[str, Callee] | None = None,
                        default_callee: Callee | None = None, emulator_url: str | None = None,
                        max_call_seconds: float = 600.0) -> web.Application:
    """The emulator as an aiohttp app; its state is ``app[EMULATOR]``.

    ``gateway_url`` is where the gateway really listens, ``public_url`` the base URL it puts in
    TwiML and callbacks (Twilio signs that one); ``emulator_url`` is this server's own base URL
    for recording links (default: the host the SDK called).
    """
    app = web.Application(middlewares=[_authenticate])
    app[EMULATOR] = TwilioEmulator(
        gateway_url=gateway_url, auth_token=auth_token, account_sid=account_sid,
        public_url=public_url, callees=callees, default_callee=default_callee,
        emulator_url=emulator_url, max_call_seconds=max_call_seconds)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await app[EMULATOR].open()
        yield
        await app[EMULATOR].close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post(_ACCOUNT + "/Calls.json", _create_call)
    app.router.add_get(_ACCOUNT + "/Calls/{call_sid}.json", _fetch_call)
    app.router.add_post(_ACCOUNT + "/Calls/{call_sid}.json", _update_call)
    app.router.add_post(_ACCOUNT + "/Calls/{call_sid}/Recordings.json", _start_recording)
    app.router.add_get(_ACCOUNT + "/Recordings/{recording}", _recording)
    return app


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    if "/Recordings/" in request.path and "Authorization" not in request.headers:
        return await handler(request)  # recordings are public unless credentials are sent
    username, password = _basic_auth(request.headers.get("Authorization", ""))
    if not (hmac.compare_digest(username, emulator.account_sid)
            and hmac.compare_digest(password, emulator.auth_token)):
        return twilio_error(401, 20003, "Authenticate")
    if request.match_info.get("account_sid") != emulator.account_sid:
        return not_found(request.path)
    return await handler(request)


def _basic_auth(header: str) -> tuple[str, str]:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        username, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    return username, password


def _method(form: MultiDictProxy[Any], name: str) -> str:
    value = form.get(name, "POST").upper()
    if value not in ("GET", "POST"):
        raise _Invalid(21200, f"{name} must be GET or POST, not {value!r}")
    return value


def _absolute_url(form: MultiDictProxy[Any], name: str, code: int) -> str | None:
    value = form.get(name) or None
    if value is not None and not value.startswith(("http://", "https://")):
        raise _Invalid(code, f"{name} is not a valid URL: {value}")
    return value


class _Invalid(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _call_request(form: MultiDictProxy[Any]) -> CallRequest:
    if not form.get("To"):
        raise _Invalid(21201, "No 'To' number is specified")
    if not form.get("From"):
        raise _Invalid(21213, "No 'From' number is specified")
    url = _absolute_url(form, "Url", 21205)
    if url is None and not form.get("Twiml") and not form.get("ApplicationSid"):
        raise _Invalid(21205, "Url parameter is required.")
    events = {event for value in form.getall("StatusCallbackEvent", [])
              for event in value.split()}
    if events - _EVENTS:
        raise _Invalid(21626, f"Invalid StatusCallbackEvent: {', '.join(sorted(events - _EVENTS))}")
    amd = form.get("MachineDetection") or None
    if amd is not None and amd not in _AMD:
        raise _Invalid(21200, f"MachineDetection must be Enable or DetectMessageEnd, not {amd!r}")
    channels = form.get("RecordingChannels", "mono")
    if channels not in ("mono", "dual"):
        raise _Invalid(21200, f"RecordingChannels must be mono or dual, not {channels!r}")
    return CallRequest(
        to=form["To"], from_=form["From"], url=url, method=_method(form, "Method"),
        twiml=form.get("Twiml") or None,
        status_callback=_absolute_url(form, "StatusCallback", 21609),
        status_callback_method=_method(form, "StatusCallbackMethod"),
        status_callback_events=frozenset(events or {"completed"}),
        machine_detection=amd, async_amd=form.get("AsyncAmd", "false").lower() == "true",
        async_amd_callback=_absolute_url(form, "AsyncAmdStatusCallback", 21609),
        async_amd_callback_method=_method(form, "AsyncAmdStatusCallbackMethod"),
        record=form.get("Record", "false").lower() == "true", recording_channels=channels,
        recording_callback=_absolute_url(form, "RecordingStatusCallback", 21609),
        recording_callback_method=_method(form, "RecordingStatusCallbackMethod"))


async def _create_call(request: web.Request) -> web.Response:
    try:
        call_request = _call_request(await request.post())
    except _Invalid as error:
        return twilio_error(400, error.code, str(error))
    call = request.app[EMULATOR].dial(call_request, str(request.url.origin()))
    return web.json_response(call_resource(call), status=201)


def _find(request: web.Request) -> EmulatedCall | web.Response:
    call = request.app[EMULATOR].calls.get(request.match_info["call_sid"])
    return call if call is not None else not_found(request.path)


async def _fetch_call(request: web.Request) -> web.Response:
    call = _find(request)
    return call if isinstance(call, web.Response) else web.json_response(call_resource(call))


async def _update_call(request: web.Request) -> web.Response:
    call = _find(request)
    if isinstance(call, web.Response):
        return call
    form = await request.post()
    status = form.get("Status")
    twiml_text, url = form.get("Twiml"), form.get("Url")
    if status is not None and status not in ("completed", "canceled"):
        return twilio_error(400, 21218, f"Status must be completed or canceled, not {status!r}")
    if status == "completed" or (status == "canceled" and call.status in ("queued", "ringing")):
        call.hang_up()
    elif twiml_text or url:
        if call.status != "in-progress":
            return twilio_error(400, 21220, "Call is not in-progress. Cannot redirect.")
        call.redirect(twiml_text=str(twiml_text) if twiml_text else None,
                      url=str(url) if url else None, method=str(form.get("Method", "POST")))
    return web.json_response(call_resource(call))


async def _start_recording(request: web.Request) -> web.Response:
    call = _find(request)
    if isinstance(call, web.Response):
        return call
    form = await request.post()
    if call.status != "in-progress":
        return twilio_error(400, 21220, "Call is not in-progress. Cannot start a recording.")
    channels = str(form.get("RecordingChannels", "mono"))
    if channels not in ("mono", "dual"):
        return twilio_error(400, 21200, f"RecordingChannels must be mono or dual: {channels!r}")
    try:
        callback = _absolute_url(form, "RecordingStatusCallback", 21609)
        method = _method(form, "RecordingStatusCallbackMethod")
    except _Invalid as error:
        return twilio_error(400, error.code, str(error))
    recording = call.start_recording(callback=callback, callback_method=method,
                                     channels=channels)
    return web.json_response(recording_resource(call, recording), status=201)


async def _recording(request: web.Request) -> web.Response:
    sid, dot, extension = request.match_info["recording"].partition(".")
    audio = request.app[EMULATOR].recordings.get(sid)
    if audio is None or (dot and extension != "wav"):
        return not_found(request.path)
    return web.Response(body=audio, content_type="audio/x-wav")
