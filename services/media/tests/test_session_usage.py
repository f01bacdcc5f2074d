"""A call's usage: every session that served it records what it used, however it ended."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import msgspec
import pytest

from parley.common.bus import Bus
from parley.common.configuration.models import AgentSettings
from parley.common.events import UsageRecorded
from parley.media.ownership import Leases, LeaseState
from parley.media.router import ProviderRouter
from parley.media.session import CallSession, SessionServices

ORG, CALL = "acme", "call-1"
SILENCE = b"\xff" * 160  # 20 ms of µ-law


class Stream:
    """A recogniser that hears nothing until closed."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def send(self, ulaw: bytes) -> None:
        pass

    async def finalize(self) -> None:
        pass

    async def events(self):
        await self.closed.wait()
        return
        yield

    async def close(self) -> None:
        self.closed.set()


class Recogniser:
    name = "deepgram"

    async def open(self, *, language: str = "en-US", endpointing_ms: int | None = None):
        return Stream()


class Synthesiser:
    """A synthesiser's stream that takes every clause."""

    async def say(self, text: str, *, last: bool = False) -> None:
        pass


def session(bus: Bus, instance: str, revision: int, *,
            resume: LeaseState | None = None) -> CallSession:
    services = SessionServices(
        bus=bus, leases=Leases(bus, instance), instance=instance,
        stt=ProviderRouter("stt", {"deepgram": Recogniser()}, ["deepgram"]),  # type: ignore[dict-item]
        tts=ProviderRouter("tts", {"never": object()}, ["never"]))  # type: ignore[dict-item]
    return CallSession(services, call_id=CALL, org_id=ORG, agent_id="agent",
                       settings=AgentSettings(), revision=revision, resume=resume)


async def hear(call: CallSession, seconds: float) -> None:
    """The session hears ``seconds`` of the caller (its recogniser is sent them)."""
    if call._stt is None:
        call._stt_name, call._stt = await call.s.stt.open(call._stt_chain, call._open_stt)
    for n in range(round(seconds * 50)):
        await call._inbound_frame(SILENCE, n * 20)


async def serve(call: CallSession, seconds: float, reason: str) -> None:
    """The session hears ``seconds`` of the caller, then ends for ``reason``."""
    await hear(call, seconds)
    call.stop(reason)
    await call._close()


def lease_of(call: CallSession) -> LeaseState:
    """The lease as the session last renewed it (what a successor is given)."""
    return msgspec.json.decode(msgspec.json.encode(call._lease_state()), type=LeaseState)


async def usage(bus: Bus) -> list[tuple[str, str, float]]:
    return [(event.kind, event.provider, event.quantity)
            for event in await bus.replay_call(CALL, org_id=ORG)
            if isinstance(event, UsageRecorded)]


@pytest.mark.parametrize("reason", ["call_ended", "shutdown", "lease_lost", "stt_failed"])
async def test_a_session_records_its_usage_however_it_ends(bus, reason: str) -> None:
    await serve(session(bus, "media-a", 11), 2.0, reason)
    assert await usage(bus) == [("stt_seconds", "deepgram", 2.0)]


async def test_every_session_of_a_call_records_its_own_and_a_repeat_is_dropped(bus) -> None:
    # Handed over on a rolling deploy, then taken back by the same instance (a new claim).
    first = session(bus, "media-a", 11)
    await serve(first, 2.0, "shutdown")
    await serve(session(bus, "media-b", 12), 1.0, "shutdown")
    await serve(session(bus, "media-a", 13), 3.0, "call_ended")
    assert await usage(bus) == [("stt_seconds", "deepgram", 2.0),
                                ("stt_seconds", "deepgram", 1.0),
                                ("stt_seconds", "deepgram", 3.0)]
    await first._record_usage()  # published again (a retry): the same id, dropped
    await first._outbox.drain(1)
    assert len(await usage(bus)) == 3


