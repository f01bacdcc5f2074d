"""Voice activity: WebRTC and Silero on telephony audio, and the speech segmenter's edges."""

import numpy as np
import pytest

from parley.media.audio.codec import ulaw_to_pcm16
from parley.media.vad import (
    FRAME_BYTES,
    SegmenterSettings,
    SileroVad,
    SpeechSegmenter,
    SpeechStart,
    SpeechStop,
    WebRtcVad,
)
from services.media.tests.utterances import SILENCE_FRAME, frames, phone_line, synthesise

DIGITAL_SILENCE = ulaw_to_pcm16(SILENCE_FRAME)


@pytest.fixture(scope="module")
def speech_frames() -> list[bytes]:
    """Two Piper sentences as 20 ms PCM16 frames of 8 kHz µ-law through a phone line."""
    texts = ["Hi, I would like to book an appointment for next Tuesday morning.",
             "What time do you open on Saturday?"]
    return [ulaw_to_pcm16(frame) for ulaw in synthesise(texts)
            for frame in frames(phone_line(ulaw))]


DETECTORS = {
    "webrtc": WebRtcVad,
    "silero-16k": SileroVad,
    "silero-8k": lambda: SileroVad(model_rate=8000),
}


@pytest.mark.parametrize("make", DETECTORS.values(), ids=DETECTORS.keys())
def test_digital_silence_is_not_speech(make):
    vad = make()
    assert not any(vad.is_speech(DIGITAL_SILENCE) for _ in range(100))


@pytest.mark.parametrize("make", DETECTORS.values(), ids=DETECTORS.keys())
def test_piper_speech_on_a_phone_line_is_speech(make, speech_frames):
    vad = make()
    decisions = [vad.is_speech(frame) for frame in speech_frames]
    # Synthesised sentences are mostly voiced; the gaps between words are short.
    assert sum(decisions) / len(decisions) >= 0.6


@pytest.mark.parametrize("make", DETECTORS.values(), ids=DETECTORS.keys())
def test_speech_then_silence_goes_quiet_again(make, speech_frames):
    vad = make()
    for frame in speech_frames:
        vad.is_speech(frame)
    after = [vad.is_speech(DIGITAL_SILENCE) for _ in range(25)]
    assert not any(after[10:])  # at most ~200 ms of model memory


@pytest.mark.parametrize("make", DETECTORS.values(), ids=DETECTORS.keys())
def test_frames_must_be_20_ms_of_pcm16(make):
    with pytest.raises(ValueError, match=str(FRAME_BYTES)):
        make().is_speech(b"\x00" * 160)


def test_webrtc_aggressiveness_is_checked():
    with pytest.raises(ValueError):
        WebRtcVad(4)


def test_silero_hysteresis_releases_below_the_threshold():
    vad = SileroVad(threshold=0.6)
    assert vad.threshold == 0.6
    vad.is_speech(DIGITAL_SILENCE)
    assert 0.0 <= vad.last_score < 0.6


# -- the segmenter ----------------------------------------------------------------------------


def feed(segmenter: SpeechSegmenter, pattern: str) -> list[tuple[int, object]]:
    """Push ``pattern`` ('s' speech, '.' silence, one char per frame); the boundaries by frame."""
    return [(index, boundary) for index, char in enumerate(pattern)
            if (boundary := segmenter.push(char == "s")) is not None]


def test_speech_starts_after_start_ms_of_uninterrupted_speech():
    segmenter = SpeechSegmenter(SegmenterSettings(start_ms=100, hangover_ms=300))
    events = feed(segmenter, "...ssss")
    assert events == []  # 80 ms: not yet
    assert not segmenter.speaking
    events = feed(segmenter, "s")
    assert events == [(0, SpeechStart(at_ms=60))]  # reported at the first frame of the run
    assert segmenter.speaking
    assert segmenter.position_ms == 160


def test_an_interrupted_run_starts_over():
    segmenter = SpeechSegmenter(SegmenterSettings(start_ms=100, hangover_ms=300))
    assert feed(segmenter, "ssss.ssss.s") == []
    assert feed(segmenter, "ssss") == [(3, SpeechStart(at_ms=200))]


def test_speech_stops_after_the_hangover_at_the_end_of_the_last_speech_frame():
    segmenter = SpeechSegmenter(SegmenterSettings(start_ms=40, hangover_ms=100))
    events = feed(segmenter, "ss" + "sss" + "...." + "s" + "....")
    # a pause of 4 frames (80 ms) < hangover (100 ms = 5 frames): one segment
    assert events == [(1, SpeechStart(0))]
    assert segmenter.speaking  # still in the hangover
    events = feed(segmenter, ".")
    assert events == [(0, SpeechStop(started_ms=0, at_ms=200))]
    assert not segmenter.speaking


