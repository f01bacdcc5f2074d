import asyncio
import socket
import time

import pytest

from parley.media.providers.watchdog import StallWatchdog


class Fired:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.count = 0

    def __call__(self) -> None:
        self.count += 1
        self.event.set()


def pause(seconds: float) -> None:
    """Stop the event loop, as a paused process (SIGSTOP, a starved VM) stops."""
    time.sleep(seconds)


async def test_fires_once_when_an_expected_answer_never_comes() -> None:
    fired = Fired()
    watchdog = StallWatchdog("test", 0.1, fired)
    loop = asyncio.get_running_loop()
    started = loop.time()
    watchdog.expect()
    await asyncio.wait_for(fired.event.wait(), 5)
    assert loop.time() - started >= 0.1
    assert watchdog.stalled
    assert isinstance(watchdog.error(), Exception) and not watchdog.error().permanent
    await asyncio.sleep(0.15)
    assert fired.count == 1


async def test_nothing_owed_nothing_fires() -> None:
    fired = Fired()
    watchdog = StallWatchdog("test", 0.05, fired)
    watchdog.expect()
    watchdog.feed()
    await asyncio.sleep(0.15)
    assert fired.count == 0 and not watchdog.waiting
    watchdog.stop()


async def test_steady_sends_do_not_hide_a_stall() -> None:
    fired = Fired()
    watchdog = StallWatchdog("test", 0.1, fired)
    for _ in range(20):  # keep sending for 0.2 s with no answer
        watchdog.expect()
        await asyncio.sleep(0.01)
        if fired.count:
            break
    await asyncio.wait_for(fired.event.wait(), 5)
    assert fired.count == 1


async def test_answers_keep_it_quiet_and_more_expected_keeps_watching() -> None:
    fired = Fired()
    watchdog = StallWatchdog("test", 0.1, fired)
    watchdog.expect()
    for _ in range(5):  # progress every 50 ms: alive
        await asyncio.sleep(0.05)
        watchdog.feed(more_expected=True)
    assert fired.count == 0 and watchdog.waiting
    await asyncio.wait_for(fired.event.wait(), 5)  # then silence while still owed
    assert fired.count == 1


async def test_stop_cancels() -> None:
    fired = Fired()
    watchdog = StallWatchdog("test", 0.05, fired)
    watchdog.expect()
    watchdog.stop()
    watchdog.expect()
    await asyncio.sleep(0.12)
    assert fired.count == 0


async def test_rejects_a_non_positive_limit() -> None:
    with pytest.raises(ValueError):
        StallWatchdog("test", 0, lambda: None)


async def test_a_paused_process_does_not_blame_the_provider() -> None:
    """The answer came while the process was paused (SIGSTOP, a starved VM): no stall.

    The provider writes to the socket during the pause; once the loop runs again, its late
    check must not fire before the reader has had a turn to read what is waiting.
    """
    fired = Fired()
    watchdog = StallWatchdog("test", 0.1, fired)
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)

    async def read() -> None:
        while await reader.read(100):
            watchdog.feed()

    reading = asyncio.create_task(read())
    try:
        await asyncio.sleep(0.01)
        watchdog.expect()
        pause(0.05)
        theirs.send(b"answer")  # the provider answers in time, unread while paused
        pause(0.5)
        await asyncio.sleep(0.05)  # the process runs again
        assert fired.count == 0 and not watchdog.waiting
    finally:
        theirs.close()
        await reading
        writer.close()
        await writer.wait_closed()
        watchdog.stop()


async def test_a_stall_across_a_pause_still_fires() -> None:
    """No answer before, during or after the pause: a stall, one window after the process woke."""
    fired = Fired()
    watchdog = StallWatchdog("test", 0.1, fired)
    loop = asyncio.get_running_loop()
    watchdog.expect()
    pause(0.5)
    woke = loop.time()
    await asyncio.wait_for(fired.event.wait(), 5)
    assert 0.1 <= loop.time() - woke < 0.5 and fired.count == 1
