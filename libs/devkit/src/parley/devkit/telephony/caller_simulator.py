"""The caller simulator: plays Twilio for one inbound call against a gateway.

1. POSTs a signed voice webhook to ``<gateway>/twilio/voice`` with the parameters Twilio sends
   for a ringing inbound call.
2. Reads the TwiML answer and its ``<Connect><Stream>`` (URL and ``<Parameter>``s).
3. Plays the stream with :class:`~.media_stream_client.MediaStreamClient`: the script's
   utterances at real-time pace, Twilio's playback semantics for what the gateway sends back.
4. If the gateway closed the socket and ``<Connect action>`` is set, POSTs the action URL as
   Twilio does (and logs the TwiML it gets; following a reconnect is left to the emulator).
5. Writes a stereo WAV (caller left, agent right) and returns a :class:`CallResult`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from parley.devkit.telephony.call_script import CallScript
from parley.devkit.telephony.media_stream_client import (
    Clock,
    Log,
    MediaStreamClient,
    MonotonicClock,
    StreamOutcome,
    Turn,
)
from parley.devkit.telephony.twilio_protocol import new_sid
from parley.devkit.telephony.twiml_reader import first_stream, parse_twiml
from parley.devkit.telephony.webhook_client import UrlMap, send_webhook, voice_params


@dataclass(frozen=True, kw_only=True)
class CallResult:
    """What a simulated call did."""

    call_sid: str
    stream_sid: str
    stop_reason: str
    duration: float
    turns: list[Turn] = field(default_factory=list)
    marks_echoed: list[str] = field(default_factory=list)
    wav_path: Path | None = None
    protocol_errors: list[str] = field(default_factory=list)
    stream: StreamOutcome | None = None

    @property
    def latencies_ms(self) -> list[float | None]:
        """Per turn: end of the caller's utterance → first agent audio frame received."""
        return [turn.latency_ms for turn in self.turns]


class CallerSimulator:
    """One inbound call, played as Twilio would place it; :meth:`run` performs it.

    ``gateway_url`` is where the gateway really listens; ``public_url`` is the base URL the
    gateway believes it is reached at (what it puts in TwiML and what Twilio signs), if
    different. ``session`` is used if given (and then not closed); ``clock`` paces the frames.
    """

    def __init__(self, *, gateway_url: str, auth_token: str, from_number: str, to_number: str,
                 script: CallScript, public_url: str | None = None,
                 account_sid: str | None = None, call_sid: str | None = None,
                 wav_path: str | Path | None = None, voice_path: str = "/twilio/voice",
                 session: aiohttp.ClientSession | None = None, clock: Clock | None = None,
                 log: Log | None = None) -> None:
        self._gateway_url = gateway_url.rstrip("/")
        self._public_url = (public_url or gateway_url).rstrip("/")
        self._url_map = UrlMap(public_url=public_url, actual_url=gateway_url)
        self._auth_token = auth_token
        self._from, self._to = from_number, to_number
        self._script = script
        self._account_sid = account_sid or new_sid("AC")
        self.call_sid = call_sid or new_sid("CA")
        self._wav_path = Path(wav_path) if wav_path else None
        self._voice_path = voice_path
        self._session = session
        self._clock = clock or MonotonicClock()
        self._log: Log = log or (lambda _at, _text: None)
        self._client: MediaStreamClient | None = None
        # Called with the <Stream> parameters (call_id, org_id, agent_id) before streaming.
        self.on_stream: Callable[[dict[str, str]], Awaitable[None]] | None = None

    def hang_up(self, reason: str = "hangup") -> None:
        """Hang up the call in progress at the next frame."""
        if self._client is not None:
            self._client.hang_up(reason)

    async def run(self) -> CallResult:
        """Place the call and play it to the end."""
        if self._session is not None:
            return await self._run(self._session)
        async with aiohttp.ClientSession() as session:
            return await self._run(session)

    async def _run(self, session: aiohttp.ClientSession) -> CallResult:
        params = voice_params(account_sid=self._account_sid, call_sid=self.call_sid,
                              from_number=self._from, to_number=self._to,
                              direction="inbound", call_status="ringing")
        voice_url = self._public_url + self._voice_path
        self._log(0.0, f"call {self.call_sid}: {self._from} → {self._to}, POST {voice_url}")
        twiml = await send_webhook(session, self._url_map, url=voice_url, params=params,
                                   auth_token=self._auth_token)
        stream = first_stream(parse_twiml(twiml))
        self._log(0.0, f"TwiML: <Connect><Stream url={stream.url!r}>")
        if self.on_stream is not None:
            await self.on_stream(dict(stream.parameters))
        self._client = MediaStreamClient(
            session=session, url=stream.url, custom_parameters=stream.parameters,
            auth_token=self._auth_token, account_sid=self._account_sid, call_sid=self.call_sid,
            script=self._script, url_map=self._url_map, clock=self._clock, log=self._log)
        outcome = await self._client.run()
        if outcome.stop_reason == "gateway_closed" and stream.action:
            action_params = {**params, "CallStatus": "in-progress"}
            answer = await send_webhook(session, self._url_map, url=stream.action,
                                        params=action_params, auth_token=self._auth_token,
                                        method=stream.method)
            self._log(outcome.duration, f"<Connect action> answered: {answer.strip()[:200]}")
        wav_path = outcome.write_wav(self._wav_path) if self._wav_path else None
        return CallResult(call_sid=self.call_sid, stream_sid=outcome.stream_sid,
                          stop_reason=outcome.stop_reason, duration=outcome.duration,
                          turns=outcome.turns, marks_echoed=outcome.marks_echoed,
                          wav_path=wav_path, protocol_errors=outcome.protocol_errors,
                          stream=outcome)
