"""Retry with backoff for transient failures, and a circuit breaker for failing dependencies.

Retry what may succeed next time (a dropped connection, a 503); never what cannot (a 4xx, a
constraint violation) — pass ``is_transient`` to tell them apart. The breaker stops a service from
hammering a vendor that is down and lets it fail fast (e.g. switch to a fallback provider).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import tenacity

__all__ = ["CircuitBreaker", "CircuitOpenError", "CircuitState", "retry_policy"]

log = logging.getLogger(__name__)


def retry_policy(
    *,
    attempts: int = 5,
    initial: float = 0.05,
    maximum: float = 2.0,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    is_transient: Callable[[BaseException], bool] | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> tenacity.AsyncRetrying:
    """Return a retrier: up to ``attempts`` tries, exponential backoff plus jitter.

    The wait before retry *n* is ``initial * 2**(n-1)`` plus up to ``initial`` of random jitter,
    capped at ``maximum``. Only exceptions of ``retry_on`` types for which ``is_transient`` (if
    given) returns true are retried; the last exception is re-raised unchanged. ``sleep`` can be
    injected by tests. Use as ``async for attempt in retry_policy(): with attempt: ...``.
    """
    condition: tenacity.retry_base = tenacity.retry_if_exception_type(retry_on)
    if is_transient is not None:
        condition = condition & tenacity.retry_if_exception(is_transient)
    return tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial),
        retry=condition,
        reraise=True,
        before_sleep=tenacity.before_sleep_log(log, logging.WARNING),
        sleep=asyncio.sleep if sleep is None else sleep,
    )


class CircuitState(enum.StrEnum):
    """Where a :class:`CircuitBreaker` is in its cycle."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpenError(RuntimeError):
    """The breaker refused the call; the dependency is presumed down."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"circuit {name!r} is open; retry in {retry_after:.1f}s")
        self.name = name
        self.retry_after = retry_after


class CircuitBreaker:
    """Closed → open after consecutive failures → half-open after a pause → closed or open again.

    In half-open state up to ``half_open_max_calls`` probe calls are let through at a time; the
    first success closes the circuit and any failure opens it for another ``reset_timeout``.
    ``is_failure`` decides which exceptions count (e.g. a 4xx means the vendor is up).
    """

    def __init__(
        self,
        name: str = "",
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 30.0,
        half_open_max_calls: int = 1,
        is_failure: Callable[[Exception], bool] = lambda exc: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or half_open_max_calls < 1:
            raise ValueError("failure_threshold and half_open_max_calls must be at least 1")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.half_open_max_calls = half_open_max_calls
        self.is_failure = is_failure
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self._openings = 0  # how many times it opened: tells a call's outcome is stale

    @property
    def state(self) -> CircuitState:
        """Current state; an open circuit turns half-open once ``reset_timeout`` has passed."""
        if self._state is CircuitState.OPEN and self._remaining() <= 0:
            self._transition(CircuitState.HALF_OPEN)
            self._probes = 0
        return self._state

    def allow(self) -> bool:
        """Whether a call may go ahead now; in half-open state this claims a probe slot."""
        state = self.state
        if state is CircuitState.HALF_OPEN:
            if self._probes >= self.half_open_max_calls:
                return False
            self._probes += 1
            return True
        return state is CircuitState.CLOSED

    def record_success(self) -> None:
        """Record a call that worked: resets the failure count and closes a half-open circuit."""
        state = self.state
        if state is CircuitState.HALF_OPEN:
            self._transition(CircuitState.CLOSED)
        if state is not CircuitState.OPEN:
            self._failures = 0

    def record_failure(self) -> None:
        """Record a failed call: may open the circuit, and always re-opens a half-open one."""
        state = self.state
        if state is CircuitState.HALF_OPEN:
            self._open()
        elif state is CircuitState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open()

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Run the block if allowed (else raise :class:`CircuitOpenError`) and record its outcome.

        Cancellation and exceptions rejected by ``is_failure`` are not held against the
        dependency; a probe then gives its half-open slot back. An outcome counts only if the
        circuit has not opened since the call was let through: a call admitted while closed
        that ends after the circuit opened (a long stream) neither closes the circuit, nor
        re-opens it, nor frees a probe slot it never held.
        """
        if not self.allow():
            raise CircuitOpenError(self.name, max(self._remaining(), 0.0))
        probe = self._state is CircuitState.HALF_OPEN
        opened = self._openings
        try:
            yield
        except Exception as exc:
            if self._openings == opened:
                if self.is_failure(exc):
                    self.record_failure()
                elif probe:
                    self._release_probe()
            raise
        except BaseException:
            if probe and self._openings == opened:
                self._release_probe()
            raise
        if self._openings == opened:
            self.record_success()

    def _open(self) -> None:
        self._openings += 1
        self._transition(CircuitState.OPEN)
        self._opened_at = self._clock()
        self._failures = 0
        self._probes = 0

    def _release_probe(self) -> None:
        if self._state is CircuitState.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def _remaining(self) -> float:
        return self._opened_at + self.reset_timeout - self._clock()

    def _transition(self, new: CircuitState) -> None:
        if new is not self._state:
            log.info("circuit %r %s -> %s", self.name, self._state, new)
            self._state = new
