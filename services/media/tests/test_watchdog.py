import asyncio

import pytest

from parley.media.providers.watchdog import StallWatchdog


class Fired:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.count = 0

    def __call__(self) -> None:
        self.count += 1
        self.event.set()


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
