"""A call's agent turns: the ones done with are forgotten, but a late clause never restarts one."""

from __future__ import annotations

import asyncio
import datetime
import time

from nats.aio.msg import Msg

from parley.common.bus import Bus, command_subject
from parley.common.bus.audio import stream_seq_base
from parley.common.configuration.models import AgentSettings
from parley.common.events import AgentSay, AgentSpeechInterrupted, Event
from parley.media.router import ProviderRouter
from parley.media.session import CallSession, SessionServices

ORG, CALL = "acme", "call-1"


def session(bus: Bus | None = None) -> CallSession:
    services = SessionServices(
        bus=bus, leases=None,  # type: ignore[arg-type]  # only the last test publishes
        stt=ProviderRouter("stt", {"never": object()}, ["never"]),  # never opened here
        tts=ProviderRouter("tts", {"never": object()}, ["never"]), instance="test")
    return CallSession(services, call_id=CALL, org_id=ORG, agent_id="agent",
                       settings=AgentSettings(prompt="p"), revision=1)


def say(turn_id: str, seq: int = 0, *, last: bool = True) -> AgentSay:
    return AgentSay(org_id=ORG, call_id=CALL, turn_id=turn_id, seq=seq, text="Hello.", last=last)


def voice(call: CallSession, turn_id: str, *, heard: bool) -> None:
    """What the speaker and the carrier's echoes do to a turn, without the audio."""
    turn = call._turns[turn_id]
    call._current = turn
    turn.audio.frames = [b"\xff" * 160] * 10
    turn.audio.text_done = True
    turn.spoken = True
    if heard:
        assert turn.audio.echo(10, 0.0)


async def test_turns_done_with_are_forgotten_as_the_call_goes_on() -> None:
    call = session()
    for n in range(1, 6):
        call._on_say(say(f"t{n}"))
        voice(call, f"t{n}", heard=True)
    call._on_say(say("t6"))
    # The newest turn and the one whose audio was out last are kept; older ones are only ids.
    assert list(call._turns) == ["t5", "t6"]
    assert call._past_turns == {"t1", "t2", "t3", "t4"}


async def test_a_late_clause_of_a_forgotten_turn_is_ignored() -> None:
    call = session()
    call._on_say(say("t1", last=False))
    voice(call, "t1", heard=True)
    call._on_say(say("t2"))
    voice(call, "t2", heard=True)
    call._on_say(say("t3"))
    assert "t1" not in call._turns
    queued = call._speak_queue.qsize()
    call._on_say(say("t1", seq=1))  # redelivered late
    assert "t1" not in call._turns
    assert call._speak_queue.qsize() == queued


async def test_a_turn_still_playing_or_not_yet_voiced_is_kept() -> None:
    call = session()
    call._on_say(say("t1"))
    voice(call, "t1", heard=False)  # sent, the carrier has not echoed its end yet
    call._on_say(say("t2"))  # queued behind it, not voiced
    call._on_say(say("t3"))
    assert list(call._turns) == ["t1", "t2", "t3"]
    call._turns["t1"].interrupted = True
    call._current = call._turns["t2"]
    call._on_say(say("t4"))
    assert list(call._turns) == ["t2", "t3", "t4"]



async def test_a_revised_caller_turn_stops_the_answer_to_the_words_it_revises(bus) -> None:
    # Through the real bus: the events a successor reads, and the gateway's clear command.
    call = session(bus)
    events: list[tuple[str, str, str]] = []
    commands: list[str] = []

    async def on_event(event: Event) -> None:
        if isinstance(event, AgentSpeechInterrupted):
            events.append((event.type, event.turn_id, event.played_text))

    async def on_command(msg: Msg) -> None:
        commands.append(msg.subject.rsplit(".", 1)[-1])
        await msg.respond(b"{}")

    await bus.subscribe_call(CALL, on_event)
    await bus.nc.subscribe(command_subject(CALL, "clear"), cb=on_command)
    await bus.nc.flush()

    async def settled(count: int) -> None:
        for _ in range(100):
            if len(events) >= count:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # nothing more comes

    # Not answered yet: the answer is never spoken, and nothing is cleared (nothing of it plays).
    await call._supersede("t1")
    await settled(1)
    assert events == [("agent.speech.interrupted", "t1", "")] and commands == []
    call._on_say(say("t1"))
    assert "t1" not in call._turns
    # Playing: cut where the carrier is, with the gateway's clear.
    call._on_say(say("t2"))
    voice(call, "t2", heard=False)
    call._turns["t2"].audio.sent = 10
    await call._supersede("t2")
    await settled(2)
    assert events[1][:2] == ("agent.speech.interrupted", "t2") and commands == ["clear"]
    assert call._turns["t2"].interrupted
    # Played to the end: nothing to stop.
    call._on_say(say("t3"))
    voice(call, "t3", heard=True)
    await call._supersede("t3")
    await settled(3)
    assert len(events) == 2 and commands == ["clear"]
    await call._outbox.drain()


async def test_the_lease_resumes_before_the_open_turn_after_a_reconnect() -> None:
    # A reconnect's new stream numbers its audio ms from 0 again: the lease's checkpoint is
    # picked on the session's own audio clock, not by the frames' timestamps.
    call = session()
    start = datetime.datetime.now(datetime.UTC)
    seqs = []
    for n in range(210):  # 100 frames on the first stream, 110 on the next
        stream, number = (0, n) if n < 100 else (1, n - 100)
        seq = stream_seq_base(start + datetime.timedelta(seconds=5 * stream)) + number + 2
        seqs.append(seq)
        await call._on_audio(b"\xff" * 160, seq, number * 20, time.time(), False)
    assert call.audio_ms == 4200
    lease = call._lease_state()
    # the last checkpoint at or before 400 ms ahead of now: frame 150 (3000 ms), not frame 200
    # (whose own timestamp, 2000 ms into its stream, looked old enough)
    assert (lease.resume_seq, lease.resume_ms) == (seqs[150], 3000)
