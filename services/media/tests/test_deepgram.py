import asyncio
from collections import deque
from collections.abc import AsyncIterator
from itertools import pairwise

import numpy as np
import pytest

from parley.devkit.emulators.deepgram import (
    DeepgramEmulator,
    RecognizerSettings,
    Retracted,
    ScriptedRecognizer,
)
from parley.media.audio.codec import pcm16_array_to_ulaw
from parley.media.providers.base import (
    Final,
    Partial,
    ProviderError,
    SpeechStarted,
    SttEvent,
    UtteranceEnd,
)
from parley.media.providers.deepgram_stt import DeepgramStt, DeepgramSttStream, decode_message
from parley.media.router import ProviderRouter

KEY = "dg-test-key"
RATE = 8000
FRAME = 160


def speech(seconds: float, seed: int = 0) -> bytes:
    """Speech-like audio: noise shaped into syllable-rate bursts, ~-20 dBFS."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)  # 4 syllables/s, never silent
    pcm = rng.normal(0, 3000, t.size) * envelope
    return pcm16_array_to_ulaw(np.clip(pcm, -32768, 32767).astype(np.int16))


def silence(seconds: float) -> bytes:
    return pcm16_array_to_ulaw(np.zeros(int(seconds * RATE), dtype=np.int16))


async def send_audio(stream: DeepgramSttStream, audio: bytes) -> None:
    for offset in range(0, len(audio), FRAME):
        await stream.send(audio[offset:offset + FRAME])


class Collector:
    """Reads a stream's events in the background."""

    def __init__(self, stream: DeepgramSttStream) -> None:
        self.events: list[SttEvent] = []
        self.error: BaseException | None = None
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._run(stream))

    async def _run(self, stream: DeepgramSttStream) -> None:
        try:
            async for event in stream.events():
                self.events.append(event)
                self.changed.set()
        except ProviderError as exc:
            self.error = exc
        self.changed.set()

    async def wait_for(self, kind: type, count: int = 1, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while sum(isinstance(e, kind) for e in self.events) < count:
                if self.task.done():
                    raise AssertionError(f"stream ended: {self.events} {self.error!r}")
                self.changed.clear()
                await self.changed.wait()

    def of(self, kind: type) -> list:
        return [event for event in self.events if isinstance(event, kind)]


@pytest.fixture
async def emulator() -> AsyncIterator[DeepgramEmulator]:
    server = DeepgramEmulator(api_key=KEY, utterances=[
        "Hello there, I need help.", "Book a table for two."])
    await server.start()
    yield server
    await server.stop()


def provider(emulator: DeepgramEmulator, **options: float) -> DeepgramStt:
    return DeepgramStt(KEY, base_url=emulator.base_url, **options)  # type: ignore[arg-type]


async def recognised(utterances: list[str | Retracted], audio: bytes, *, until: type) -> Collector:
    """The events of a stream sent ``audio`` up to the first ``until``, on an emulator of its
    own that hears ``utterances`` (stopped after)."""
    server = DeepgramEmulator(api_key=KEY, utterances=utterances)
    await server.start()
    try:
        stream = await provider(server).open()
        collector = Collector(stream)
        await send_audio(stream, audio)
        await collector.wait_for(until)
        await stream.close()
    finally:
        await server.stop()
    return collector


async def test_scripted_utterances_give_partials_finals_and_utterance_ends(
        emulator: DeepgramEmulator) -> None:
    stream = await provider(emulator).open()
    collector = Collector(stream)
    await send_audio(stream, silence(0.5) + speech(1.2) + silence(1.2)
                     + speech(1.0, seed=1) + silence(1.2))
    await collector.wait_for(UtteranceEnd, 2)
    await stream.close()
    await collector.task
    assert collector.error is None

    params = emulator.sessions[0].params
    assert params["encoding"] == "mulaw" and params["sample_rate"] == "8000"
    assert params["interim_results"] == "true" and params["vad_events"] == "true"
    assert params["smart_format"] == "true"
    assert params["endpointing"] == "300" and params["utterance_end_ms"] == "1000"
    assert emulator.sessions[0].close_stream
    assert emulator.sessions[0].extensions == ""  # no permessage-deflate: audio barely shrinks

    kinds = [type(event) for event in collector.events]
    first_end = kinds.index(UtteranceEnd)
    assert kinds[0] is SpeechStarted
    assert Partial in kinds[:first_end] and Final in kinds[:first_end]
    assert kinds.index(Partial) < kinds.index(Final) < first_end

    started = collector.of(SpeechStarted)
    assert started[0].at_s == pytest.approx(0.5, abs=0.05)
    partials = collector.of(Partial)
    assert all("Hello there, I need help.".startswith(p.text) for p in partials[:2])
    finals = collector.of(Final)
    assert [f.text for f in finals] == ["Hello there, I need help.", "Book a table for two."]
    first = finals[0]
    assert first.speech_final and first.confidence > 0.9
    assert [w.text for w in first.words] == ["Hello", "there,", "I", "need", "help."]
    assert first.words[0].start == pytest.approx(0.5, abs=0.05)
    assert first.words[-1].end == pytest.approx(1.7, abs=0.05)
    assert all(a.end <= b.start + 1e-6 for a, b in pairwise(first.words))
    ends = collector.of(UtteranceEnd)
    assert ends[0].last_word_end_s == pytest.approx(first.words[-1].end)


async def test_a_long_utterance_comes_in_several_finals_the_last_speech_final() -> None:
    # Deepgram finalizes a long stretch of speech every few seconds (is_final, speech_final
    # false) and only the piece the endpoint ends has speech_final.
    text = "I would like to book a table for four people on Friday evening at eight please."
    collector = await recognised([text], speech(4.5) + silence(1.5), until=UtteranceEnd)
    finals = [f for f in collector.of(Final) if f.text]  # not the empty ones of the silence
    assert len(finals) >= 2 and finals[-1].speech_final
    assert not any(f.speech_final for f in finals[:-1])
    assert " ".join(f.text for f in finals) == text
    words = [w for f in finals for w in f.words]
    assert all(a.end <= b.start + 1e-6 for a, b in pairwise(words))
    assert collector.of(UtteranceEnd)[0].last_word_end_s == pytest.approx(words[-1].end)


async def test_finalize_at_turn_end_flushes_the_open_utterance(
        emulator: DeepgramEmulator) -> None:
    stream = await provider(emulator).open()
    collector = Collector(stream)
    await send_audio(stream, speech(0.8))  # still talking: no endpoint yet
    await collector.wait_for(Partial)
    assert not collector.of(Final)
    await stream.finalize()
    await collector.wait_for(UtteranceEnd)
    assert [f.text for f in collector.of(Final)] == ["Hello there, I need help."]
    assert emulator.sessions[0].finalizes == 1
    await stream.close()


@pytest.mark.parametrize(("endpointing_ms", "ends"), [(None, False), (200, True)])
async def test_a_stream_can_end_utterances_sooner_than_the_provider_default(
        emulator: DeepgramEmulator, endpointing_ms: int | None, ends: bool) -> None:
    # 250 ms of silence after speech: past a stream's 200 ms endpointing, short of the
    # provider's 300 ms.
    stream = await provider(emulator).open(endpointing_ms=endpointing_ms)
    collector = Collector(stream)
    await send_audio(stream, speech(0.8) + silence(0.25))
    await collector.wait_for(Partial)
    await asyncio.sleep(0.3)  # the emulator answers at once: room for a final to arrive
    finals = collector.of(Final)
    assert [f.speech_final for f in finals] == ([True] if ends else [])
    assert emulator.sessions[0].params["endpointing"] == str(endpointing_ms or 300)
    await stream.close()


async def test_an_interim_the_final_takes_back_ends_in_an_empty_final() -> None:
    # A cough heard as "uh", then retracted: the empty final is what clears the interim.
    collector = await recognised([Retracted("Uh")], speech(0.4) + silence(0.4), until=Final)
    assert collector.of(Partial) == [Partial("Uh")]
    final, = collector.of(Final)
    assert final.text == "" and final.words == [] and final.speech_final
    assert final.start_s == 0.0 and final.end_s == pytest.approx(0.7, abs=0.05)  # + endpointing


async def test_keepalive_is_sent_while_no_audio_flows(emulator: DeepgramEmulator) -> None:
    stream = await provider(emulator, keepalive_after_s=0.1).open()
    await send_audio(stream, silence(0.1))
    await asyncio.sleep(0.8)  # ~7 idle periods: at least two KeepAlives even on a busy machine
    assert emulator.sessions[0].keepalives >= 2
    await stream.close()


@pytest.mark.parametrize(("keepalive_after_s", "survives"), [(0.2, True), (5.0, False)])
async def test_keepalives_hold_a_silent_socket_past_deepgrams_idle_timeout(
        keepalive_after_s: float, survives: bool) -> None:
    # Deepgram closes a socket that gets no audio and no KeepAlive for 10 s (1011 NET-0001):
    # here 0.6 s. Without KeepAlives in time the stream fails (transient), as against Deepgram.
    server = DeepgramEmulator(api_key=KEY, idle_timeout_s=0.6)
    await server.start()
    try:
        stream = await provider(server, keepalive_after_s=keepalive_after_s).open()
        collector = Collector(stream)
        await asyncio.sleep(1.5)
        assert collector.task.done() is not survives
        if survives:
            await send_audio(stream, silence(0.1))
            assert collector.error is None
        else:
            assert isinstance(collector.error, ProviderError)
            assert not collector.error.permanent and "NET-0001" in str(collector.error)
        await stream.close()
    finally:
        await server.stop()


async def test_caller_audio_that_stops_mid_speech_is_no_stall(emulator: DeepgramEmulator) -> None:
    """The caller's audio stopped mid-word (nats-server or the gateway killed, in chaos runs):
    Deepgram keeps the last of the audio it was sent unanswered until more comes (its docs:
    Finalize answers when "a noticeable amount of audio" is buffered), the watchdog took that
    for a stall, and every call switched to the local fallback, opening Deepgram's breaker for
    the calls that came next. Once no audio flows, nothing is owed; it is again once it does."""
    stream = await provider(emulator, keepalive_after_s=0.2, stall_after_s=0.6).open()
    collector = Collector(stream)
    audio = speech(0.5)
    for offset in range(0, len(audio), FRAME):  # in real time, as a call's audio comes
        await stream.send(audio[offset:offset + FRAME])
        await asyncio.sleep(0.02)
    assert collector.of(Partial)
    await asyncio.sleep(1.5)  # no audio: the stream's tail is not answered
    assert collector.error is None and not collector.task.done()
    await send_audio(stream, speech(0.3) + silence(1.0))
    await collector.wait_for(Final)  # the socket was fine all along
    await stream.close()


@pytest.mark.parametrize(("language", "sent"), [
    ("en-US", "en-US"), ("de-DE", "de"), ("fr-FR", "fr"), ("es-MX", "es"), ("pt-BR", "pt-BR"),
    ("fr-ca", "fr-CA"), ("it", "it")])
async def test_the_agent_language_goes_out_as_a_code_deepgram_accepts(
        emulator: DeepgramEmulator, language: str, sent: str) -> None:
    # nova-3 knows "de", "fr", "es" and a few regional codes ("en-US", "pt-BR", "fr-CA"), not
    # "de-DE" or "fr-FR": those were refused with HTTP 400 at the upgrade, permanently, so a
    # German agent never had Deepgram (and the English-only local fallback refused it too).
    stream = await provider(emulator).open(language=language)
    await stream.close()
    assert emulator.sessions[0].params["language"] == sent


async def test_a_language_deepgram_does_not_know_is_a_permanent_error(
        emulator: DeepgramEmulator) -> None:
    with pytest.raises(ProviderError) as caught:
        await provider(emulator).open(language="xx-YY")
    assert caught.value.permanent and "400" in str(caught.value)
    assert not emulator.sessions


async def test_a_wrong_key_is_a_permanent_error(emulator: DeepgramEmulator) -> None:
    with pytest.raises(ProviderError) as caught:
        await DeepgramStt("wrong", base_url=emulator.base_url).open()
    assert caught.value.permanent and "401" in str(caught.value)


# 429: over the account's concurrency limit (a peak of calls), as transient as a 503: taken as
# permanent, the call refused Deepgram for the rest of it (44b94e0).
@pytest.mark.parametrize(("status", "permanent"), [(402, True), (429, False), (503, False)])
async def test_upgrade_refusals_are_classified(emulator: DeepgramEmulator, status: int,
                                                 permanent: bool) -> None:
    emulator.faults.reject_status = status
    with pytest.raises(ProviderError) as caught:
        await provider(emulator).open()
    assert caught.value.permanent is permanent


async def test_connection_refused_is_transient() -> None:
    server = DeepgramEmulator(api_key=KEY)
    url = await server.start()
    await server.stop()
    with pytest.raises(ProviderError) as caught:
        await DeepgramStt(KEY, base_url=url).open()
    assert not caught.value.permanent


async def test_a_stalled_socket_fails_events_within_the_watchdog_time(
        emulator: DeepgramEmulator) -> None:
    stream = await provider(emulator, stall_after_s=0.5).open()
    collector = Collector(stream)
    emulator.faults.stall = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(10):
        while not collector.task.done():
            try:
                await stream.send(silence(0.02))
            except ProviderError as exc:  # the stall can reach a send before the reader ends
                assert "stalled" in str(exc)
            await asyncio.sleep(0.02)
    assert isinstance(collector.error, ProviderError) and not collector.error.permanent
    assert "stalled" in str(collector.error)
    assert 0.45 <= loop.time() - started < 5
    with pytest.raises(ProviderError):
        await stream.send(silence(0.02))
    await stream.close()


async def test_a_socket_closed_with_an_error_fails_events(emulator: DeepgramEmulator) -> None:
    stream = await provider(emulator).open()
    collector = Collector(stream)
    emulator.faults.close_with_error = True
    await stream.send(silence(0.02))
    await asyncio.wait_for(collector.task, 10)
    assert isinstance(collector.error, ProviderError) and not collector.error.permanent
    await stream.close()


async def test_audio_deepgram_cannot_decode_is_a_permanent_error(
        emulator: DeepgramEmulator) -> None:
    # Deepgram closes with 1008 DATA-0000 audio it cannot decode (not audio, or a codec it
    # does not take): fix the encoding and sample rate, its docs say; retrying sends the same
    # audio again. Taken as transient, a misconfigured encoding was retried for ever.
    stream = await provider(emulator).open()
    collector = Collector(stream)
    emulator.faults.undecodable_audio = True
    await stream.send(silence(0.02))
    await asyncio.wait_for(collector.task, 10)
    assert isinstance(collector.error, ProviderError) and collector.error.permanent
    assert "1008" in str(collector.error) and "DATA-0000" in str(collector.error)
    await stream.close()


async def test_a_socket_the_server_closes_cleanly_fails_events(
        emulator: DeepgramEmulator) -> None:
    # Deepgram (or a load balancer) going away closes 1001 with no error: unless we sent
    # CloseStream, the stream is over and events() must say so, or the call goes deaf.
    stream = await provider(emulator).open()
    collector = Collector(stream)
    await stream.send(silence(0.02))
    await emulator.stop()  # closes every socket 1001 GOING_AWAY
    await asyncio.wait_for(collector.task, 10)
    assert isinstance(collector.error, ProviderError) and not collector.error.permanent
    assert "closed by the server: 1001" in str(collector.error)
    await stream.close()


async def test_our_own_close_ends_events_without_an_error(emulator: DeepgramEmulator) -> None:
    stream = await provider(emulator).open()
    collector = Collector(stream)
    await send_audio(stream, silence(0.2))
    await stream.close()
    await asyncio.wait_for(collector.task, 10)
    assert collector.error is None


def test_the_recogniser_hears_audio_alike_frame_by_frame_and_in_chunks() -> None:
    """A carrier's 20 ms frames, fed one at a time (as media sends them), make the messages the
    same audio makes in chunks of any size, frames repeated (the same silence bytes) or not."""
    audio = silence(0.5) + speech(1.2, seed=3) + silence(1.5) + speech(0.8, seed=4) + silence(1.2)
    params = {"encoding": "mulaw", "sample_rate": str(RATE), "interim_results": "true",
              "vad_events": "true", "endpointing": "300", "utterance_end_ms": "1000"}
    script = ["hello there my friend", Retracted("uh"), "bye"]
    heard = []
    for size in (FRAME, 5 * FRAME, 7 * FRAME + 33, len(audio)):
        recognizer = ScriptedRecognizer(params, deque(script), RecognizerSettings())
        recognizer.request_id = "one id"
        messages = [m for offset in range(0, len(audio), size)
                    for m in recognizer.audio(audio[offset:offset + size])]
        heard.append(messages + recognizer.close()[:-1])  # Metadata: its own id and time
    assert any(m["type"] == "SpeechStarted" for m in heard[0])
    assert heard[0] == heard[1] == heard[2] == heard[3]


def test_server_messages_decode_to_events_and_an_error_message_fails_the_stream(caplog) -> None:
    interim = ('{"type":"Results","channel_index":[0,1],"duration":0.6,"start":0.0,'
               '"is_final":false,"speech_final":false,"channel":{"alternatives":[{"transcript":'
               '"book a","confidence":0.99,"words":[{"word":"book","start":0.1,"end":0.3,'
               '"confidence":0.99,"punctuated_word":"Book"}]}]},"metadata":{"request_id":"r"}}')
    assert decode_message(interim) == Partial("book a")
    final = interim.replace('"is_final":false', '"is_final":true').replace(
        '"speech_final":false', '"speech_final":true')
    event = decode_message(final)
    assert isinstance(event, Final) and event.speech_final and event.words[0].text == "Book"
    assert decode_message('{"type":"SpeechStarted","channel":[0],"timestamp":1.25}') == \
        SpeechStarted(1.25)
    assert decode_message('{"type":"UtteranceEnd","channel":[0,1],"last_word_end":2.5}') == \
        UtteranceEnd(2.5)
    with pytest.raises(ProviderError, match="SchemaError: could not parse"):
        decode_message('{"type":"Error","variant":"SchemaError",'
                       '"description":"could not parse","message":"{"}')
    # An empty interim says nothing; an empty final takes back the interim before it.
    assert decode_message(interim.replace('"book a"', '""')) is None
    assert decode_message(final.replace('"book a"', '""').replace(
        '"words":[{"word":"book","start":0.1,"end":0.3,"confidence":0.99,'
        '"punctuated_word":"Book"}]', '"words":[]')) == Final(
        "", [], confidence=0.99, start_s=0.0, end_s=0.6, speech_final=True)
    assert decode_message('{"type":"Metadata","request_id":"r","duration":3.0}') is None
    assert not caplog.records  # Metadata is expected: nothing to warn about
    assert decode_message('{"type":"SomethingNew","x":1}') is None
    assert decode_message(b"not json") is None
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert "SomethingNew" in caplog.records[0].getMessage()


class Backup:
    """A fallback recogniser that always opens (the local one, in production)."""

    name = "backup"

    async def open(self, *, language: str = "en-US", endpointing_ms: int | None = None) -> str:
        return "backup-stream"


@pytest.mark.parametrize(("language", "reject_status", "stays_available"), [
    ("xx-YY", None, True),  # a language nova-3 has no model for: Deepgram answered, 400
    ("en-US", 503, False),  # an outage
    ("en-US", 401, False),  # the account's key: every call would be refused the same
])
async def test_only_failures_of_deepgram_itself_count_against_its_health(
        emulator: DeepgramEmulator, language: str, reject_status: int | None,
        stays_available: bool) -> None:
    # A burst of calls in a language nova-3 lacks: each is refused (HTTP 400 at the upgrade,
    # since a68a2ca), rightly for that call, but each refusal counted against Deepgram's shared
    # breaker, which opened after three: every other call (English ones Deepgram serves fine)
    # went to the fallback for the next 30 s. A refusal of the call's own request leaves the
    # provider's health alone; an outage or a bad key still opens the breaker.
    stt = ProviderRouter("stt", {"deepgram": provider(emulator), "backup": Backup()},
                         ["deepgram", "backup"], retry_initial_s=0.001)
    emulator.faults.reject_status = reject_status
    for _ in range(5):
        refused: set[str] = set()
        name, _ = await stt.open(stt.chain(), lambda p: p.open(language=language),
                                 refused=refused)
        assert name == "backup"
    assert stt.health["deepgram"].available is stays_available
    emulator.faults.reject_status = None
    name, stream = await stt.open(stt.chain(), lambda p: p.open(language="en-US"))
    assert name == ("deepgram" if stays_available else "backup")
    if name == "deepgram":
        await stream.close()  # type: ignore[union-attr]
