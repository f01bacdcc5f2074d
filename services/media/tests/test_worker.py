"""The media worker: a call it claims or takes over is held from the moment it is won."""

from __future__ import annotations

import asyncio
import json
import math
import time

from nats.aio.msg import Msg

from parley.common.bus import Bus, command_subject, subscribe_frames
from parley.common.bus.audio import MARK
from parley.common.configuration.models import AgentSettings
from parley.common.events import (
    AgentSay,
    AgentSpeechFinished,
    AgentSpeechProgress,
    CallDtmf,
    CallStreamStarted,
    TurnUserEnded,
)
from parley.media.ownership import Leases, LeaseState
from parley.media.providers.base import TtsChunk
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


class VoiceStream:
    """100 ms of audio per clause at once, its bytes the clause's first letter."""

    def __init__(self) -> None:
        self.chunks: asyncio.Queue[TtsChunk | None] = asyncio.Queue()
        self.clauses = 0

    async def say(self, text: str, *, last: bool = False) -> None:
        if text:
            self.chunks.put_nowait(TtsChunk(text[:1].encode() * 800, [], self.clauses))
        self.clauses += 1
        if last:
            self.chunks.put_nowait(None)

    async def audio(self):
        while (chunk := await self.chunks.get()) is not None:
            yield chunk

    async def cancel(self) -> None:
        self.chunks.put_nowait(None)


class Voice:
    name = "voice"

    async def open(self, *, voice: str = "", language: str = "en-US") -> VoiceStream:
        return VoiceStream()


def worker(bus: Bus, name: str, agents: Agents, *, stt_delay_s: float = 0.0,
           voice: Voice | None = None) -> MediaWorker:
    # A lease is renewed every 0.2 s and taken over after 0.3 s of silence (1 s and 1.5 s
    # in production): the same race, five times faster.
    stt = SlowStt(stt_delay_s)
    tts = {"voice": voice} if voice is not None else {"slow": stt}
    services = SessionServices(
        bus=bus, leases=Leases(bus, name, renew_s=0.2, timeout_s=0.3, scan_s=0.05),
        instance=name, stt=ProviderRouter("stt", {"slow": stt}, ["slow"]),
        tts=ProviderRouter("tts", tts, list(tts)))  # type: ignore[arg-type]
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


async def serve(w: MediaWorker, bus: Bus, call_id: str):
    """``w`` claims ``call_id`` and its session runs (holds the lease, follows the audio)."""
    await w.start()
    await bus.publish(CallStreamStarted(org_id=ORG, call_id=call_id, stream_id="s1",
                                        gateway_instance="g1", agent_id="a1"))
    await wait_for(lambda: serving(call_id, w) == [w.s.instance])
    session, task = w.sessions[call_id]
    await wait_for(lambda: session._inbound is not None)
    return session, task


async def press(bus: Bus, call_id: str, keys: str) -> None:
    """The caller types ``keys``: the gateway's call.dtmf, which the session hears live (or,
    frozen, queued: handled on waking)."""
    for key in keys:
        await bus.publish(CallDtmf(org_id=ORG, call_id=call_id, digit=key))
    await asyncio.sleep(0.1)


def freeze_renewals(w: MediaWorker, call_id: str):
    """The instance stops renewing the call's lease, as a frozen process does (SIGSTOP, a
    starved VM); thawed by setting the returned hold's ``due`` back to 0."""
    held = w.s.leases._held[call_id]
    held.due = math.inf
    return held


async def take_lease(bus: Bus, call_id: str, owner: str) -> None:
    kv = await bus.js.key_value("call_leases")
    current = await kv.get(call_id)
    await kv.update(call_id, b'{"owner":"%s","org_id":"%s"}' % (owner.encode(), ORG.encode()),
                    last=current.revision)


async def key_turns(bus: Bus, call_id: str) -> list[tuple[str, str]]:
    return [(e.turn_id, e.text) for e in await bus.replay_call(call_id, org_id=ORG)
            if isinstance(e, TurnUserEnded)]


