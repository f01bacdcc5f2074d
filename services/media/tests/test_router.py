"""The provider router: fallback in chain order, health, and providers with no room."""

import pytest

from parley.media.providers.base import ProviderBusy, ProviderError
from parley.media.router import AllProvidersFailed, ProviderRouter


class Opener:
    """Opens "streams" by provider name, failing as told."""

    def __init__(self, **outcomes: str) -> None:
        self.outcomes = outcomes  # name → "ok" | "busy" | "down"
        self.tried: list[str] = []

    async def __call__(self, name: str) -> str:
        self.tried.append(name)
        outcome = self.outcomes.get(name, "ok")
        if outcome == "busy":
            raise ProviderBusy(name, "at capacity")
        if outcome == "down":
            raise ProviderError(name, "HTTP 401", permanent=True)
        return f"stream:{name}"


def router() -> ProviderRouter[str]:
    return ProviderRouter("stt", {"deepgram": "deepgram", "whisper": "whisper",
                                  "backup": "backup"}, ["deepgram", "whisper", "backup"],
                          retry_initial_s=0.001)


async def test_a_full_provider_is_passed_over_without_being_marked_down() -> None:
    stt = router()
    opener = Opener(whisper="busy")
    for _ in range(5):  # more than the breaker's failure threshold
        assert await stt.open(stt.chain(), opener, after="deepgram") == ("backup",
                                                                         "stream:backup")
    assert opener.tried == ["whisper", "backup"] * 5
    assert stt.health["whisper"].available and stt.health["whisper"].error_rate == 0.0


async def test_a_failing_provider_is_marked_down_and_skipped_once_its_breaker_opens() -> None:
    stt = router()
    opener = Opener(whisper="down")
    for _ in range(3):
        await stt.open(stt.chain(), opener, after="deepgram")
    assert not stt.health["whisper"].available
    opener.tried.clear()
    assert await stt.open(stt.chain(), opener, after="deepgram") == ("backup", "stream:backup")
    assert opener.tried == ["backup"]


async def test_nothing_with_room_after_the_failed_one_is_an_error_naming_the_cause() -> None:
    stt = router()
    with pytest.raises(AllProvidersFailed, match="at capacity"):
        await stt.open(["deepgram", "whisper"], Opener(whisper="busy"), after="deepgram")
    # … and the whole chain again (what a session does next) reopens the first one
    assert await stt.open(["deepgram", "whisper"], Opener(whisper="busy")) == (
        "deepgram", "stream:deepgram")


async def test_a_provider_whose_breaker_is_open_is_still_tried_when_nothing_else_opens() -> None:
    stt = router()
    for _ in range(3):
        stt.health["deepgram"].failure()
    assert not stt.health["deepgram"].available
    opener = Opener(whisper="busy")
    assert await stt.open(["deepgram", "whisper"], opener) == ("deepgram", "stream:deepgram")
    assert opener.tried == ["whisper", "deepgram"]  # the healthy one first, then the probe


async def test_a_provider_whose_streams_open_and_then_fail_opens_its_breaker() -> None:
    # The socket opens every time, then the stream stalls or breaks (what a session reports):
    # counting the open as a success reset the breaker, so every new call paid the stall.
    stt = router()
    for _ in range(3):
        assert await stt.open(stt.chain(), Opener()) == ("deepgram", "stream:deepgram")
        stt.health["deepgram"].failure()
    assert not stt.health["deepgram"].available
    assert await stt.open(stt.chain(), Opener()) == ("whisper", "stream:whisper")


async def test_a_stream_that_delivers_resets_the_failures_before_it() -> None:
    stt = router()
    for _ in range(2):
        await stt.open(stt.chain(), Opener())
        stt.health["deepgram"].failure()
    await stt.open(stt.chain(), Opener())
    stt.health["deepgram"].success()  # its first result came
    for _ in range(2):
        await stt.open(stt.chain(), Opener())
        stt.health["deepgram"].failure()
    assert stt.health["deepgram"].available
