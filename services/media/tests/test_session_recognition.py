"""A call's recogniser: switched mid-call when it fails, with the open turn's audio replayed."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

import pytest
from nats.js.errors import KeyNotFoundError

from parley.common.bus import Bus, command_subject
from parley.common.configuration.models import AgentSettings
from parley.common.events import (
    MediaProviderSwitched,
    TranscriptFinal,
    TranscriptPartial,
    TurnUserEnded,
)
from parley.devkit.emulators.deepgram import DeepgramEmulator, Retracted
from parley.media.ownership import Leases, LeaseState
from parley.media.providers.base import Final, ProviderError, WordTiming
from parley.media.providers.deepgram_stt import DeepgramStt
from parley.media.router import ProviderRouter
from parley.media.session import CallSession, SessionServices

ORG, CALL = "acme", "call-1"


class Stream:
    """A recogniser stream: events are what the test puts in ``results``."""

    def __init__(self, name: str, *, broken_send: bool = False) -> None:
        self.name = name
        self.broken_send = broken_send
        self.sent: list[bytes] = []
        self.results: asyncio.Queue[object] = asyncio.Queue()

    async def send(self, ulaw: bytes) -> None:
        if self.broken_send:
            raise ProviderError(self.name, "send failed: ConnectionClosedError()")
        self.sent.append(bytes(ulaw))

    async def finalize(self) -> None:
        pass

    async def close(self) -> None:
        self.results.put_nowait(None)

    async def events(self):
        while (item := await self.results.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item


class Recogniser:
    def __init__(self, name: str, *, first_send_broken: bool = False) -> None:
        self.name = name
        self.first_send_broken = first_send_broken
        self.streams: list[Stream] = []

    async def open(self, *, language: str = "en-US", endpointing_ms: int | None = None):
        stream = Stream(self.name, broken_send=self.first_send_broken and not self.streams)
        self.streams.append(stream)
        return stream


def session(bus: Bus, *recognisers: Recogniser) -> CallSession:
    return session_with(bus, {r.name: r for r in recognisers})


def session_with(bus: Bus, providers: dict[str, object]) -> CallSession:
    """A session whose recognisers are ``providers`` by name, in that order of fallback."""
    services = SessionServices(
        bus=bus, leases=None,  # type: ignore[arg-type]  # run() is not called
        stt=ProviderRouter("stt", providers, list(providers)),  # type: ignore[arg-type]
        tts=ProviderRouter("tts", {"never": object()}, ["never"]),  # type: ignore[dict-item]
        instance="test")
    return CallSession(services, call_id=CALL, org_id=ORG, agent_id="agent",
                       settings=AgentSettings(), revision=1)


async def recognising(call: CallSession) -> None:
    """The session's recogniser opened and its results read, as run() starts them."""
    call._stt_name, call._stt = await call.s.stt.open(call._stt_chain, call._open_stt)
    call._stt_task = asyncio.create_task(call._recognise())


async def stop_recognising(call: CallSession, *tasks: asyncio.Task) -> None:
    """Stop the session and its recognition (and the test's own ``tasks``), its stream
    closed and its events published."""
    call.stop("test")
    for task in (*tasks, call._stt_task):
        task.cancel()
    await asyncio.gather(*tasks, call._stt_task, return_exceptions=True)
    await call._close_stt(call._stt)
    await call._outbox.drain(1)


async def deepgram_given_up(call: CallSession) -> MediaProviderSwitched:
    """The call hung up for want of a recogniser (stt_failed), Deepgram the last one it had:
    the media.provider_switched to none, whose reason says why."""
    assert call.stopped.is_set() and call.end_reason == "stt_failed"
    await call._outbox.drain(1)
    [switched] = [e for e in await call.s.bus.replay_call(CALL, org_id=ORG)
                  if isinstance(e, MediaProviderSwitched)]
    assert (switched.kind, switched.from_provider, switched.to_provider) == (
        "stt", "deepgram", "")
    return switched