async def stored(bus: Bus, call_id: str, turns: list[tuple[str, str]]) -> None:
    """Wait until the call's turns of keys stored are ``turns``."""
    deadline = time.monotonic() + 3
    while (found := await key_turns(bus, call_id)) != turns:
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.05)


async def test_an_instance_that_lost_its_lease_while_frozen_publishes_nothing_on_waking(
        bus) -> None:
    # A chaos run froze an instance past the lease timeout; another took the call over. On
    # waking, the frozen one handled the key presses queued meanwhile and published a phantom
    # turn.user_ended (then speech, transcripts, after call.ended even) before its next
    # renewal was refused: two owners publishing for one call. What it published while its
    # lease was confirmed is stored; nothing after.
    a = worker(bus, "media-a", Agents())
    try:
        session, task = await serve(a, bus, "call-5")
        await press(bus, session.call_id, "1#")
        await stored(bus, session.call_id, [("k1", "1#")])  # published while confirmed
        held = freeze_renewals(a, "call-5")
        await asyncio.sleep(0.4)  # past the lease timeout (0.3 s)
        await take_lease(bus, "call-5", "media-b")
        await press(bus, session.call_id, "2#")  # queued while frozen, handled on waking
        held.due = 0  # awake: the next renewal goes out, and is refused
        await asyncio.wait_for(task, 5)
        assert session.end_reason == "lease_lost"
        assert await key_turns(bus, "call-5") == [("k1", "1#")]
    finally:
        await a.stop()


async def test_what_an_unconfirmed_session_held_goes_out_once_its_lease_is_renewed(
        bus) -> None:
    # Frozen past the timeout, but nobody took the call (no other instance, or a NATS blip):
    # the events wait for the next renewal's answer, and go out when it confirms the lease.
    a = worker(bus, "media-a", Agents())
    try:
        session, _ = await serve(a, bus, "call-6")
        await press(bus, session.call_id, "1#")
        await stored(bus, session.call_id, [("k1", "1#")])  # published while confirmed
        held = freeze_renewals(a, "call-6")
        await asyncio.sleep(0.4)
        await press(bus, session.call_id, "2#")
        await asyncio.sleep(0.2)
        assert await key_turns(bus, "call-6") == [("k1", "1#")]  # held
        held.due = 0  # the next renewal confirms the lease: what was held goes out
        await stored(bus, "call-6", [("k1", "1#"), ("k2", "2#")])
        assert not session.stopped.is_set()
    finally:
        await a.stop()


async def test_a_session_stopped_for_a_lost_lease_drops_what_it_held(bus) -> None:
    # The loss is known (the hold's on_lost) while events are held: they are not drained
    # out on the way out, as the events of a session ending otherwise are.
    a = worker(bus, "media-a", Agents())
    try:
        session, task = await serve(a, bus, "call-7")
        await press(bus, session.call_id, "1#")
        await stored(bus, session.call_id, [("k1", "1#")])
        freeze_renewals(a, "call-7")
        await asyncio.sleep(0.4)
        await take_lease(bus, "call-7", "media-b")
        await press(bus, session.call_id, "2#")
        session._lease_lost()
        await asyncio.wait_for(task, 5)
        assert await key_turns(bus, "call-7") == [("k1", "1#")]
    finally:
        await a.stop()


class Carrier:
    """The call's agent audio as the gateway passes it to the carrier, which plays it at once:
    each mark (with a frame, or asked for by command) is echoed as agent.speech.progress."""

    def __init__(self, bus: Bus, call_id: str) -> None:
        self.bus = bus
        self.call_id = call_id
        self.audio = b""
        self.seqs: list[int] = []
        self.marks: list[str] = []
        self._subs: list = []

    async def start(self) -> Carrier:
        self._subs.append(await subscribe_frames(self.bus.nc, self.call_id, "out", self._frame))
        self._subs.append(await self.bus.nc.subscribe(command_subject(self.call_id, "mark"),
                                                      cb=self._mark_command))
        await self.bus.nc.flush()
        return self

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()

    async def _frame(self, payload: bytes, seq: int, timestamp_ms: int, msg: Msg) -> None:
        self.audio += payload
        self.seqs.append(seq)
        if mark := (msg.headers or {}).get(MARK):
            await self._echo(mark)

    async def _mark_command(self, msg: Msg) -> None:
        await msg.respond(b'{"ok": true}')
        await self._echo(json.loads(msg.data)["name"])

    async def _echo(self, mark: str) -> None:
        self.marks.append(mark)
        turn_id, seq = mark.split(":")
        await self.bus.publish(AgentSpeechProgress(org_id=ORG, call_id=self.call_id,
                                                   turn_id=turn_id, mark=mark, seq=int(seq)))


