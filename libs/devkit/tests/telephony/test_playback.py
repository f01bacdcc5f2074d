import pytest

from parley.devkit.telephony.playback import (
    AudioStarted,
    AudioStopped,
    Cleared,
    MarkReached,
    Playback,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def seconds(value: float, byte: bytes = b"\x10") -> bytes:
    return byte * round(value * 8000)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_audio_plays_in_real_time_and_a_mark_waits_for_the_audio_before_it(clock) -> None:
    playback = Playback(clock)
    playback.enqueue_audio(seconds(0.5))
    playback.enqueue_mark("first")
    playback.enqueue_audio(seconds(0.25))
    playback.enqueue_mark("second")
    assert playback.poll() == [AudioStarted(0.0)]

    clock.now = 0.49
    assert playback.poll() == [] and playback.playing
    clock.now = 0.5
    assert playback.poll() == [MarkReached(0.5, "first")]
    clock.now = 2.0
    assert playback.poll() == [MarkReached(0.75, "second"), AudioStopped(0.75)]
    assert not playback.playing


def test_a_mark_on_an_idle_line_is_echoed_at_once(clock) -> None:
    playback = Playback(clock)
    clock.now = 3.0
    playback.enqueue_mark("now")
    assert playback.poll() == [MarkReached(3.0, "now")]


def test_audio_arriving_while_playing_queues_behind_and_after_a_gap_starts_at_once(clock) -> None:
    playback = Playback(clock)
    playback.enqueue_audio(seconds(0.2))
    clock.now = 0.1
    playback.enqueue_audio(seconds(0.2, b"\x20"))  # plays 0.2 → 0.4
    assert playback.queued_seconds == pytest.approx(0.3)
    clock.now = 1.0
    playback.enqueue_audio(seconds(0.1, b"\x30"))  # idle since 0.4: starts at once
    clock.now = 2.0
    assert playback.poll() == [AudioStarted(0.0), AudioStopped(0.4), AudioStarted(1.0),
                               AudioStopped(1.1)]
    assert [(start, audio[:1], len(audio)) for start, audio in playback.played()] == [
        (0.0, b"\x10", 1600), (0.2, b"\x20", 1600), (1.0, b"\x30", 800)]


def test_clear_cuts_the_audio_drops_the_queue_and_echoes_pending_marks_at_once(clock) -> None:
    playback = Playback(clock)
    playback.enqueue_audio(seconds(1.0))
    playback.enqueue_mark("a")
    playback.enqueue_audio(seconds(1.0, b"\x20"))
    playback.enqueue_mark("b")
    clock.now = 0.25
    events = playback.clear()
    assert events == [AudioStarted(0.0), Cleared(0.25, pytest.approx(1.75)),
                      MarkReached(0.25, "a", cleared=True), MarkReached(0.25, "b", cleared=True),
                      AudioStopped(0.25)]
    assert [(start, len(audio)) for start, audio in playback.played()] == [(0.0, 2000)]
    clock.now = 5.0
    assert playback.poll() == [] and not playback.playing

    playback.enqueue_audio(seconds(0.1))  # the line is free again: plays at once
    playback.enqueue_mark("c")
    clock.now = 5.1
    assert playback.poll() == [AudioStarted(5.0), MarkReached(5.1, "c"), AudioStopped(5.1)]


def test_clear_on_an_idle_line_only_reports_itself(clock) -> None:
    playback = Playback(clock)
    clock.now = 1.0
    assert playback.clear() == [Cleared(1.0, 0.0)]


def test_played_is_what_was_heard_so_far_and_finish_forgets_the_rest(clock) -> None:
    playback = Playback(clock)
    playback.enqueue_audio(seconds(1.0))
    playback.enqueue_mark("never")
    clock.now = 0.5
    assert [len(audio) for _, audio in playback.played()] == [4000]
    playback.finish()
    clock.now = 3.0
    assert [len(audio) for _, audio in playback.played()] == [4000]
    assert playback.poll() == [AudioStarted(0.0)]