async def test_a_fallback_whose_socket_breaks_during_the_replay_still_hears_the_caller(
        bus) -> None:
    deepgram, whisper = Recogniser("deepgram"), Recogniser("whisper", first_send_broken=True)
    call = session(bus, deepgram, whisper)
    await recognising(call)
    try:
        for n in range(10):  # caller audio before the failure: replayed to the fallback
            await call._inbound_frame(b"\xff" * 160, n * 20)
        deepgram.streams[0].results.put_nowait(ProviderError("deepgram", "socket failed"))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if call._stt is whisper.streams[0]:
                break
        assert call._stt is whisper.streams[0]
        await asyncio.sleep(0.05)
        assert not call._stt_task.done()  # the replay's failure did not end the task
        whisper.streams[0].results.put_nowait(Final("book me in for friday", speech_final=True))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if call.detector.text:
                break
        assert call.detector.text == "book me in for friday"
    finally:
        await stop_recognising(call)


async def test_a_recogniser_whose_streams_open_but_never_deliver_gets_its_breaker_opened(
        bus) -> None:
    # Every socket opens, then the stream fails before a single result (a stall): what
    # counts is the stream, not the open, so after three such calls the breaker opens and the
    # next call starts on the fallback instead of paying the stall again.
    deepgram, whisper = Recogniser("deepgram"), Recogniser("whisper")
    services = session(bus, deepgram, whisper).s
    for n in range(3):
        call = CallSession(services, call_id=f"call-{n}", org_id=ORG, agent_id="agent",
                           settings=AgentSettings(), revision=1)
        call._stt_name, call._stt = await services.stt.open(call._stt_chain, call._open_stt)
        assert call._stt_name == "deepgram"
        call._stt_task = asyncio.create_task(call._recognise())
        try:
            call._stt.results.put_nowait(ProviderError("deepgram", "stalled"))  # type: ignore[attr-defined]
            for _ in range(100):
                await asyncio.sleep(0.01)
                if call._stt_name == "whisper":
                    break
            assert call._stt_name == "whisper"
        finally:
            call.stop("test")
            call._stt_task.cancel()
            await asyncio.gather(call._stt_task, return_exceptions=True)
            await call._outbox.drain(1)
    assert not services.stt.health["deepgram"].available
    assert (await services.stt.open(services.stt.chain(), call._open_stt))[0] == "whisper"


async def test_a_recogniser_stream_that_delivers_resets_the_failures_counted_before(bus) -> None:
    deepgram = Recogniser("deepgram")
    call = session(bus, deepgram, Recogniser("whisper"))
    health = call.s.stt.health["deepgram"]
    await recognising(call)
    try:
        health.failure()  # other calls' streams broke meanwhile
        health.failure()
        deepgram.streams[0].results.put_nowait(Final("hello", speech_final=True))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if call.detector.text:
                break
        health.failure()
        health.failure()
        assert health.available  # 2 failures since this stream's first result, not 4
    finally:
        await stop_recognising(call)


class LoudIsSpeech:
    """A VAD for synthetic frames: µ-law 0x00 (full scale) is speech, 0xff (zero) is not."""

    def is_speech(self, pcm: bytes) -> bool:
        return pcm[:2] != b"\x00\x00"


async def test_a_switch_mid_turn_replays_the_turn_from_its_pre_roll(bus) -> None:
    first, second = Recogniser("first"), Recogniser("second")
    call = session(bus, first, second)
    call.vad = LoudIsSpeech()  # type: ignore[assignment]
    call._stt_name, call._stt = await call.s.stt.open(call._stt_chain, call._open_stt)
    silence = [b"\xff" * 159 + bytes([n]) for n in range(60)]
    speech = [b"\x00" * 159 + bytes([n]) for n in range(30)]
    for n, frame in enumerate(silence + speech):
        await call._inbound_frame(frame, n * 20)
    assert call.detector.in_turn
    await call._switch_stt("first: socket failed")
    replayed = b"".join(second.streams[0].sent)
    frames = [replayed[i:i + 160] for i in range(0, len(replayed), 160)]
    # 400 ms of pre-roll before the speech began, then all of the speech: none of it clipped
    assert frames == silence[-20:] + speech
    await call._outbox.drain(1)