def agent_says(call_id: str, turn_id: str, seq: int, text: str, *,
               last: bool = False) -> AgentSay:
    return AgentSay(org_id=ORG, call_id=call_id, turn_id=turn_id, seq=seq, text=text, last=last)


async def finished(bus: Bus, call_id: str) -> list[str]:
    return [e.turn_id for e in await bus.replay_call(call_id, org_id=ORG)
            if isinstance(e, AgentSpeechFinished)]


async def test_an_instance_that_lost_its_lease_while_frozen_sends_no_agent_audio_on_waking(
        bus) -> None:
    # Frozen past the lease timeout, an instance lost the call; its successor now plays the
    # agent's audio. On waking, the frozen one voiced the clauses queued meanwhile and sent
    # their audio until its next renewal was refused: the caller heard two agents at once.
    a = worker(bus, "media-a", Agents(), voice=Voice())
    carrier = await Carrier(bus, "call-10").start()
    try:
        session, task = await serve(a, bus, "call-10")
        await bus.publish(agent_says("call-10", "t1", 0, "Alpha.", last=True))
        await wait_for(lambda: carrier.audio == b"A" * 800)  # sent while confirmed
        held = freeze_renewals(a, "call-10")
        await asyncio.sleep(0.4)  # past the lease timeout (0.3 s)
        await take_lease(bus, "call-10", "media-b")
        await bus.publish(agent_says("call-10", "t2", 0, "Bravo.", last=True))  # on waking
        await asyncio.sleep(0.2)
        held.due = 0  # the next renewal goes out, and is refused
        await asyncio.wait_for(task, 5)
        assert session.end_reason == "lease_lost"
        assert carrier.audio == b"A" * 800
    finally:
        await carrier.stop()
        await a.stop()


async def test_agent_audio_paused_while_the_lease_was_unconfirmed_plays_on_once_it_is(
        bus) -> None:
    # Frozen past the timeout, but nobody took the call: the turn's audio waits for the next
    # renewal's answer, then goes on where it stopped (the caller heard a pause, the freeze's).
    a = worker(bus, "media-a", Agents(), voice=Voice())
    carrier = await Carrier(bus, "call-11").start()
    try:
        session, _ = await serve(a, bus, "call-11")
        await bus.publish(agent_says("call-11", "t1", 0, "Alpha."))
        await wait_for(lambda: carrier.audio == b"A" * 800)
        held = freeze_renewals(a, "call-11")
        await asyncio.sleep(0.4)
        await bus.publish(agent_says("call-11", "t1", 1, "Bravo.", last=True))
        await asyncio.sleep(0.2)
        assert carrier.audio == b"A" * 800  # paused
        held.due = 0  # the next renewal confirms the lease
        await wait_for(lambda: carrier.audio == b"A" * 800 + b"B" * 800)
        assert carrier.seqs == sorted(carrier.seqs)  # in order, none twice
        # A mark after the first frame sent again: its echo says when the caller hears the
        # agent again (the pause is not counted as heard); the turn's end is marked and heard.
        assert carrier.marks == ["t1:1", "t1:6", "t1:10"]
        await wait_for_stored(bus, "call-11", ["t1"])
        assert not session.stopped.is_set()
    finally:
        await carrier.stop()
        await a.stop()