async def test_audio_replayed_to_a_fallback_recogniser_counts_to_it(bus) -> None:
    # Deepgram's socket breaks mid-turn; the backup hears the open turn again from its pre-roll,
    # then the rest of the call. Each recogniser bills the audio it was sent, the replay
    # included: the session records what each received.
    from parley.devkit.emulators.deepgram import DeepgramEmulator
    from parley.media.providers.deepgram_stt import DeepgramStt

    from .test_session_recognition import session_with

    primary, backup = DeepgramEmulator(api_key="dg-key"), DeepgramEmulator(api_key="dg-key")
    await primary.start()
    await backup.start()
    call = session_with(bus, {"deepgram": DeepgramStt("dg-key", base_url=primary.base_url),
                              "backup": DeepgramStt("dg-key", base_url=backup.base_url)})
    call._stt_name, call._stt = await call.s.stt.open(call._stt_chain, call._open_stt)
    call._stt_task = asyncio.create_task(call._recognise())
    loud = b"\x00" * 160
    try:
        for n in range(50):  # a second of speech: a turn is open
            await call._inbound_frame(loud, n * 20)
        for _ in range(300):  # Deepgram has read it
            if primary.sessions[0].audio_bytes == 8000:
                break
            await asyncio.sleep(0.01)
        primary.faults.close_with_error = True
        for n in range(50, 100):
            await call._inbound_frame(loud, n * 20)
            await asyncio.sleep(0.002)
        assert call._stt_name == "backup"
        for n in range(100, 150):
            await call._inbound_frame(loud, n * 20)
        await call._stt.close()
        await asyncio.gather(call._stt_task, return_exceptions=True)
        await call._record_usage()
        await call._outbox.drain(1)
    finally:
        call._stt_task.cancel()
        await primary.stop()
        await backup.stop()
    billed = {provider: seconds for kind, provider, seconds in await usage(bus)}
    assert billed["backup"] == backup.sessions[0].audio_bytes / 8000 > 1.0
    # Deepgram: the second it read, and what was sent before its socket was seen to be broken.
    assert primary.sessions[0].audio_bytes == 8000 and 1.0 < billed["deepgram"] <= 1.2


async def used_stt_and_tts(call: CallSession) -> None:
    """Two seconds of the caller heard, and a 12-character clause sent to Cartesia."""
    await hear(call, 2.0)
    turn = SimpleNamespace(provider="cartesia", tts_asked_at=0.0)
    await call._say(turn, Synthesiser(), "Hello there.", last=True)  # type: ignore[arg-type]


async def take_over(bus: Bus, lease: LeaseState) -> CallSession:
    """A successor's session from ``lease``, started as run() starts it."""
    successor = session(bus, "media-b", 12, resume=lease)
    await successor._record_predecessor_usage()
    return successor


async def test_a_killed_sessions_usage_is_recorded_by_its_successor_once(bus) -> None:
    # media-a is killed (SIGKILL) mid-call: it stops being fed and never closes. media-b
    # takes the call over from its last renewal and serves the rest of it.
    first = session(bus, "media-a", 11)
    await used_stt_and_tts(first)
    lease = lease_of(first)
    successor = await take_over(bus, lease)
    await serve(successor, 1.0, "call_ended")
    assert sorted(await usage(bus)) == [("stt_seconds", "deepgram", 1.0),
                                        ("stt_seconds", "deepgram", 2.0),
                                        ("tts_characters", "cartesia", 12.0)]
    # Taken over again from the same lease (a second successor, the first one's late
    # retry): the same ids, dropped.
    await (await take_over(bus, lease))._outbox.drain(1)
    assert len(await usage(bus)) == 3


async def test_a_frozen_session_that_ends_after_all_is_not_counted_twice(bus) -> None:
    # media-a freezes (SIGSTOP) past its lease timeout; media-b takes the call over and
    # records media-a's usage as of its last renewal. media-a wakes, hears queued audio
    # before its next renewal is refused, and records its own at its end: the same ids.
    first = session(bus, "media-a", 11)
    await used_stt_and_tts(first)
    successor = await take_over(bus, lease_of(first))
    await successor._outbox.drain(1)
    await hear(first, 0.5)
    first.stop("lease_lost")
    await first._close()
    await serve(successor, 1.0, "call_ended")
    assert sorted(await usage(bus)) == [("stt_seconds", "deepgram", 1.0),
                                        ("stt_seconds", "deepgram", 2.0),
                                        ("tts_characters", "cartesia", 12.0)]


async def test_a_session_handed_over_on_shutdown_has_its_usage_recorded_once(bus) -> None:
    leases = Leases(bus, "media-a")
    revision = await leases.claim(CALL, LeaseState(owner="media-a", org_id=ORG))
    assert revision is not None
    first = session(bus, "media-a", revision)
    await used_stt_and_tts(first)
    first.stop("shutdown")
    await first._close()  # records its usage and hands the lease over
    entry = await (await leases.kv()).get(CALL)
    handed_over = msgspec.json.decode(entry.value or b"", type=LeaseState)
    assert handed_over.owner == ""
    successor = await take_over(bus, handed_over)
    await serve(successor, 1.0, "call_ended")
    assert sorted(await usage(bus)) == [("stt_seconds", "deepgram", 1.0),
                                        ("stt_seconds", "deepgram", 2.0),
                                        ("tts_characters", "cartesia", 12.0)]