async def test_deepgram_closing_the_socket_cleanly_moves_the_call_to_the_fallback(bus) -> None:
    # A clean 1001 from Deepgram's side (a redeploy, a proxy going away) is a failure of the
    # stream, not our close: the call goes on with the next recogniser instead of going deaf.
    server = DeepgramEmulator(api_key="dg-key")
    await server.start()
    whisper = Recogniser("whisper")
    call = session(bus, DeepgramStt("dg-key", base_url=server.base_url),  # type: ignore[arg-type]
                   whisper)
    await recognising(call)
    try:
        for n in range(10):
            await call._inbound_frame(b"\xff" * 160, n * 20)
        await server.stop()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if whisper.streams:
                break
        assert call._stt_name == "whisper" and call._stt is whisper.streams[0]
        assert not call._stt_task.done() and not call.stopped.is_set()
        assert call.s.stt.health["deepgram"].error_rate > 0
    finally:
        await stop_recognising(call)
        await server.stop()


class Listening:
    """A session hearing the caller: its recogniser open and reading, frames fed on its clock."""

    def __init__(self, call: CallSession) -> None:
        self.call = call
        self.frames = 0

    @classmethod
    async def start(cls, call: CallSession) -> Listening:
        call.vad = LoudIsSpeech()  # type: ignore[assignment]
        await recognising(call)
        return cls(call)

    async def hear(self, frame: bytes, count: int) -> None:
        for _ in range(count):
            await self.call._inbound_frame(frame, self.frames * 20)
            self.frames += 1

    async def until(self, predicate: Callable[[], bool], timeout_s: float = 3.0) -> None:
        """Wait for the recogniser's answer to the audio so far."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, self.call.detector.text
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.call.stop("test")
        await self.call._stt.close()
        await asyncio.gather(self.call._stt_task, return_exceptions=True)


async def test_an_interim_deepgram_takes_back_neither_delays_the_turn_nor_joins_it(bus) -> None:
    # "I'd like to book a table." then a breath Deepgram first hears as "uh" and then takes
    # back with an empty final: the turn ends on the recogniser's end of utterance, without it.
    server = DeepgramEmulator(api_key="dg-key",
                              utterances=["I'd like to book a table.", Retracted("Uh")])
    await server.start()
    call = session(bus, DeepgramStt("dg-key", base_url=server.base_url))  # type: ignore[arg-type]
    ear = await Listening.start(call)
    loud, quiet = b"\x00" * 160, b"\xff" * 160
    try:
        await ear.hear(quiet, 10)
        await ear.hear(loud, 60)
        await ear.hear(quiet, 10)  # Deepgram's endpointing (200 ms): the sentence's final
        await ear.until(lambda: call.detector.text == "I'd like to book a table.")
        await ear.hear(loud, 20)  # within the VAD's hangover: the same turn
        await ear.until(lambda: call.detector.text.endswith("Uh"))
        await ear.hear(quiet, 15)  # Deepgram's empty final; the VAD's hangover is over
        await ear.until(lambda: call.turn_no == 1 or not call.detector.text.endswith("Uh"))
        while call.turn_no == 0 and ear.frames < 250:
            await ear.hear(quiet, 1)
        await call._outbox.drain(1)
    finally:
        await ear.close()
        await server.stop()
    events = await bus.replay_call(CALL, org_id=ORG)
    ended, = [e for e in events if isinstance(e, TurnUserEnded)]
    assert (ended.text, ended.reason) == ("I'd like to book a table.", "utterance_end")
    assert ended.eou_delay_ms <= 400  # half the endpointing silence, not the 2.5 s max wait
    assert [e.text for e in events if isinstance(e, TranscriptFinal)] == [
        "I'd like to book a table."]



async def _switch_mid_second_sentence(bus) -> list[object]:
    """The call's events: "I'd like to book a table." (Deepgram's final), a breath, "On
    Friday." — and Deepgram's socket breaks during it. The fallback hears the whole turn
    again from its pre-roll and recognises both parts."""
    script = ["I'd like to book a table.", "On Friday."]
    primary = DeepgramEmulator(api_key="dg-key", utterances=script)
    backup = DeepgramEmulator(api_key="dg-key", utterances=script)
    await primary.start()
    await backup.start()
    call = session_with(bus, {"deepgram": DeepgramStt("dg-key", base_url=primary.base_url),
                              "backup": DeepgramStt("dg-key", base_url=backup.base_url)})
    ear = await Listening.start(call)
    loud, quiet = b"\x00" * 160, b"\xff" * 160
    try:
        await ear.hear(quiet, 10)
        await ear.hear(loud, 60)
        await ear.hear(quiet, 12)  # Deepgram's endpointing (200 ms), within the VAD's hangover
        await ear.until(lambda: call.detector.text == "I'd like to book a table.")
        await ear.hear(loud, 10)  # "On Friday." begins: the same turn
        primary.faults.close_with_error = True
        await ear.hear(loud, 10)
        await ear.until(lambda: call._stt_name == "backup")
        await ear.hear(loud, 10)
        while call.turn_no == 0 and ear.frames < 400:
            await ear.hear(quiet, 1)
            await asyncio.sleep(0.002)  # the backup's finals, in audio time
        await call._outbox.drain(1)
    finally:
        await ear.close()
        await primary.stop()
        await backup.stop()
    return await bus.replay_call(CALL, org_id=ORG)


async def test_a_switch_mid_turn_does_not_repeat_the_words_the_failed_recogniser_gave(
        bus) -> None:
    # The failed recogniser's final for the first part must not stay in the turn as well as
    # the fallback's ("… a table. I'd like to book a table. On Friday.").
    events = await _switch_mid_second_sentence(bus)
    ended, = [e for e in events if isinstance(e, TurnUserEnded)]
    assert ended.text == "I'd like to book a table. On Friday."


async def test_a_switch_mid_turn_publishes_no_transcript_of_the_words_already_final(
        bus) -> None:
    # The fallback's final for the first part, heard again in the replay, came as a second
    # transcript.final: integrators, and the brain's warm-up (which joins the finals and the
    # partial after them), read "I'd like to book a table. I'd like to book a table. On…".
    events = await _switch_mid_second_sentence(bus)
    assert [e.text for e in events if isinstance(e, TranscriptFinal)] == [
        "I'd like to book a table.", "On Friday."]
    finals = ""
    for event in events:  # what a reader of the transcript sees the caller say, as it goes
        if isinstance(event, TranscriptFinal):
            finals = f"{finals} {event.text}".strip()
        elif isinstance(event, TranscriptPartial):
            assert f"{finals} {event.text}".count("I'd like") <= 1, event.text


async def test_a_fallback_final_that_runs_on_past_the_words_already_final_adds_only_its_own(
        bus) -> None:
    # The failed recogniser made "I'd like to book a table." final; the fallback, replayed the
    # turn, hears it and "On Friday." as one final: only "On Friday." is new to the transcript.
    first, second = Recogniser("first"), Recogniser("second")
    call = session(bus, first, second)
    call.vad = LoudIsSpeech()  # type: ignore[assignment]
    call._stt_name, call._stt = await call.s.stt.open(call._stt_chain, call._open_stt)
    loud, quiet = b"\x00" * 160, b"\xff" * 160
    for n, frame in enumerate([quiet] * 10 + [loud] * 60 + [quiet] * 12 + [loud] * 20):
        await call._inbound_frame(frame, n * 20)
    said = [("I'd", 0.2), ("like", 0.4), ("to", 0.6), ("book", 0.8), ("a", 1.0),
            ("table.", 1.2), ("On", 1.65), ("Friday.", 1.85)]  # audio time, s
    await call._on_stt(Final("I'd like to book a table.",
                             [WordTiming(w, at, at + 0.2) for w, at in said[:6]], end_s=1.4))
    await call._switch_stt("first: socket failed")
    origin_s = call._stt_origin / 8000  # the fallback's times are from its stream's start
    words = [WordTiming(w, at - origin_s + 0.03, at - origin_s + 0.21) for w, at in said]
    await call._on_stt(Final("I'd like to book a table. On Friday.", words,
                             start_s=words[0].start, end_s=words[-1].end))
    await call._outbox.drain(1)
    events = await bus.replay_call(CALL, org_id=ORG)
    assert [(e.text, [w.text for w in e.words]) for e in events
            if isinstance(e, TranscriptFinal)] == [
        ("I'd like to book a table.", ["I'd", "like", "to", "book", "a", "table."]),
        ("On Friday.", ["On", "Friday."])]
    assert call.detector.text == "I'd like to book a table. On Friday."


async def test_a_late_final_after_the_caller_spoke_again_stays_out_of_the_new_turn(bus) -> None:
    # "I'd like to book a table." heard by a recogniser slower than the max wait: the turn ends
    # on the partial "I'd like to book". The caller speaks again ("On Friday.") before that
    # sentence's final comes: the final is the old turn's late words, not the new turn's.
    server = DeepgramEmulator(api_key="dg-key", latency_s=1.5,
                              utterances=["I'd like to book a table.", "On Friday."])
    await server.start()
    call = session(bus, DeepgramStt("dg-key", base_url=server.base_url))  # type: ignore[arg-type]
    ear = await Listening.start(call)

    def sent(text: str) -> bool:
        return any(message.get("is_final") and message["channel"]["alternatives"][0][
            "transcript"] == text for message in server.sessions[0].sent)

    loud, quiet = b"\x00" * 160, b"\xff" * 160
    try:
        await ear.hear(quiet, 10)
        await ear.hear(loud, 50)
        await ear.until(lambda: call.detector.text == "I'd like to book",  # the interims, late
                        timeout_s=5)
        # Within the recogniser's latency: the max wait ends the turn, the caller speaks again.
        await ear.hear(quiet, 150)
        assert call.turn_no == 1 and not sent("I'd like to book a table.")
        await ear.hear(loud, 30)
        await ear.until(lambda: sent("I'd like to book a table."), timeout_s=5)
        await asyncio.sleep(0.05)
        while call.turn_no == 1 and ear.frames < 600:
            await ear.hear(quiet, 1)
            await asyncio.sleep(0.02)  # in real time: the new turn's final comes within its wait
        await call._outbox.drain(1)
    finally:
        await ear.close()
        await server.stop()
    events = await bus.replay_call(CALL, org_id=ORG)
    assert [(e.turn_id, e.text, e.reason) for e in events if isinstance(e, TurnUserEnded)] == [
        ("t1", "I'd like to book", "max_wait"), ("t2", "On Friday.", "utterance_end")]
    assert [(e.text, e.utterance_id) for e in events if isinstance(e, TranscriptFinal)] == [
        ("I'd like to book a table.", "t1"), ("On Friday.", "t2")]


class Unavailable:
    """A recogniser that cannot be opened (down, or full)."""

    name = "deepgram"

    async def open(self, *, language: str = "en-US", endpointing_ms: int | None = None):
        raise ProviderError(self.name, "503 Service Unavailable")


async def test_a_call_no_recogniser_can_hear_is_hung_up_and_let_go(bus) -> None:
    # No recogniser opens for the call. The session ended and left the lease held in this
    # instance's name: no other instance took it before the bucket's TTL, this one never
    # takes over its own, and the caller talked to an agent that could not hear, for good.
    # The call is hung up (reason error) and its lease released.
    leases = Leases(bus, "media-a")
    services = SessionServices(
        bus=bus, leases=leases, instance="media-a",
        stt=ProviderRouter("stt", {"deepgram": Unavailable()}, ["deepgram"],  # type: ignore[dict-item]
                           retry_initial_s=0.01),
        tts=ProviderRouter("tts", {"never": object()}, ["never"]))  # type: ignore[dict-item]
    revision = await leases.claim(CALL, LeaseState(owner="media-a", org_id=ORG))
    assert revision is not None
    hangups: list[dict[str, object]] = []

    async def gateway(msg) -> None:
        hangups.append(json.loads(msg.data))
        await msg.respond(b'{"ok": true}')

    sub = await bus.nc.subscribe(command_subject(CALL, "hangup"), cb=gateway)
    await bus.nc.flush()
    call = CallSession(services, call_id=CALL, org_id=ORG, agent_id="agent",
                       settings=AgentSettings(), revision=revision)
    try:
        await asyncio.wait_for(call.run(), 10)
    finally:
        await sub.unsubscribe()
        await leases.close()
    assert call.end_reason == "stt_unavailable"
    assert hangups == [{"reason": "error"}]
    with pytest.raises(KeyNotFoundError):
        await (await leases.kv()).get(CALL)


class ClosingSlowly(Stream):
    """A broken socket whose close takes a while (the closing handshake times out)."""

    def __init__(self, name: str, closing: asyncio.Event) -> None:
        super().__init__(name)
        self.closing = closing
        self.closed = False

    async def close(self) -> None:
        self.closing.set()
        await asyncio.sleep(0.1)
        self.closed = True
        await super().close()


class Fallback(Recogniser):
    """Opens its stream once ``gate`` is set (a WebSocket handshake under way)."""

    def __init__(self, name: str, gate: asyncio.Event) -> None:
        super().__init__(name)
        self.gate = gate
        self.opening = asyncio.Event()

    async def open(self, *, language: str = "en-US", endpointing_ms: int | None = None):
        self.opening.set()
        await self.gate.wait()
        stream = ClosingSlowly(self.name, asyncio.Event())
        self.streams.append(stream)  # type: ignore[arg-type]
        return stream


class Primary(Recogniser):
    def __init__(self, name: str, closing: asyncio.Event) -> None:
        super().__init__(name)
        self.closing = closing

    async def open(self, *, language: str = "en-US", endpointing_ms: int | None = None):
        stream = ClosingSlowly(self.name, self.closing)
        self.streams.append(stream)
        return stream


async def test_a_session_stopped_while_its_fallback_recogniser_opens_closes_that_one_too(
        bus) -> None:
    # Deepgram's socket broke and the session was opening the fallback's when the call was
    # handed over (a shutdown). The session closed the stream it had (the broken one), the
    # fallback's opened meanwhile, and the recogniser task was cancelled after: the new
    # socket was never closed, its reader and keep-alive tasks left running.
    closing = asyncio.Event()
    primary, fallback = Primary("deepgram", closing), Fallback("backup", asyncio.Event())
    leases = Leases(bus, "media-a")
    services = SessionServices(
        bus=bus, leases=leases, instance="media-a",
        stt=ProviderRouter("stt", {"deepgram": primary, "backup": fallback},  # type: ignore[dict-item]
                           ["deepgram", "backup"]),
        tts=ProviderRouter("tts", {"never": object()}, ["never"]))  # type: ignore[dict-item]
    revision = await leases.claim(CALL, LeaseState(owner="media-a", org_id=ORG))
    assert revision is not None
    call = CallSession(services, call_id=CALL, org_id=ORG, agent_id="agent",
                       settings=AgentSettings(), revision=revision)
    running = asyncio.create_task(call.run())
    try:
        for _ in range(200):
            if primary.streams and call._inbound is not None:
                break
            await asyncio.sleep(0.01)
        primary.streams[0].results.put_nowait(ProviderError("deepgram", "socket failed"))
        await asyncio.wait_for(fallback.opening.wait(), 2)
        closing.clear()  # (the switch closed the broken stream once already)
        call.stop("shutdown")
        await asyncio.wait_for(closing.wait(), 2)  # the session closes the stream it holds…
        fallback.gate.set()  # …while the fallback's handshake completes
        await asyncio.wait_for(running, 10)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await leases.close()
    [opened] = fallback.streams
    assert opened.closed  # type: ignore[attr-defined]


class Busy:
    """Local Whisper at capacity: no room for another stream."""

    name = "whisper"

    async def open(self, *, language: str = "en-US", endpointing_ms: int | None = None):
        from parley.media.providers.base import ProviderBusy
        raise ProviderBusy(self.name, "8 streams open (PARLEY_WHISPER_MAX_STREAMS)")


async def test_a_recogniser_that_refuses_the_calls_audio_for_good_is_not_reopened(bus) -> None:
    # Deepgram closes with 1008 DATA-0000 (audio it cannot decode: a misconfigured encoding)
    # and Whisper, the fallback, is full. The session tried the whole chain again, Deepgram
    # included, which opened, was sent the turn's audio, closed with 1008 again, and so on for
    # the rest of the call: a reconnect loop on the vendor. A permanent error leaves Deepgram
    # out for the rest of the call; with no recogniser left the call is hung up as when none
    # opens, and media.provider_switched (to none) says why.
    server = DeepgramEmulator(api_key="dg-key")
    await server.start()
    call = session_with(bus, {"deepgram": DeepgramStt("dg-key", base_url=server.base_url),
                              "whisper": Busy()})
    call.s.stt.retry_initial_s = 0.01
    await recognising(call)
    try:
        server.faults.undecodable_audio = True
        for n in range(10):
            await call._inbound_frame(b"\xff" * 160, n * 20)
        await call._stt_flush()
        with contextlib.suppress(TimeoutError):  # (before: never stopped; it looped)
            await asyncio.wait_for(call.stopped.wait(), 5)
        assert len(server.sessions) == 1  # Deepgram was not opened again for this call
        switched = await deepgram_given_up(call)
        assert "1008" in switched.reason and "DATA-0000" in switched.reason
        # The call's own audio, not Deepgram's health: not counted against it (other calls'
        # audio it decodes fine).
        assert call.s.stt.health["deepgram"].available
        assert call.s.stt.health["deepgram"].error_rate == 0
    finally:
        await stop_recognising(call)
        await server.stop()


async def test_a_recogniser_failing_every_stream_at_once_backs_off_then_the_call_ends(
        bus) -> None:
    # Deepgram opens, then closes every stream with 1011 (transient) as soon as audio comes,
    # and there is no fallback. The session reopened it at once each time, for the rest of the
    # call (its breaker open, the router still tries it last, as a probe): a reconnect loop on
    # the vendor. Now consecutive failures wait (0.2 s, doubling), the caller's audio held
    # meanwhile, and recognition failing for longer than the session allows (30 s of audio;
    # 2 s here) is handled as no recogniser left: media.provider_switched to none, stt_failed.
    server = DeepgramEmulator(api_key="dg-key")
    await server.start()
    call = session_with(bus, {"deepgram": DeepgramStt("dg-key", base_url=server.base_url)})
    call.s.stt.retry_initial_s = 0.01
    call.stt_give_up_after_s = 2.0
    await recognising(call)
    server.faults.close_with_error = True

    async def caller() -> None:  # real-time audio, as the gateway sends it
        n = 0
        while not call.stopped.is_set():
            await call._inbound_frame(b"\xff" * 160, n * 20)
            n += 1
            await asyncio.sleep(0.02)

    talking = asyncio.create_task(caller())
    try:
        with contextlib.suppress(TimeoutError):  # (before: never stopped; it looped)
            await asyncio.wait_for(call.stopped.wait(), 10)
        # 0, 0.2, 0.4, 0.8 s between reopens, then given up: a handful, not hundreds.
        assert 3 <= len(server.sessions) <= 10, len(server.sessions)
        switched = await deepgram_given_up(call)
        assert "1011" in switched.reason and "failing for" in switched.reason
    finally:
        await stop_recognising(call, talking)
        await server.stop()


async def test_recognition_after_a_backoff_hears_the_words_said_meanwhile(bus) -> None:
    # The replacement stream is opened after a wait: the caller's audio of that wait is not
    # lost. It reaches the new stream after the open turn's replay, each frame once.
    flaky = Recogniser("deepgram")
    call = session(bus, flaky)
    await recognising(call)
    fed: list[bytes] = []

    async def feed(count: int) -> None:
        for _ in range(count):
            frame = bytes([len(fed) % 120]) * 160  # each frame told apart
            fed.append(frame)
            await call._stt_send(frame)
            await asyncio.sleep(0.01)

    try:
        call.detector.speech_started(0)  # a turn is open: its audio is replayed on a switch
        await feed(10)
        await call._stt_flush()
        flaky.streams[0].results.put_nowait(ProviderError("deepgram", "1011 NET-0001"))
        await _until(lambda: len(flaky.streams) == 2, 5)
        flaky.streams[1].results.put_nowait(ProviderError("deepgram", "1011 NET-0001"))
        await feed(30)  # said during the wait before the third stream
        await _until(lambda: len(flaky.streams) == 3, 10)
        await feed(5)
        await call._stt_flush()
        assert b"".join(flaky.streams[2].sent) == b"".join(fed)  # all of it, once, in order
    finally:
        await stop_recognising(call)


async def _until(predicate: Callable[[], bool], timeout_s: float) -> None:
    for _ in range(round(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    assert predicate(), "condition not met in time"


async def test_a_turn_the_caller_finishes_while_the_recogniser_backs_off_is_heard_whole(
        bus) -> None:
    # Deepgram fails mid-sentence, and again at once when reopened: the session waits (3 s
    # here) before reopening it, the caller's frames handled meanwhile but held back from any
    # recogniser. The caller finished "Book me in for Friday at ten." and went quiet in that
    # wait; the turn detector, still going, ended the turn at max wait (here dropped as a
    # noise: the failed reopen had cleared the words; with a partial left, it ended on that)
    # and forgot its audio, so the next stream was replayed only a pre-roll: the sentence
    # reached no recogniser, and no turn or late words ever came of it. No turn ends while no
    # recogniser hears the caller: it is heard whole once one does.
    sentence = "Book me in for Friday at ten."
    server = DeepgramEmulator(api_key="dg-key", utterances=[sentence, sentence])
    await server.start()
    call = session_with(bus, {"deepgram": DeepgramStt("dg-key", base_url=server.base_url)})
    call.s.stt.retry_initial_s = 0.01
    call.stt_retry_initial_s = call.stt_retry_max_s = 3.0
    ear = await Listening.start(call)
    loud, quiet = b"\x00" * 160, b"\xff" * 160
    try:
        await ear.hear(quiet, 10)
        await ear.hear(loud, 40)
        await ear.until(lambda: call.detector.text.startswith("Book me"))  # interims
        server.faults.close_with_error = True
        deadline = asyncio.get_running_loop().time() + 5
        while not (call._stt_switching and call._stt_delay_s >= 3.0):  # failed twice: waiting
            assert asyncio.get_running_loop().time() < deadline, "no backoff"
            await ear.hear(loud, 1)
            await asyncio.sleep(0.02)
        server.faults.close_with_error = False
        await ear.hear(loud, 40)  # the rest of the sentence, then the max wait's silence
        await ear.hear(quiet, 140)
        assert call._stt_switching  # (all of it within the wait)
        await ear.until(lambda: not call._stt_switching, timeout_s=5)
        while call.turn_no == 0 and ear.frames < 700:
            await ear.hear(quiet, 1)
            await asyncio.sleep(0.01)
        await call._outbox.drain(1)
    finally:
        await ear.close()
        await server.stop()
    events = await bus.replay_call(CALL, org_id=ORG)
    # (before: no turn at all, the words lost; then, at times, a turn at once on the reopened
    # stream's first partial, "Book me", the max wait long over, and the sentence revising it)
    assert [(e.text, e.revises) for e in events if isinstance(e, TurnUserEnded)] == [
        (sentence, "")]
    assert [e.text for e in events if isinstance(e, TranscriptFinal)] == [sentence]


async def test_a_turn_awaiting_its_late_words_is_replayed_to_the_next_recogniser(bus) -> None:
    # "Book me in for Friday at ten.": Deepgram gave its interims and then nothing (a stalled
    # socket), and the turn ended at max wait on them, its final still to come and revise it.
    # Then the socket failed and the call moved to the fallback. No turn was open, so the
    # fallback was replayed only a pre-roll of silence: the late words never came, and the
    # turn kept its stale text. A turn awaiting its late words is replayed as the open turn
    # is, and its revision comes, once, from the recogniser that hears it.
    sentence = "Book me in for Friday at ten."
    primary = DeepgramEmulator(api_key="dg-key", utterances=[sentence])
    backup = DeepgramEmulator(api_key="dg-key", utterances=[sentence])
    await primary.start()
    await backup.start()
    call = session_with(bus, {"deepgram": DeepgramStt("dg-key", base_url=primary.base_url),
                              "backup": DeepgramStt("dg-key", base_url=backup.base_url)})
    ear = await Listening.start(call)
    loud, quiet = b"\x00" * 160, b"\xff" * 160
    try:
        await ear.hear(quiet, 10)
        await ear.hear(loud, 40)
        await ear.until(lambda: call.detector.text.startswith("Book me"))  # interims
        primary.faults.stall = True  # its final never comes
        await ear.hear(loud, 40)
        while call.turn_no == 0 and ear.frames < 400:  # the max wait
            await ear.hear(quiet, 1)
        assert call.turn_no == 1 and call.detector.revisable_started_ms is not None
        stale = call.detector.text
        primary.faults.stall, primary.faults.close_with_error = False, True
        await ear.hear(quiet, 1)
        await ear.until(lambda: call._stt_name == "backup")
        for _ in range(300):
            await ear.hear(quiet, 1)
            await asyncio.sleep(0.002)  # the backup's final, in audio time
        await call._outbox.drain(1)
    finally:
        await ear.close()
        await primary.stop()
        await backup.stop()
    events = await bus.replay_call(CALL, org_id=ORG)
    ended = [(e.turn_id, e.text, e.reason, e.revises) for e in events
             if isinstance(e, TurnUserEnded)]
    assert ended[0][2] == "max_wait" and sentence not in ended[0][1], (stale, ended)
    # (before: that one alone, its late words never heard)
    assert ended[1:] == [("t2", sentence, "utterance_end", "t1")]
    assert [e.text for e in events if isinstance(e, TranscriptFinal)] == [sentence]
