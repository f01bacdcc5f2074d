"""The media worker: a call it claims or takes over is held from the moment it is won."""

from __future__ import annotations

import asyncio
import time

from parley.common.bus import Bus
from parley.common.configuration.models import AgentSettings
from parley.common.events import CallStreamStarted
from parley.media.ownership import Leases, LeaseState
from parley.media.router import ProviderRouter
from parley.media.session import SessionServices
from parley.media.worker import MediaWorker

ORG = "o1"


class QuietStream:
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


class SlowStt:
    """Opens its stream after ``delay_s`` (a WebSocket handshake and a retry, a TLS stall)."""

    name = "slow"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    async def open(self, *, language: str = "en-US", endpointing_ms: int | None = None):
        await asyncio.sleep(self.delay_s)
        return QuietStream()


class Agents:
    """Agents' settings, after ``delay_s``; the first ``failures`` lookups fail."""

    def __init__(self, *, delay_s: float = 0.0, failures: int = 0) -> None:
        self.delay_s = delay_s
        self.failures = failures
        self.lookups = 0

    async def get(self, org_id: str, agent_id: str) -> AgentSettings:
        self.lookups += 1
        await asyncio.sleep(self.delay_s)
        if self.lookups <= self.failures:
            raise OSError("connection to Postgres lost")
        return AgentSettings()


def worker(bus: Bus, name: str, agents: Agents, *, stt_delay_s: float = 0.0) -> MediaWorker:
    # A lease is renewed every 0.2 s and taken over after 0.3 s of silence (1 s and 1.5 s
    # in production): the same race, five times faster.
    stt = SlowStt(stt_delay_s)
    services = SessionServices(
        bus=bus, leases=Leases(bus, name, renew_s=0.2, timeout_s=0.3, scan_s=0.05),
        instance=name, stt=ProviderRouter("stt", {"slow": stt}, ["slow"]),
        tts=ProviderRouter("tts", {"slow": stt}, ["slow"]))  # type: ignore[dict-item]
    return MediaWorker(services, agents)  # type: ignore[arg-type]


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def serving(call_id: str, *workers: MediaWorker) -> list[str]:
    return [w.s.instance for w in workers if call_id in w.sessions]


async def test_a_claimed_call_is_not_taken_over_while_its_recogniser_opens(
        bus, nats_url) -> None:
    other_bus = await Bus.connect(nats_url, name="b")
    a = worker(bus, "media-a", Agents(delay_s=0.2), stt_delay_s=0.5)
    b = worker(other_bus, "media-b", Agents())
    try:
        await b.s.leases.watch(b._take_over)  # B only watches: the claim is A's
        await a.start()
        await bus.publish(CallStreamStarted(org_id=ORG, call_id="call-1", stream_id="s1",
                                            gateway_instance="g1", agent_id="a1"))
        await wait_for(lambda: serving("call-1", a) == ["media-a"])
        await asyncio.sleep(1.5)
        assert serving("call-1", a, b) == ["media-a"]
        [(session, _)] = a.sessions.values()
        assert not session.stopped.is_set()
    finally:
        await a.stop()
        await b.stop()
        await other_bus.close()


async def test_a_call_taken_over_is_not_taken_again_while_its_session_starts(
        bus, nats_url) -> None:
    other_bus = await Bus.connect(nats_url, name="c")
    agents_b, agents_c = Agents(delay_s=0.5), Agents(delay_s=0.5)
    b = worker(bus, "media-b", agents_b, stt_delay_s=0.5)
    c = worker(other_bus, "media-c", agents_c, stt_delay_s=0.5)
    try:
        # An instance shutting down handed the call over (owner emptied): taken at once.
        departing = Leases(bus, "departing")
        revision = await departing.claim("call-2", LeaseState(owner="departing", org_id=ORG))
        assert revision is not None
        for w in (b, c):
            await w.s.leases.watch(w._take_over)
        await departing.release("call-2", revision,
                                hand_over=LeaseState(owner="departing", org_id=ORG))
        await wait_for(lambda: len(serving("call-2", b, c)) == 1)
        await asyncio.sleep(1.5)
        assert len(serving("call-2", b, c)) == 1
        assert agents_b.lookups + agents_c.lookups == 1  # one take-over, not a bounce
    finally:
        await b.stop()
        await c.stop()
        await other_bus.close()


async def test_a_claim_whose_session_fails_to_start_is_claimed_again(bus) -> None:
    agents = Agents(failures=1)  # e.g. Postgres restarting as the call came in
    a = worker(bus, "media-a", agents)
    try:
        await a.start()
        await bus.publish(CallStreamStarted(org_id=ORG, call_id="call-3", stream_id="s1",
                                            gateway_instance="g1", agent_id="a1"))
        await wait_for(lambda: serving("call-3", a) == ["media-a"])
        assert agents.lookups == 2  # the redelivered event claimed it again
    finally:
        await a.stop()


async def test_a_take_over_that_fails_to_start_is_handed_back(bus) -> None:
    agents = Agents(failures=1)
    b = worker(bus, "media-b", agents)
    try:
        departing = Leases(bus, "departing")
        revision = await departing.claim("call-4", LeaseState(owner="departing", org_id=ORG))
        assert revision is not None
        await b.s.leases.watch(b._take_over)
        await departing.release("call-4", revision,
                                hand_over=LeaseState(owner="departing", org_id=ORG))
        await wait_for(lambda: serving("call-4", b) == ["media-b"])
        assert agents.lookups == 2
    finally:
        await b.stop()
