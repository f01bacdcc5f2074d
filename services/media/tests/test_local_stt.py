"""Local Whisper STT stream: speech start, partials at real-time pace, finals, finalize, close."""

import asyncio
import re
import threading
import time

import numpy as np
import pytest

from parley.media.audio.codec import pcm16_array_to_ulaw
from parley.media.providers.base import (
    Final,
    Partial,
    ProviderBusy,
    ProviderError,
    SpeechStarted,
    UtteranceEnd,
)
from parley.media.providers.local import whisper_stt
from parley.media.providers.local.whisper_stt import WhisperStt, WhisperSttStream, load_model
from parley.media.vad import SegmenterSettings, SpeechSegmenter, WebRtcVad
from services.media.tests.utterances import SILENCE_FRAME, frames, synthesise

FRAME_S = 0.02
SHORT = "Can I reschedule my appointment to Friday afternoon?"
LONG = ("Hi, I would like to book an appointment for next Tuesday morning, and I also want to "
        "ask how much a standard cleaning costs.")


def words_of(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def mostly_heard(text: str, reference: str) -> bool:
    """tiny.en slips on a word now and then (WER is test_wer.py's job): most words are there."""
    expected = set(words_of(reference))
    return len(expected & set(words_of(text))) >= 0.75 * len(expected)


@pytest.fixture(scope="module")
def speech() -> dict[str, list[bytes]]:
    short, long = synthesise([SHORT, LONG])
    return {"short": frames(short), "long": frames(long)}


@pytest.fixture(scope="module")
def stt() -> WhisperStt:
    return WhisperStt()


class Recorder:
    """Reads a stream's events in the background, stamping each with its arrival time."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.events: list[tuple[float, object]] = []
        self.arrived = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.stream.events():
            self.events.append((time.perf_counter(), event))
            self.arrived.set()

    async def wait_for(self, kind: type, count: int = 1, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while sum(isinstance(e, kind) for e in self.kinds()) < count:
                self.arrived.clear()
                await self.arrived.wait()

    def kinds(self) -> list[object]:
        return [event for _, event in self.events]

    async def close(self) -> list[object]:
        await self.stream.close()
        await asyncio.wait_for(self.task, 30)
        return self.kinds()


async def feed(stream, frames_: list[bytes], *, real_time: bool = False) -> None:
    started = time.perf_counter()
    for index, frame in enumerate(frames_):
        await stream.send(frame)
        if real_time:
            await asyncio.sleep(max(0.0, started + (index + 1) * FRAME_S - time.perf_counter()))
        elif index % 50 == 0:
            await asyncio.sleep(0)  # let the reader run; the segmenter is frame-driven


async def test_speech_started_then_final_with_stream_time_words(stt, speech):
    stream = await stt.open()
    recorder = Recorder(stream)
    lead = [SILENCE_FRAME] * 50  # 1 s
    await feed(stream, lead + speech["short"] + [SILENCE_FRAME] * 40)
    await recorder.wait_for(UtteranceEnd)
    events = await recorder.close()
    assert [type(e) for e in events] == [SpeechStarted, Final, UtteranceEnd]
    started, final, end = events
    assert started.at_s == pytest.approx(1.0, abs=0.25)
    assert mostly_heard(final.text, SHORT), final.text
    assert final.speech_final and 0.5 < final.confidence <= 1.0
    # word times count from the stream start, not from the segment start
    speech_end_s = (len(lead) + len(speech["short"])) * FRAME_S
    assert 0.7 <= final.words[0].start <= 1.5
    assert final.words[-1].end <= speech_end_s + 0.3
    assert all(a.start <= b.start for a, b in zip(final.words, final.words[1:], strict=False))
    assert all(w.start <= w.end for w in final.words)
    assert (final.start_s, final.end_s) == (final.words[0].start, final.words[-1].end)
    assert end.last_word_end_s == final.end_s


async def test_partials_while_the_caller_is_still_talking(stt, speech):
    stream = await stt.open()
    recorder = Recorder(stream)
    talk = speech["long"][:100]  # the first 2 s, at real-time pace
    await feed(stream, [SILENCE_FRAME] * 10 + talk, real_time=True)
    stopped_talking = time.perf_counter()
    await stream.finalize()
    await recorder.wait_for(UtteranceEnd)
    stamped = [(t, e) for t, e in recorder.events if isinstance(e, Partial)]
    events = await recorder.close()
    assert isinstance(events[0], SpeechStarted)
    assert isinstance(events[-1], UtteranceEnd)
    assert stamped, f"no partial in 2 s of real-time speech: {events}"
    assert any(t < stopped_talking for t, _ in stamped)  # heard while talking, not after
    final_at = events.index(next(e for e in events if isinstance(e, Final)))
    assert all(events.index(e) < final_at for _, e in stamped)
    assert all(words_of(p.text) for _, p in stamped)
    assert "like" in words_of(next(e for e in events if isinstance(e, Final)).text)


async def test_finalize_closes_the_segment_early(stt, speech):
    stream = await stt.open()
    recorder = Recorder(stream)
    long = speech["long"]
    half = len(long) // 2
    await feed(stream, [SILENCE_FRAME] * 10 + long[:half])
    await stream.finalize()  # the turn detector decided the caller is done
    await recorder.wait_for(UtteranceEnd)
    first = recorder.kinds()
    assert [type(e) for e in first] == [SpeechStarted, Final, UtteranceEnd]
    heard = words_of(first[1].text)
    assert "appointment" in heard
    assert "cleaning" not in heard  # the second half was never sent
    # the caller goes on: a new segment starts
    await feed(stream, long[half:] + [SILENCE_FRAME] * 40)
    await recorder.wait_for(UtteranceEnd, count=2)
    events = await recorder.close()
    assert [type(e) for e in events[3:]] == [SpeechStarted, Final, UtteranceEnd]
    assert "cleaning" in words_of(events[4].text)
    assert events[3].at_s > first[2].last_word_end_s - 0.1


async def test_close_finalises_an_open_segment(stt, speech):
    stream = await stt.open()
    recorder = Recorder(stream)
    await feed(stream, [SILENCE_FRAME] * 10 + speech["short"])  # hang-up mid-utterance
    events = await recorder.close()
    assert [type(e) for e in events] == [SpeechStarted, Final, UtteranceEnd]
    with pytest.raises(RuntimeError):
        await stream.send(SILENCE_FRAME)
    await stream.finalize()  # harmless after close
    await stream.close()  # idempotent


class AlwaysSpeech:
    def is_speech(self, frame: bytes) -> bool:
        return True


async def test_an_empty_segment_yields_only_the_utterance_end():
    stream = WhisperSttStream(await asyncio.to_thread(load_model), vad=AlwaysSpeech(),
                              segmenter=SpeechSegmenter(SegmenterSettings()))
    recorder = Recorder(stream)
    await feed(stream, [SILENCE_FRAME] * 50)  # "speech" that is digital silence
    await stream.finalize()
    events = await recorder.close()
    assert [type(e) for e in events] == [SpeechStarted, UtteranceEnd]
    assert events[1].last_word_end_s == pytest.approx(1.0)


def breathing(seconds: float = 2.0) -> bytes:
    """Hiss swelling and fading like a breath into the handset: webrtcvad calls half speech."""
    t = np.arange(int(8000 * seconds)) / 8000
    hiss = np.convolve(np.random.default_rng(0).normal(0, 1, t.size), np.ones(4) / 4, "same")
    envelope = np.clip(np.sin(2 * np.pi * t / seconds), 0, 1)
    return pcm16_array_to_ulaw((hiss * envelope * 0.1 * 32768).astype(np.int16))


async def test_a_breath_the_vad_took_for_speech_yields_no_words():
    # tiny.en heard "You" in it (no_speech_prob 0.73, avg log prob -0.94: just inside Whisper's
    # own no-speech rule): a turn the caller never said, which the agent answered.
    stream = WhisperSttStream(await asyncio.to_thread(load_model), vad=AlwaysSpeech(),
                              segmenter=SpeechSegmenter(SegmenterSettings()))
    recorder = Recorder(stream)
    await feed(stream, frames(breathing()))
    await stream.finalize()
    events = await recorder.close()
    assert [type(e) for e in events] == [SpeechStarted, UtteranceEnd], events


async def test_silence_yields_nothing_and_odd_chunk_sizes_are_fine(stt):
    stream = await stt.open()
    recorder = Recorder(stream)
    await stream.send(b"\xff" * 7)
    await stream.send(b"\xff" * 1000)
    assert await recorder.close() == []


async def test_english_only(stt):
    with pytest.raises(ProviderError) as error:
        await stt.open(language="de-DE")
    assert error.value.permanent


async def test_a_missing_model_is_a_permanent_error(tmp_path):
    with pytest.raises(ProviderError) as error:
        await WhisperStt(model_dir=tmp_path).open()
    assert error.value.permanent


async def test_the_final_is_decoded_during_the_hangover(speech):
    # A long hangover keeps the segment open; the final's decode starts after a short silence,
    # so when the segment closes the Final is already there.
    stream = WhisperSttStream(await asyncio.to_thread(load_model), vad=WebRtcVad(),
                              segmenter=SpeechSegmenter(SegmenterSettings(hangover_ms=2000)))
    recorder = Recorder(stream)
    await feed(stream, [SILENCE_FRAME] * 10 + speech["short"] + [SILENCE_FRAME] * 25)
    # The segment stays open (0.5 s of silence < 2 s, in audio time) however long the decode
    # takes, so wait for the early decode itself rather than a guess at how long it needs.
    deadline = time.perf_counter() + 60
    while stream._early is None or stream._early.transcript is None:
        assert time.perf_counter() < deadline, "the early final was never decoded"
        await asyncio.sleep(0.05)
    assert not [e for e in recorder.kinds() if isinstance(e, Final | UtteranceEnd)]
    closed = time.perf_counter()
    await stream.finalize()
    await recorder.wait_for(UtteranceEnd)
    arrived = next(t for t, e in recorder.events if isinstance(e, Final))
    events = await recorder.close()
    assert [type(e) for e in events if not isinstance(e, Partial)] == [
        SpeechStarted, Final, UtteranceEnd]
    assert arrived - closed < 0.2  # no decode after the close
    final = next(e for e in events if isinstance(e, Final))
    assert mostly_heard(final.text, SHORT), final.text


async def test_no_more_streams_than_its_limit_and_room_again_once_one_closes():
    # One decoder thread serves every stream: past the limit another call gets ProviderBusy
    # (the router moves on without marking Whisper down) instead of starving the process.
    stt = WhisperStt(max_streams=2)
    first, second = await stt.open(), await stt.open()
    with pytest.raises(ProviderBusy):
        await stt.open()
    assert stt.streams == 2
    await first.close()
    third = await stt.open()
    assert stt.streams == 2
    for stream in (second, third):
        await stream.close()
    assert stt.streams == 0


async def test_a_final_does_not_wait_behind_other_calls_partials(speech):
    # One decoder thread serves every call. In FIFO order a caller who stopped talking waited
    # for the partial of every other caller still talking (~0.7 s each on two cores) before
    # their final, and so their turn's end: up to 5 s with the 8 calls Whisper may take.
    model = await asyncio.to_thread(load_model)
    gate = threading.Event()
    busy = whisper_stt._decoder().submit(gate.wait)  # another call's decode, in progress
    await asyncio.sleep(0.1)
    done = WhisperSttStream(model, vad=WebRtcVad(), segmenter=SpeechSegmenter())
    talking = [WhisperSttStream(model, vad=AlwaysSpeech(), segmenter=SpeechSegmenter())
               for _ in range(2)]
    recorders = [Recorder(stream) for stream in (done, *talking)]
    await feed(done, [SILENCE_FRAME] * 10 + speech["short"])  # its partial waits for the decoder
    for stream in talking:
        await feed(stream, speech["long"][:40])
    await done.finalize()
    await asyncio.sleep(0.1)
    gate.set()
    busy.result()
    await recorders[0].wait_for(UtteranceEnd)
    final_at = next(t for t, e in recorders[0].events if isinstance(e, Final))
    for stream, recorder in zip(talking, recorders[1:], strict=True):
        assert all(t > final_at for t, e in recorder.events if isinstance(e, Partial))
        await feed(stream, speech["long"][40:60])  # they still get partials afterwards
        await recorder.wait_for(Partial)
    for recorder in recorders:
        await recorder.close()


class SpeechExceptAt:
    """Speech on every frame but the ones listed (by index from the stream start)."""

    def __init__(self, pauses: range) -> None:
        self.pauses, self.frame = pauses, -1

    def is_speech(self, frame: bytes) -> bool:
        self.frame += 1
        return self.frame not in self.pauses


async def test_a_monologue_past_20_s_is_cut_at_its_next_pause_not_mid_word():
    # Whisper decodes 30 s windows, so a segment is cut at 25 s; cut wherever the caller was,
    # mid-word, the words at the cut were lost or garbled (measured: "four people at seven
    # thirty" came out as "for 4%." + "people at"; "...at 7.30." + "is their parking", the
    # "tonight" between them gone). Past 20 s the cut is made at the next pause instead.
    pause = int(21 / FRAME_S)
    stream = WhisperSttStream(await asyncio.to_thread(load_model),
                              vad=SpeechExceptAt(range(pause, pause + 3)),
                              segmenter=SpeechSegmenter(SegmenterSettings()),
                              partial_interval_ms=60_000)  # no partials: not the point here
    recorder = Recorder(stream)
    await feed(stream, [SILENCE_FRAME] * int(27 / FRAME_S))
    events = await recorder.close()
    starts = [e.at_s for e in events if isinstance(e, SpeechStarted)]
    assert starts[0] == 0 and 21 <= starts[1] < 21.2, starts
