"""One outbound call placed through the Twilio emulator, from "queued" to "completed".

The call rings the callee (status callbacks ``initiated``, ``ringing``), and, when answered
(``in-progress``), fetches its TwiML from ``Url`` (or uses ``Twiml``) with a signed request and
executes it: ``<Connect><Stream>`` is played by the callee's script through the same
:class:`~.media_stream_client.MediaStreamClient` the caller simulator uses. Async AMD posts the
callee's ``AnsweredBy``; the end posts ``completed`` with ``CallDuration`` and, if recording,
the recording callback whose URL the emulator serves as a WAV of the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import aiohttp

from parley.devkit.telephony import twiml_reader as twiml
from parley.devkit.telephony.call_recording import Recording, StreamSegment
from parley.devkit.telephony.call_script import CallScript
from parley.devkit.telephony.media_stream_client import MediaStreamClient, StreamError
from parley.devkit.telephony.twilio_protocol import new_sid
from parley.devkit.telephony.webhook_client import (
    UrlMap,
    WebhookError,
    send_webhook,
    status_params,
    voice_params,
)

logger = logging.getLogger("parley.devkit.twilio_emulator")

CallOutcome = Literal["answer", "busy", "no-answer", "failed"]


@dataclass(frozen=True, kw_only=True)
class Callee:
    """How the called number behaves: answers or not, human or machine, what it says."""

    outcome: CallOutcome = "answer"
    answered_by: str = "human"  # AMD result: human, machine_start, machine_end_beep, fax, …
    machine_detection_seconds: float = 0.3
    ring_seconds: float = 0.05
    script: CallScript = field(default_factory=lambda: CallScript(hang_up_when_done=False))


@dataclass(frozen=True, kw_only=True)
class CallRequest:
    """The parameters of ``POST …/Calls.json`` that the emulator acts on."""

    to: str
    from_: str
    url: str | None = None
    method: str = "POST"
    twiml: str | None = None
    status_callback: str | None = None
    status_callback_method: str = "POST"
    status_callback_events: frozenset[str] = frozenset({"completed"})
    machine_detection: str | None = None
    async_amd: bool = False
    async_amd_callback: str | None = None
    async_amd_callback_method: str = "POST"
    record: bool = False
    recording_channels: str = "mono"
    recording_callback: str | None = None
    recording_callback_method: str = "POST"


@dataclass(frozen=True, kw_only=True)
class Dialer:
    """What every call of one emulator shares."""

    session: aiohttp.ClientSession
    url_map: UrlMap
    auth_token: str
    account_sid: str
    recordings: dict[str, bytes]
    max_call_seconds: float = 600.0


def _now() -> datetime:
    return datetime.now(UTC)


class EmulatedCall:
    """The state and lifecycle of one call; :meth:`run` dials it to the end."""

    def __init__(self, *, dialer: Dialer, request: CallRequest, callee: Callee,
                 recording_base_url: str) -> None:
        self.dialer, self.request, self.callee = dialer, request, callee
        self.sid = new_sid("CA")
        self.status = "queued"
        self.answered_by: str | None = None
        self.date_created = self.date_updated = _now()
        self.start_time: datetime | None = None
        self.end_time: datetime | None = None
        self.duration: int | None = None
        self.recording: Recording | None = None
        self.recording_url: str | None = None
        self.errors: list[str] = []
        self._recording_base = recording_base_url.rstrip("/")
        self._interrupt = asyncio.Event()
        self._hangup = False
        self._redirect: twiml.Redirect | str | None = None
        self._client: MediaStreamClient | None = None
        self._segments: list[StreamSegment] = []
        self._answered_at = 0.0
        self._sequence = 0
        self._base_params = voice_params(
            account_sid=dialer.account_sid, call_sid=self.sid, from_number=request.from_,
            to_number=request.to, direction="outbound-api", call_status="queued")

    def hang_up(self) -> None:
        """``Status=completed`` (or ``canceled`` before answer): end the call now."""
        self._hangup = True
        self._interrupt.set()
        if self._client is not None:
            self._client.hang_up("api_hangup")

    def redirect(self, *, twiml_text: str | None = None, url: str | None = None,
                 method: str = "POST") -> None:
        """``Twiml=`` or ``Url=`` on a live call: stop what it does and run the new TwiML."""
        self._redirect = twiml_text if twiml_text is not None else twiml.Redirect(url or "",
                                                                                  method)
        self._interrupt.set()
        if self._client is not None:
            self._client.hang_up("redirected")

    def start_recording(self, *, callback: str | None, callback_method: str = "POST",
                        channels: str = "mono") -> Recording:
        """Start recording a live call now (the Call Recordings API)."""
        self.recording = Recording(callback=callback, callback_method=callback_method,
                                   channels=channels, source="StartCallRecordingAPI",
                                   offset=time.monotonic() - self._answered_at)
        return self.recording

    async def run(self) -> None:
        """Ring, answer (or not), execute the TwiML, end; posts every callback on the way."""
        if await self._progress("initiated", wait=self.callee.ring_seconds):
            return await self._end("canceled")
        self.status = "ringing"
        if await self._progress("ringing", wait=self.callee.ring_seconds):
            return await self._end("canceled")
        if self.callee.outcome != "answer":
            return await self._end(self.callee.outcome)
        self.status, self.start_time = "in-progress", _now()
        self._answered_at = time.monotonic()
        if self.request.record:
            self.recording = Recording(callback=self.request.recording_callback,
                                       callback_method=self.request.recording_callback_method,
                                       channels=self.request.recording_channels)
        await self._progress("answered", call_status="in-progress")
        amd = None
        if self.request.machine_detection and self.request.async_amd:
            amd = asyncio.create_task(self._post_amd())
        try:
            params = dict(self._params("in-progress"))
            if self.request.machine_detection and not self.request.async_amd:
                await asyncio.sleep(self.callee.machine_detection_seconds)
                self.answered_by = params["AnsweredBy"] = self.callee.answered_by
            if self.request.twiml is not None:
                verbs = twiml.parse_twiml(self.request.twiml)
            else:
                verbs = await self._fetch(twiml.Redirect(self.request.url or "",
                                                         self.request.method), params)
            async with asyncio.timeout(self.dialer.max_call_seconds):
                await self._execute(verbs)
        except (WebhookError, twiml.TwimlError, StreamError, TimeoutError) as error:
            self._note(f"call {self.sid}: {error}")
        finally:
            if amd is not None:
                amd.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await amd
        await self._end("completed")

    async def _execute(self, verbs: list[twiml.Verb]) -> None:
        pending = list(verbs)
        while (pending or self._redirect is not None) and not self._hangup:
            if self._redirect is not None:
                pending = await self._follow_redirect()
                continue
            match pending.pop(0):
                case twiml.ConnectStream() as stream:
                    reason = await self._stream(stream)
                    if reason in ("script_ended", "hangup_after"):
                        return  # the callee hung up
                    if reason == "gateway_closed" and stream.action and not self._redirect:
                        pending = await self._fetch(twiml.Redirect(stream.action, stream.method),
                                                    self._params("in-progress"))
                case twiml.Pause(seconds=seconds):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._interrupt.wait(), seconds)
                case twiml.Redirect() as redirect:
                    pending = await self._fetch(redirect, self._params("in-progress"))
                case twiml.Hangup():
                    return
                case twiml.OtherVerb(tag=tag):
                    logger.info("call %s: <%s> is not emulated, skipped", self.sid, tag)

    async def _stream(self, stream: twiml.ConnectStream) -> str:
        self._client = MediaStreamClient(
            session=self.dialer.session, url=stream.url, custom_parameters=stream.parameters,
            auth_token=self.dialer.auth_token, account_sid=self.dialer.account_sid,
            call_sid=self.sid, script=self.callee.script, url_map=self.dialer.url_map,
            log=lambda at, text: logger.debug("call %s %.2fs %s", self.sid, at, text))
        if self._hangup:
            self._client.hang_up("api_hangup")
        offset = time.monotonic() - self._answered_at
        try:
            outcome = await self._client.run()
        finally:
            self._client = None
        self._segments.append((offset, outcome.caller_audio, outcome.agent_audio))
        return outcome.stop_reason

    async def _follow_redirect(self) -> list[twiml.Verb]:
        target, self._redirect = self._redirect, None
        self._interrupt.clear()
        if isinstance(target, str):
            return twiml.parse_twiml(target)
        assert target is not None
        return await self._fetch(target, self._params("in-progress"))

    async def _fetch(self, where: twiml.Redirect, params: dict[str, str]) -> list[twiml.Verb]:
        body = await send_webhook(self.dialer.session, self.dialer.url_map, url=where.url,
                                  params=params, auth_token=self.dialer.auth_token,
                                  method=where.method)
        return twiml.parse_twiml(body)

    async def _progress(self, event: str, *, call_status: str | None = None,
                        wait: float = 0.0) -> bool:
        """Post the status callback for ``event`` if asked for; then wait. True: hung up."""
        request = self.request
        if request.status_callback and event in request.status_callback_events:
            await self._post(request.status_callback, request.status_callback_method,
                             status_params(self._base_params, call_status=call_status or event,
                                           sequence=self._next_sequence()))
        if wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._interrupt.wait(), wait)
        return self._hangup

    async def _end(self, status: str) -> None:
        self.status, self.end_time = status, _now()
        self.date_updated = self.end_time
        started = self.start_time or self.end_time
        self.duration = round((self.end_time - started).total_seconds())
        recording = self._store_recording() if self.recording and self._segments else None
        request = self.request
        if request.status_callback and "completed" in request.status_callback_events:
            params = status_params(self._params(status), call_status=status,
                                   sequence=self._next_sequence(), duration_seconds=self.duration)
            await self._post(request.status_callback, request.status_callback_method, params)
        if recording is not None and recording.callback:
            await self._post(recording.callback, recording.callback_method,
                             recording.callback_params(account_sid=self.dialer.account_sid,
                                                       call_sid=self.sid,
                                                       url=self.recording_url or ""))

    async def _post_amd(self) -> None:
        await asyncio.sleep(self.callee.machine_detection_seconds)
        self.answered_by = self.callee.answered_by
        if self.request.async_amd_callback:
            params = {"AccountSid": self.dialer.account_sid, "CallSid": self.sid,
                      "AnsweredBy": self.callee.answered_by,
                      "MachineDetectionDuration": str(
                          round(self.callee.machine_detection_seconds * 1000))}
            await self._post(self.request.async_amd_callback,
                             self.request.async_amd_callback_method, params)

    def _store_recording(self) -> Recording:
        assert self.recording is not None
        self.dialer.recordings[self.recording.sid] = self.recording.finish(self._segments)
        self.recording_url = (f"{self._recording_base}/2010-04-01/Accounts/"
                              f"{self.dialer.account_sid}/Recordings/{self.recording.sid}")
        return self.recording

    def _params(self, call_status: str) -> dict[str, str]:
        params = {**self._base_params, "CallStatus": call_status}
        if self.answered_by:
            params["AnsweredBy"] = self.answered_by
        return params

    def _next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence - 1

    async def _post(self, url: str, method: str, params: dict[str, str]) -> None:
        try:
            await send_webhook(self.dialer.session, self.dialer.url_map, url=url, params=params,
                               auth_token=self.dialer.auth_token, method=method)
        except WebhookError as error:  # Twilio logs a failed callback and carries on
            self._note(str(error))

    def _note(self, text: str) -> None:
        self.errors.append(text)
        logger.warning("%s", text)

