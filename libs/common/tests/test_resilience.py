from __future__ import annotations

import asyncio

import pytest

from parley.common.resilience import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    retry_policy,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class Flaky:
    """Fails with ``error`` the first ``failures`` times, then returns "ok"."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


# --- retry_policy -------------------------------------------------------------------------------


async def test_retries_until_success_with_growing_jittered_backoff() -> None:
    sleeps, operation = Sleeps(), Flaky(3, ConnectionError("reset"))
    result: str = await retry_policy(attempts=5, initial=0.1, maximum=10.0, sleep=sleeps)(operation)
    assert result == "ok"
    assert operation.calls == 4
    assert len(sleeps.delays) == 3
    for attempt, delay in enumerate(sleeps.delays):
        base = 0.1 * 2**attempt
        assert base <= delay <= base + 0.1


async def test_backoff_is_capped_at_maximum() -> None:
    sleeps = Sleeps()
    with pytest.raises(ConnectionError):
        await retry_policy(attempts=8, initial=1.0, maximum=2.0, sleep=sleeps)(
            Flaky(100, ConnectionError())
        )
    assert len(sleeps.delays) == 7
    assert max(sleeps.delays) <= 2.0


async def test_gives_up_after_attempts_and_reraises_the_original_error() -> None:
    operation = Flaky(10, TimeoutError("slow"))
    with pytest.raises(TimeoutError, match="slow"):
        await retry_policy(attempts=3, sleep=Sleeps())(operation)
    assert operation.calls == 3


async def test_only_retry_on_types_are_retried() -> None:
    operation = Flaky(1, KeyError("bug"))
    with pytest.raises(KeyError):
        await retry_policy(retry_on=(ConnectionError,), sleep=Sleeps())(operation)
    assert operation.calls == 1


async def test_is_transient_decides_what_is_retried() -> None:
    class HttpError(Exception):
        def __init__(self, status: int) -> None:
            self.status = status

    def transient(exc: BaseException) -> bool:
        return isinstance(exc, HttpError) and exc.status >= 500

    permanent = Flaky(1, HttpError(404))
    with pytest.raises(HttpError):
        await retry_policy(is_transient=transient, sleep=Sleeps())(permanent)
    assert permanent.calls == 1

    server_error = Flaky(2, HttpError(503))
    assert await retry_policy(is_transient=transient, sleep=Sleeps())(server_error) == "ok"
    assert server_error.calls == 3


async def test_async_for_form() -> None:
    operation = Flaky(1, ConnectionError())
    result = ""
    async for attempt in retry_policy(sleep=Sleeps()):
        with attempt:
            result = await operation()
    assert result == "ok"


# --- CircuitBreaker -----------------------------------------------------------------------------


def make(clock: FakeClock, half_open_max_calls: int = 1) -> CircuitBreaker:
    return CircuitBreaker(
        "stt",
        failure_threshold=3,
        reset_timeout=10.0,
        half_open_max_calls=half_open_max_calls,
        clock=clock,
    )


def state(breaker: CircuitBreaker) -> CircuitState:
    # A function call, so mypy does not narrow the property across clock changes.
    return breaker.state


def test_closed_until_threshold_consecutive_failures() -> None:
    breaker = make(FakeClock())
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the streak
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) is CircuitState.CLOSED and breaker.allow()
    breaker.record_failure()
    assert state(breaker) is CircuitState.OPEN
    assert not breaker.allow()


def test_open_turns_half_open_after_reset_timeout() -> None:
    clock = FakeClock()
    breaker = make(clock)
    for _ in range(3):
        breaker.record_failure()
    clock.now += 9.9
    assert state(breaker) is CircuitState.OPEN
    clock.now += 0.1
    assert state(breaker) is CircuitState.HALF_OPEN


def test_half_open_limits_probes_and_success_closes() -> None:
    clock = FakeClock()
    breaker = make(clock, half_open_max_calls=2)
    for _ in range(3):
        breaker.record_failure()
    clock.now += 10
    assert breaker.allow() and breaker.allow()
    assert not breaker.allow()
    breaker.record_success()
    assert state(breaker) is CircuitState.CLOSED
    assert breaker.allow()


def test_half_open_failure_reopens_for_another_timeout() -> None:
    clock = FakeClock()
    breaker = make(clock)
    for _ in range(3):
        breaker.record_failure()
    clock.now += 10
    assert breaker.allow()
    breaker.record_failure()
    assert state(breaker) is CircuitState.OPEN
    clock.now += 9
    assert not breaker.allow()
    clock.now += 1
    assert state(breaker) is CircuitState.HALF_OPEN


def test_late_outcomes_while_open_do_not_change_state() -> None:
    clock = FakeClock()
    breaker = make(clock)
    for _ in range(3):
        breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert state(breaker) is CircuitState.OPEN
    clock.now += 10
    assert state(breaker) is CircuitState.HALF_OPEN


def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)


async def test_guard_records_outcomes_and_fails_fast_when_open() -> None:
    clock = FakeClock()
    breaker = make(clock)
    for _ in range(3):
        with pytest.raises(ConnectionError):
            async with breaker.guard():
                raise ConnectionError("vendor down")
    assert state(breaker) is CircuitState.OPEN

    clock.now += 4
    entered = False
    with pytest.raises(CircuitOpenError) as caught:
        async with breaker.guard():
            entered = True
    assert not entered
    assert caught.value.name == "stt"
    assert caught.value.retry_after == pytest.approx(6.0)

    clock.now += 6
    async with breaker.guard():
        pass
    assert state(breaker) is CircuitState.CLOSED


async def test_guard_ignores_errors_that_are_not_failures() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        failure_threshold=1,
        reset_timeout=1.0,
        clock=clock,
        is_failure=lambda exc: not isinstance(exc, ValueError),
    )
    with pytest.raises(ValueError):
        async with breaker.guard():
            raise ValueError("caller's mistake, vendor is fine")
    assert state(breaker) is CircuitState.CLOSED


async def test_cancelled_probe_gives_its_slot_back() -> None:
    clock = FakeClock()
    breaker = make(clock)
    for _ in range(3):
        breaker.record_failure()
    clock.now += 10

    async def probe() -> None:
        async with breaker.guard():
            await asyncio.Event().wait()

    task = asyncio.create_task(probe())
    await asyncio.sleep(0)
    assert not breaker.allow()  # the single probe slot is taken
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state(breaker) is CircuitState.HALF_OPEN
    assert breaker.allow()


async def test_a_call_admitted_while_closed_has_no_say_once_the_circuit_opened() -> None:
    # A long call (an LLM stream) let through while closed ends after the circuit opened and
    # turned half-open: cancelled, it used to give back the probe slot it never held, letting
    # a second probe through; succeeding, it used to close the circuit the probe is testing.
    clock = FakeClock()
    breaker = make(clock)
    finish: list[asyncio.Event] = []

    async def long_call(outcome: str) -> None:
        finish.append(done := asyncio.Event())
        async with breaker.guard():
            await done.wait()
            if outcome == "fails":
                raise ConnectionError("vendor down")

    cancelled = asyncio.create_task(long_call("cancelled"))
    succeeds = asyncio.create_task(long_call("succeeds"))
    fails = asyncio.create_task(long_call("fails"))
    await asyncio.sleep(0)
    for _ in range(3):
        breaker.record_failure()
    clock.now += 10
    assert breaker.allow()  # the one probe
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert not breaker.allow(), "a second concurrent probe was let through"
    finish[1].set()
    await succeeds
    assert state(breaker) is CircuitState.HALF_OPEN  # the probe decides, not a stale success
    finish[2].set()
    with pytest.raises(ConnectionError):
        await fails
    assert state(breaker) is CircuitState.HALF_OPEN and not breaker.allow()
    breaker.record_success()  # the probe's own outcome
    assert state(breaker) is CircuitState.CLOSED
