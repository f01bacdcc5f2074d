"""A watchdog for provider sockets that stall without closing.

A vendor WebSocket can go quiet while staying open (a wedged server, a half-dead NAT path): no
error, no close, just no answers, and a call would wait forever for a transcript or for audio.
The stream tells the watchdog when it sent something that must be answered (:meth:`expect`) and
whenever bytes come back (:meth:`feed`); when an answer has been owed for ``stall_after_s``
without any bytes arriving, ``on_stall`` runs once and the stream fails itself with a transient
:class:`~parley.media.providers.base.ProviderError`.

The clock is the event loop's; the check is one ``call_later`` timer, not a task, so there is
nothing to cancel but the timer (:meth:`stop`). A check the loop runs late (the process was
paused or starved) does not judge: what the provider sent meanwhile is still unread, and the
reader runs after the check. That window starts again from the wake-up, once per wait. Before,
a media process paused for 7 s woke up to find every vendor stream "stalled", switched each call
to the local fallback (filling it) and opened the vendor's circuit for its new calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from parley.media.providers.base import ProviderError

LATE_S = 0.25  # a check woken this much after its time: the process was paused, not the provider


class StallWatchdog:
    """Fires ``on_stall`` once when an expected answer is ``stall_after_s`` overdue.

    - :meth:`expect`: something was sent that the provider answers (audio, a request); starts
      the clock unless it is already running, so a steady stream of sends cannot hide a stall.
    - :meth:`feed`: bytes arrived from the provider; stops the clock, or restarts it from now
      when ``more_expected`` (work still owed, e.g. the rest of a TTS clause).
    - :meth:`withdraw`: the sender went quiet; stops the clock.
    """

    def __init__(self, provider: str, stall_after_s: float, on_stall: Callable[[], None]) -> None:
        if stall_after_s <= 0:
            raise ValueError(f"stall_after_s must be positive, got {stall_after_s}")
        self.provider = provider
        self.stall_after_s = stall_after_s
        self._on_stall = on_stall
        self._loop = asyncio.get_running_loop()
        self._waiting_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False
        self._restarted = False  # the wait's window already began again after a late check
        self.stalled = False

    @property
    def waiting(self) -> bool:
        """Whether an answer is currently owed."""
        return self._waiting_since is not None

    def expect(self) -> None:
        """An answer is owed from now on (unless one already was)."""
        if self._stopped or self._waiting_since is not None:
            return
        self._waiting_since = self._loop.time()
        self._restarted = False
        if self._timer is None:
            self._timer = self._loop.call_later(self.stall_after_s, self._check)

    def feed(self, *, more_expected: bool = False) -> None:
        """The provider sent bytes: the socket is alive."""
        if self._stopped:
            return
        self._waiting_since = self._loop.time() if more_expected else None
        self._restarted = False
        if more_expected and self._timer is None:
            self._timer = self._loop.call_later(self.stall_after_s, self._check)

    def withdraw(self) -> None:
        """Nothing is owed any more: the sender went quiet.

        A streaming recogniser may keep the last of what it was sent unanswered until more
        comes; whether it is stalled is unknown until the next :meth:`expect`.
        """
        self._waiting_since = None
        self._restarted = False

    def stop(self) -> None:
        """Stop watching (the stream ended); ``on_stall`` will not run after this."""
        self._stopped = True
        # Let go of the stream (on_stall is usually its bound method): an ended stream is then
        # freed when its turn lets go of it, not left for a full collection of the cycle.
        self._on_stall = _never
        self._waiting_since = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def error(self) -> ProviderError:
        """The transient error a stalled stream raises."""
        return ProviderError(self.provider,
                             f"stalled: no response for {self.stall_after_s:g} s", permanent=False)

    def _check(self) -> None:
        due = self._timer.when() if self._timer is not None else self._loop.time()
        self._timer = None
        if self._stopped or self._waiting_since is None:
            return
        overdue_at = self._waiting_since + self.stall_after_s
        now = self._loop.time()
        if now < overdue_at:
            self._timer = self._loop.call_at(overdue_at, self._check)
            return
        if now - due > LATE_S and not self._restarted:
            self._restarted = True  # once: a loop late every time cannot put a stall off
            self._waiting_since = now
            self._timer = self._loop.call_at(now + self.stall_after_s, self._check)
            return
        self.stalled = True
        on_stall = self._on_stall
        self.stop()
        on_stall()


def _never() -> None:
    """What a stopped watchdog would call: nothing."""