async def test_a_turn_whose_end_came_while_the_lease_was_unconfirmed_is_marked_once_it_is(
        bus) -> None:
    # All of the turn's audio went out before the freeze; its end came after: the mark after
    # its last frame, a gateway command, was not sent while unconfirmed, and the turn, its
    # end never echoed, counted as playing for ever once the lease proved ours.
    a = worker(bus, "media-a", Agents(), voice=Voice())
    carrier = await Carrier(bus, "call-12").start()
    try:
        await serve(a, bus, "call-12")
        await bus.publish(agent_says("call-12", "t1", 0, "Alpha."))
        await wait_for(lambda: carrier.audio == b"A" * 800)
        held = freeze_renewals(a, "call-12")
        await asyncio.sleep(0.4)
        await bus.publish(agent_says("call-12", "t1", 1, "", last=True))
        await asyncio.sleep(0.2)
        assert carrier.marks == ["t1:1"]
        held.due = 0
        await wait_for_stored(bus, "call-12", ["t1"])
        assert carrier.marks == ["t1:1", "t1:5"]
    finally:
        await carrier.stop()
        await a.stop()


async def test_a_turn_a_restarted_stream_dropped_while_paused_is_not_marked_heard(bus) -> None:
    # t1's audio all went out before the freeze; its end came after (its last mark paused);
    # then the carrier's stream restarted, and what was queued on the old one never played.
    # Once the lease was confirmed, the paused mark went to the new stream, whose echo said
    # t1 was heard: agent.speech.finished for words the caller never heard (a goodbye the
    # tools service then hung up after).
    a = worker(bus, "media-a", Agents(), voice=Voice())
    carrier = await Carrier(bus, "call-13").start()
    try:
        await serve(a, bus, "call-13")
        await bus.publish(agent_says("call-13", "t1", 0, "Alpha."))
        await wait_for(lambda: carrier.audio == b"A" * 800)
        held = freeze_renewals(a, "call-13")
        await asyncio.sleep(0.4)
        await bus.publish(agent_says("call-13", "t1", 1, "", last=True))
        await bus.publish(CallStreamStarted(org_id=ORG, call_id="call-13", stream_id="s2",
                                            gateway_instance="g1", agent_id="a1"))
        await asyncio.sleep(0.2)
        held.due = 0  # the next renewal confirms the lease
        await asyncio.sleep(0.3)
        await bus.publish(agent_says("call-13", "t2", 0, "Bravo.", last=True))
        await wait_for_stored(bus, "call-13", ["t2"])
        assert carrier.marks == ["t1:1", "t2:1", "t2:5"]
    finally:
        await carrier.stop()
        await a.stop()


async def wait_for_stored(bus: Bus, call_id: str, turns: list[str]) -> None:
    """Wait until the agent turns whose agent.speech.finished is stored are ``turns``."""
    deadline = time.monotonic() + 3
    while (found := await finished(bus, call_id)) != turns:
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.05)


async def test_a_killed_instances_usage_is_recorded_when_its_call_ended_before_the_take_over(
        bus) -> None:
    # media-a is killed mid-call, and the caller hangs up before its lease times out: the
    # instance that takes the lease up finds the call over and starts no session, but records
    # what media-a had used by its last renewal.
    from parley.common.events import CallEnded, UsageRecorded
    from parley.media.ownership import LeaseUsage

    killed = Leases(bus, "media-a")
    used = LeaseUsage(instance="media-a", claim=7, stt_seconds={"deepgram": 12.5},
                      tts_chars={"cartesia": 80})
    assert await killed.claim("call-9", LeaseState(owner="media-a", org_id=ORG,
                                                   usage=used)) is not None
    await bus.publish(CallEnded(org_id=ORG, call_id="call-9", reason="caller_hangup"))
    b = worker(bus, "media-b", Agents())
    try:
        await b.s.leases.watch(b._take_over)
        kv = await killed.kv()

        async def released() -> bool:
            try:
                await kv.get("call-9")
            except Exception:
                return True
            return False

        deadline = time.monotonic() + 5
        while not await released():
            assert time.monotonic() < deadline, "the lease was not released"
            await asyncio.sleep(0.05)
        assert serving("call-9", b) == []
        recorded = sorted((e.kind, e.provider, e.quantity)
                          for e in await bus.replay_call("call-9", org_id=ORG)
                          if isinstance(e, UsageRecorded))
        assert recorded == [("stt_seconds", "deepgram", 12.5), ("tts_characters", "cartesia", 80)]
    finally:
        await b.stop()
