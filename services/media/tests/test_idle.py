"""The idle clock on its own: what counts as silence, and what is due when."""

from __future__ import annotations

from parley.media.idle import IdleClock, IdleSettings


def run(clock: IdleClock, until_ms: int, *, busy: bool = False, start_ms: int = 0
        ) -> list[tuple[int, str]]:
    """Tick every 100 ms from ``start_ms`` to ``until_ms``; what came due, and when."""
    due = []
    for now in range(start_ms, until_ms + 1, 100):
        action = clock.tick(now, busy=busy)
        if action is not None:
            due.append((now, action))
    return due


def test_prompt_then_hang_up_counting_only_silence() -> None:
    clock = IdleClock(IdleSettings(prompt_ms=8000, hangup_ms=30000))
    assert run(clock, 9000) == [(8000, "prompt")]
    # The prompt plays for 2 s: the count pauses, it does not start over.
    assert run(clock, 11000, busy=True, start_ms=9100) == []
    assert run(clock, 40000, start_ms=11100) == [(32000, "hangup")]
    assert run(clock, 46000, start_ms=40100) == []  # once (a hang-up ends the call)


def test_a_reset_starts_the_silence_and_the_prompt_over() -> None:
    clock = IdleClock(IdleSettings(prompt_ms=1000, hangup_ms=3000))
    assert run(clock, 1500) == [(1000, "prompt")]
    clock.reset()
    assert run(clock, 5000, start_ms=1600) == [(2500, "prompt"), (4500, "hangup")]


def test_zero_is_off_and_a_hang_up_due_first_comes_without_the_prompt() -> None:
    assert run(IdleClock(IdleSettings(prompt_ms=0, hangup_ms=0)), 60000) == []
    assert not IdleSettings(prompt_ms=0, hangup_ms=0).enabled
    assert run(IdleClock(IdleSettings(prompt_ms=0, hangup_ms=2000)), 9000) == [(2000, "hangup")]
    assert run(IdleClock(IdleSettings(prompt_ms=2000, hangup_ms=0)), 9000) == [(2000, "prompt")]
    assert run(IdleClock(IdleSettings(prompt_ms=2000, hangup_ms=2000)), 9000) == [
        (2000, "hangup")]


def test_a_hang_up_that_left_the_line_silent_is_asked_for_again() -> None:
    # The gateway timed out on the hang-up (not the caller answering: that resets the clock).
    # The line stays silent: the hang-up is asked for again after each further retry interval,
    # the goodbye's own audio not counted, and never the prompt again.
    clock = IdleClock(IdleSettings(prompt_ms=8000, hangup_ms=30000, hangup_retry_ms=15000))
    assert run(clock, 30000) == [(8000, "prompt"), (30000, "hangup")]
    assert run(clock, 34000, busy=True, start_ms=30100) == []  # the goodbye plays
    assert run(clock, 65000, start_ms=34100) == [(49000, "hangup"), (64000, "hangup")]
    clock.reset()  # the caller spoke after all: a silence of its own, prompt first
    assert run(clock, 100000, start_ms=65100) == [(73000, "prompt"), (95000, "hangup")]
