import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from parley.devkit.emulators.cartesia import CartesiaEmulator, Voice
from parley.media.audio.codec import ulaw_to_pcm16_array
from parley.media.providers.base import ProviderError, TtsChunk
from parley.media.providers.cartesia_tts import (
    CartesiaTts,
    CartesiaTtsStream,
    Chunk,
    Error,
    Timestamps,
    decode_message,
)

KEY = "cartesia-test-key"
VOICE = Voice(seconds_per_character=0.06, gap_s=0.04, chunk_s=0.1, speed=20.0)


def expected_seconds(text: str) -> float:
    return sum(len(word) * VOICE.seconds_per_character + VOICE.gap_s for word in text.split())


@pytest.fixture
async def emulator() -> AsyncIterator[CartesiaEmulator]:
    server = CartesiaEmulator(api_key=KEY, voice=VOICE)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def tts(emulator: CartesiaEmulator) -> AsyncIterator[CartesiaTts]:
    provider = CartesiaTts(KEY, base_url=emulator.base_url, stall_after_s=1.0)
    yield provider
    await provider.close()


async def collect(stream: CartesiaTtsStream, timeout: float = 10.0) -> list[TtsChunk]:
    async with asyncio.timeout(timeout):
        return [chunk async for chunk in stream.audio()]


async def test_two_clauses_in_one_context(emulator: CartesiaEmulator, tts: CartesiaTts) -> None:
    stream = await tts.open()
    first, second = "Hello there caller.", "How can I help?"
    await stream.say(first)
    await stream.say(second, last=True)
    chunks = await collect(stream)

    requests = [r for r in emulator.sessions[0].requests if not r.get("flush")]
    assert [r["transcript"] for r in requests] == [first, second]
    assert [r["continue"] for r in requests] == [True, False]
    assert len({r["context_id"] for r in requests}) == 1
    assert requests[0]["output_format"] == {"container": "raw", "encoding": "pcm_mulaw",
                                            "sample_rate": 8000}
    assert all(r["add_timestamps"] for r in requests)
    assert emulator.sessions[0].version  # the SDK's cartesia-version header
    assert emulator.sessions[0].extensions == ""  # no permessage-deflate: audio barely shrinks

    audio = {clause: b"".join(c.audio for c in chunks if c.clause == clause) for clause in (0, 1)}
    assert len(audio[0]) == pytest.approx(expected_seconds(first) * 8000, abs=8)
    assert len(audio[1]) == pytest.approx(expected_seconds(second) * 8000, abs=8)
    clauses = [c.clause for c in chunks]
    assert clauses == sorted(clauses)
    pcm = ulaw_to_pcm16_array(audio[0])  # µ-law of a 0.3 FS tone: really audio, not silence
    assert 5000 < np.abs(pcm).max() < 12000

    words = {clause: [w for c in chunks if c.clause == clause for w in c.words]
             for clause in (0, 1)}
    assert [w.text for w in words[0]] == first.split()
    assert [w.text for w in words[1]] == second.split()
    assert words[1][0].start == pytest.approx(0.0, abs=1e-6)  # relative to the clause
    assert words[0][1].start == pytest.approx(len("Hello") * 0.06 + 0.04, abs=1e-3)
    assert all(w.end > w.start for w in words[0] + words[1])


async def say_in_one_turn(tts: CartesiaTts, clauses: list[str]) -> list[TtsChunk]:
    """The chunks of one turn (one stream) that says ``clauses``, the last one last."""
    stream = await tts.open()
    for number, text in enumerate(clauses):
        await stream.say(text, last=number == len(clauses) - 1)
    return await collect(stream)


def clause_words(chunks: list[TtsChunk], clauses: int) -> dict[int, list]:
    return {clause: [w for c in chunks if c.clause == clause for w in c.words]
            for clause in range(clauses)}


async def test_clauses_are_flushed_as_cartesia_documents_and_keep_their_audio(
        emulator: CartesiaEmulator, tts: CartesiaTts) -> None:
    # Cartesia documents a flush only as a request of its own (empty transcript, continue
    # true, same context); we sent flush on the clause's own request, a form its docs never
    # describe, while mapping audio and timestamps to clauses by the flush number.
    clauses = ["Hello there caller.", "Your table is booked.", "Anything else?"]
    chunks = await say_in_one_turn(tts, clauses)

    session = emulator.sessions[0]
    assert session.undocumented == []
    shape = [(r["transcript"], r["continue"], r.get("flush", False)) for r in session.requests]
    assert shape == [(clauses[0], True, False), ("", True, True),
                     (clauses[1], True, False), ("", True, True),
                     (clauses[2], False, False)]
    assert len({r["context_id"] for r in session.requests}) == 1
    assert all(r["model_id"] == "sonic-3" and r["add_timestamps"] for r in session.requests)

    for clause, text in enumerate(clauses):
        audio = b"".join(c.audio for c in chunks if c.clause == clause)
        assert len(audio) == pytest.approx(expected_seconds(text) * 8000, abs=8), clause
    words = clause_words(chunks, len(clauses))
    for clause, text in enumerate(clauses):
        assert [w.text for w in words[clause]] == text.split()
        first = text.split()[0]
        assert words[clause][0].start == pytest.approx(0.0, abs=1e-3)
        assert words[clause][1].start == pytest.approx(len(first) * 0.06 + 0.04, abs=1e-3)