def test_a_new_segment_can_start_after_a_stop():
    segmenter = SpeechSegmenter(SegmenterSettings(start_ms=40, hangover_ms=40))
    events = feed(segmenter, "ss..ss..")
    assert [boundary for _, boundary in events] == [
        SpeechStart(0), SpeechStop(0, 40), SpeechStart(80), SpeechStop(80, 120)]


def test_flush_closes_the_open_segment_and_is_idempotent():
    segmenter = SpeechSegmenter(SegmenterSettings(start_ms=20, hangover_ms=500))
    assert segmenter.flush() is None
    feed(segmenter, ".sss..")
    assert segmenter.flush() == SpeechStop(started_ms=20, at_ms=80)
    assert segmenter.flush() is None
    assert not segmenter.speaking
    # the next segment needs a full qualifying run again
    assert feed(segmenter, "s") == [(0, SpeechStart(120))]


def test_a_flush_between_segments_leaves_a_qualifying_run_alone():
    segmenter = SpeechSegmenter(SegmenterSettings(start_ms=60, hangover_ms=60))
    feed(segmenter, "sss...")  # start, then stop
    feed(segmenter, "ss")  # a run of two, not yet a start
    assert segmenter.flush() is None  # nothing open to close ...
    assert feed(segmenter, "s") == [(0, SpeechStart(120))]  # ... and the run goes on


def test_thresholds_round_up_to_whole_frames_and_never_below_one():
    segmenter = SpeechSegmenter(SegmenterSettings(start_ms=50, hangover_ms=0))
    assert feed(segmenter, "ss") == []
    assert feed(segmenter, "s") == [(0, SpeechStart(0))]  # 50 ms → 3 frames
    assert feed(segmenter, ".") == [(0, SpeechStop(0, 60))]  # 0 ms → 1 frame
    instant = SpeechSegmenter(SegmenterSettings(start_ms=0, hangover_ms=20))
    assert feed(instant, "s") == [(0, SpeechStart(0))]


def test_other_frame_durations():
    segmenter = SpeechSegmenter(SegmenterSettings(start_ms=30, hangover_ms=30), frame_ms=10)
    assert [b for _, b in feed(segmenter, ".sss...")] == [SpeechStart(10), SpeechStop(10, 40)]


# -- a call's segmenter ------------------------------------------------------------------------


@pytest.mark.parametrize(("burst_ms", "started"), [
    (80, False),  # a click or a short "mm"
    (160, True),  # a cough: speech to the VAD (barge-in's pause_ms and words judge it)
    (300, True),  # a word
])
def test_a_calls_segmenter_on_short_bursts(burst_ms, started):
    segmenter = SpeechSegmenter(SegmenterSettings())
    pattern = "." * 5 + "s" * (burst_ms // 20) + "." * 30
    boundaries = [b for _, b in feed(segmenter, pattern)]
    assert any(isinstance(b, SpeechStart) for b in boundaries) is started
    if started:  # and every start is closed by the hangover
        assert isinstance(boundaries[-1], SpeechStop)


def test_segmenter_on_real_speech(speech_frames):
    vad = WebRtcVad()
    segmenter = SpeechSegmenter(SegmenterSettings())
    audio = [DIGITAL_SILENCE] * 25 + speech_frames + [DIGITAL_SILENCE] * 25
    boundaries = [b for frame in audio if (b := segmenter.push(vad.is_speech(frame)))]
    starts = [b for b in boundaries if isinstance(b, SpeechStart)]
    stops = [b for b in boundaries if isinstance(b, SpeechStop)]
    assert len(starts) == len(stops) >= 1
    # Where the voice is: Piper's own lead-in and tail vary from one synthesis to the next.
    loud = [i for i, frame in enumerate(speech_frames)
            if np.sqrt(np.mean(np.frombuffer(frame, np.int16).astype(np.float32) ** 2)) > 1000]
    voice_start_ms, voice_end_ms = (25 + loud[0]) * 20, (25 + loud[-1] + 1) * 20
    assert starts[0].at_ms == pytest.approx(voice_start_ms, abs=150)
    assert voice_end_ms <= stops[-1].at_ms <= voice_end_ms + 300
    assert np.all(np.diff([b.at_ms for b in boundaries]) >= 0)