async def test_word_timestamps_that_restart_at_each_flush_stay_relative_to_their_clause(
        emulator: CartesiaEmulator, tts: CartesiaTts) -> None:
    # Cartesia's docs do not say whether timestamps after a flush count from the context's
    # start or from the flush. Counted from the flush, every word after the first clause was
    # taken as before its clause's audio and pinned to 0.0.
    emulator.timestamps_restart_at_flush = True
    clauses = ["Hello there caller.", "Your table is booked.", "Anything else?"]
    chunks = await say_in_one_turn(tts, clauses)

    words = clause_words(chunks, len(clauses))
    for clause, text in enumerate(clauses):
        assert [w.text for w in words[clause]] == text.split()
        expected, at = [], 0.0
        for word in text.split():
            expected.append(pytest.approx(at, abs=1e-3))
            at += len(word) * 0.06 + 0.04
        assert [w.start for w in words[clause]] == expected, clause


async def test_turns_share_the_socket_with_separate_contexts(
        emulator: CartesiaEmulator, tts: CartesiaTts) -> None:
    for text in ("One.", "Two."):
        stream = await tts.open()
        await stream.say(text, last=True)
        assert b"".join(c.audio for c in await collect(stream))
    assert len(emulator.sessions) == 1
    assert len({r["context_id"] for r in emulator.sessions[0].requests}) == 2


async def test_cancel_ends_audio_promptly(emulator: CartesiaEmulator) -> None:
    slow = CartesiaEmulator(api_key=KEY, voice=Voice(speed=1.0))  # real-time: ~6 s of speech
    await slow.start()
    tts = CartesiaTts(KEY, base_url=slow.base_url)
    try:
        stream = await tts.open()
        await stream.say("This is a rather long sentence that would take a while to say. " * 3,
                         last=True)
        received: list[TtsChunk] = []
        sounding = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def consume() -> None:
            async for chunk in stream.audio():
                received.append(chunk)
                if chunk.audio:
                    sounding.set()

        consumer = asyncio.create_task(consume())
        await asyncio.wait_for(sounding.wait(), 5)
        cancelled_at = loop.time()
        await stream.cancel()
        await asyncio.wait_for(consumer, 1.0)
        assert loop.time() - cancelled_at < 0.5
        assert slow.sessions[0].cancels == [stream.context_id]
        await stream.say("ignored after cancel")
    finally:
        await tts.close()
        await slow.stop()


@pytest.mark.parametrize("language", ["en-US", "it-IT", "nl-NL", "hi-IN", "ar-SA"])
async def test_the_default_model_speaks_the_languages_cartesia_still_serves(
        emulator: CartesiaEmulator, tts: CartesiaTts, language: str) -> None:
    # On 2026-06-01 Cartesia sunset sonic-2 for it, nl, pl, ru, sv, tr and hi (it never had
    # ar): with it as the default, an Italian agent's every turn was a "model_sunsetted" error.
    stream = await tts.open(language=language)
    await stream.say("Ciao.", last=True)
    assert b"".join(c.audio for c in await collect(stream))
    assert emulator.sessions[0].requests[0]["model_id"] == "sonic-3"


async def test_a_sunset_model_is_a_permanent_error(emulator: CartesiaEmulator) -> None:
    tts = CartesiaTts(KEY, base_url=emulator.base_url, model_id="sonic-2")
    try:
        stream = await tts.open(language="it-IT")
        await stream.say("Ciao.", last=True)
        with pytest.raises(ProviderError, match="sunsetted") as caught:
            await collect(stream)
        assert caught.value.permanent
        stream = await tts.open(language="de-DE")  # sonic-2 still speaks German
        await stream.say("Hallo.", last=True)
        assert await collect(stream)
    finally:
        await tts.close()


async def test_a_wrong_key_is_a_permanent_error(emulator: CartesiaEmulator) -> None:
    tts = CartesiaTts("wrong", base_url=emulator.base_url)
    try:
        with pytest.raises(ProviderError) as caught:
            await tts.open()
        assert caught.value.permanent and "401" in str(caught.value)
    finally:
        await tts.close()


async def test_server_errors_are_classified(emulator: CartesiaEmulator, tts: CartesiaTts) -> None:
    emulator.faults.error_status = 500
    stream = await tts.open()
    await stream.say("Hi.", last=True)
    with pytest.raises(ProviderError) as caught:
        await collect(stream)
    assert not caught.value.permanent
    emulator.faults.reject_status = 503  # the socket is still up: a new turn works
    stream = await tts.open()
    await stream.say("Hi.", last=True)
    assert await collect(stream)


async def test_an_error_that_names_no_context_fails_the_turns_awaiting_audio_at_once(
        emulator: CartesiaEmulator) -> None:
    # Cartesia's WebSocket error event carries context_id only "when available". One without it
    # was dropped: the turn waiting for audio heard nothing until the stall watchdog (3 s)
    # failed it, and took every other turn on the shared socket down with it.
    tts = CartesiaTts(KEY, base_url=emulator.base_url, stall_after_s=5.0)
    try:
        between_clauses = await tts.open()  # sent nothing yet: owed nothing
        waiting = await tts.open()
        emulator.faults.error_status = 429
        emulator.faults.error_without_context = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        await waiting.say("Hello?", last=True)
        with pytest.raises(ProviderError, match="429") as caught:
            await collect(waiting)
        assert loop.time() - started < 2.0 and "stalled" not in str(caught.value)
        await between_clauses.say("Still here.", last=True)  # unaffected
        assert b"".join(c.audio for c in await collect(between_clauses))
    finally:
        await tts.close()


async def test_a_stalled_context_fails_within_the_watchdog_time(
        emulator: CartesiaEmulator, tts: CartesiaTts) -> None:
    stream = await tts.open()
    emulator.faults.stall = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    await stream.say("Anyone there?", last=True)
    with pytest.raises(ProviderError) as caught:
        await collect(stream)
    assert "stalled" in str(caught.value) and not caught.value.permanent
    assert 0.9 <= loop.time() - started < 5
    emulator.faults.stall = False  # the wedged socket is dropped: the next turn reconnects
    stream = await tts.open()
    await stream.say("Hello?", last=True)
    assert await collect(stream)
    assert len(emulator.sessions) == 2


async def test_a_socket_cartesia_closes_for_idling_is_reopened_for_the_next_turn() -> None:
    # Cartesia closes a WebSocket with no generation for 5 minutes (here 0.3 s): the shared
    # socket is gone between calls, and the next turn must open a new one, not fail.
    server = CartesiaEmulator(api_key=KEY, voice=VOICE, idle_timeout_s=0.3)
    await server.start()
    tts = CartesiaTts(KEY, base_url=server.base_url)
    try:
        for text in ("Good morning.", "Anything else?"):
            stream = await tts.open()
            await stream.say(text, last=True)
            assert b"".join(c.audio for c in await collect(stream))
            await asyncio.sleep(0.8)
        assert len(server.sessions) == 2
        assert server.sessions[0].idle_closed
    finally:
        await tts.close()
        await server.stop()


async def test_a_dropped_socket_fails_the_turn(emulator: CartesiaEmulator,
                                               tts: CartesiaTts) -> None:
    stream = await tts.open()
    await emulator.stop()
    with pytest.raises(ProviderError) as caught:
        await collect(stream)
    assert not caught.value.permanent


def test_server_messages_decode_and_unknown_ones_are_logged_and_skipped(caplog) -> None:
    chunk = decode_message(b'{"type":"chunk","context_id":"c1","data":"f38=","done":false,'
                           b'"status_code":206,"step_time":1.0,"flush_id":2}')
    assert chunk == Chunk(context_id="c1", data="f38=", flush_id=2)
    stamps = decode_message('{"type":"timestamps","context_id":"c1","done":false,'
                            '"status_code":206,"word_timestamps":{"words":["hi"],"start":[0.0],'
                            '"end":[0.2]}}')
    assert isinstance(stamps, Timestamps) and stamps.word_timestamps is not None
    assert stamps.word_timestamps.words == ["hi"] and stamps.flush_id is None
    error = decode_message('{"type":"error","done":true,"status_code":400,"title":"Bad voice",'
                           '"message":"no such voice"}')
    assert isinstance(error, Error) and error.context_id is None and error.status_code == 400
    assert not caplog.records
    assert decode_message('{"type":"phoneme_timestamps","context_id":"c1"}') is None
    assert decode_message("{") is None
    assert len(caplog.records) == 2 and "phoneme_timestamps" in caplog.records[0].getMessage()
