"""A silent caller: media asks for a prompt, then for the hang-up, only while nothing is pending.

The session is driven by its inbound audio (the audio clock), as live: 20 ms frames of silence
or of noise the VAD takes for speech, the agent's turns synthesised by a stand-in synthesiser
and played when the carrier's echo of their last mark comes back. What it emits is read back
from the EVENTS stream.
"""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import numpy as np

from parley.common.bus import Bus, command_subject
from parley.common.configuration.models import AgentSettings
from parley.common.events import (
    AgentSay,
    AgentSpeechFinished,
    AgentSpeechInterrupted,
    AgentSpeechProgress,
    CallDtmf,
    CallerIdle,
    CallStreamStarted,
    ToolFailed,
    ToolRequested,
    TurnCompleted,
)
from parley.media.audio.codec import pcm16_array_to_ulaw
from parley.media.playback import mark_seq
from parley.media.providers.base import TtsChunk
from parley.media.router import ProviderRouter
from parley.media.session import CallSession, SessionServices
from parley.media.turns import TurnEnd

ORG = "acme"
SILENCE = b"\xff" * 160
NOISE = pcm16_array_to_ulaw(np.clip(np.random.default_rng(1).normal(0.0, 3000.0, 160 * 50),
                                    -32768, 32767).astype(np.int16))


class Stream:
    """Synthesises each clause at once as 100 ms of audio."""

    def __init__(self) -> None:
        self.chunks: asyncio.Queue[TtsChunk | None] = asyncio.Queue()
        self.clauses = 0

    async def say(self, text: str, *, last: bool = False) -> None:
        if text:
            self.chunks.put_nowait(TtsChunk(b"\x7f" * 800, [], self.clauses))
        self.clauses += 1
        if last:
            self.chunks.put_nowait(None)

    async def audio(self):
        while (chunk := await self.chunks.get()) is not None:
            yield chunk

    async def cancel(self) -> None:
        self.chunks.put_nowait(None)


class Synthesiser:
    async def open(self, *, voice: str = "", language: str = "en-US") -> Stream:
        return Stream()


class Call:
    """A session with its speaker running, fed audio frame by frame."""

    def __init__(self, bus: Bus, call_id: str, settings: AgentSettings) -> None:
        services = SessionServices(
            bus=bus, leases=None,  # type: ignore[arg-type]  # run() is not called
            stt=ProviderRouter("stt", {"never": object()}, ["never"]),  # type: ignore[dict-item]
            tts=ProviderRouter("tts", {"tts": Synthesiser()}, ["tts"]),  # type: ignore[dict-item]
            instance="test", command_timeout_s=0.05)
        self.bus = bus
        self.call_id = call_id
        self.session = CallSession(services, call_id=call_id, org_id=ORG, agent_id="agent",
                                   settings=settings, revision=1)
        self.session._history = None  # the call's past events are read
        self.seq = 0
        self.speaker = asyncio.create_task(self.session._speaker())

    async def audio(self, seconds: float, frame: bytes = SILENCE) -> None:
        """``seconds`` of inbound audio (at once: the session's clock is the audio's)."""
        for _ in range(round(seconds * 50)):
            self.seq += 1
            await self.session._on_audio(frame, self.seq, self.seq * 20, time.time(), False)

    async def speech(self, seconds: float) -> None:
        """The caller makes a sound the VAD takes for speech (no words come of it)."""
        for n in range(round(seconds * 50)):
            await self.audio(0.02, NOISE[n % 50 * 160:n % 50 * 160 + 160])

    async def agent_says(self, turn_id: str, *texts: str, last: bool = True,
                         first_seq: int = 0) -> None:
        """The brain's clauses for ``turn_id``; they are synthesised and sent to the carrier."""
        for n, text in enumerate(texts):
            self.session._on_say(AgentSay(org_id=ORG, call_id=self.call_id, turn_id=turn_id,
                                          seq=first_seq + n, text=text,
                                          last=last and n == len(texts) - 1))
        await wait_for(lambda: turn_id in self.session._turns and (
            self.session._turns[turn_id].audio.sent == len(self.session._turns[turn_id].audio
                                                           .frames) > 0))

    async def played(self, turn_id: str) -> None:
        """The carrier echoes the turn's last mark: all of it was heard."""
        turn = self.session._turns[turn_id]
        await wait_for(lambda: turn.audio.text_done and turn.spoken)
        seq = mark_seq(turn.audio.generation, len(turn.audio.frames))
        await self.session._on_progress(AgentSpeechProgress(
            org_id=ORG, call_id=self.call_id, turn_id=turn_id, mark=f"{turn_id}:{seq}",
            seq=seq))
        assert turn.audio.finished

    async def caller_turn(self, text: str) -> None:
        """The caller speaks and the turn ends with ``text`` (the recogniser's words)."""
        await self.speech(0.6)
        await self.audio(0.6)
        self.session.detector.reset()  # as its own end of turn does (no recogniser here)
        await self.session._end_turn(TurnEnd(text, "silence", 0, 0, 0, 0))

    async def silence_until_idle(self, limit_s: float) -> float | None:
        """Silence until the session emits a caller.idle: how many seconds (None: none came)."""
        count = self.session._idle_state.idle_count
        for n in range(round(limit_s * 50)):
            await self.audio(0.02)
            if self.session._idle_state.idle_count > count:
                return round((n + 1) * 0.02, 2)
        return None

    async def idle(self) -> list[CallerIdle]:
        """The caller.idle events stored so far."""
        await self.session._outbox.drain(2)
        return [e for e in await self.bus.replay_call(self.call_id, org_id=ORG)
                if isinstance(e, CallerIdle)]

    async def close(self) -> None:
        self.speaker.cancel()
        await asyncio.gather(self.speaker, *self.session._tasks, return_exceptions=True)
        await self.session._outbox.drain(2)


async def wait_for(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


IDLE = AgentSettings(greeting="Hello!", idle_prompt_s=0.5, idle_hangup_s=1.5)
QUIET_CALLER = AgentSettings(greeting="", idle_prompt_s=0.5, idle_hangup_s=1.5)
TICK = 0.1  # the session looks at its idle clock every 100 ms of audio


async def test_a_silent_caller_is_prompted_then_hung_up_on(bus) -> None:
    call = Call(bus, "call-idle-1", IDLE)
    try:
        # The greeting is still to come (the brain greets): the conversation has not begun.
        assert await call.silence_until_idle(2.0) is None
        await call.agent_says("t0", "Hello!")
        assert await call.silence_until_idle(1.0) is None  # playing: its last mark not echoed
        await call.played("t0")
        took = await call.silence_until_idle(2.0)
        assert took is not None and 0.5 - TICK <= took <= 0.5 + TICK
        [prompt] = await call.idle()
        assert (prompt.turn_id, prompt.action, prompt.silent_s) == ("i0", "prompt", 0.5)

        # The prompt plays: its audio does not count, nor does it start the silence over.
        await call.agent_says("i0", "Are you still there?")
        assert await call.silence_until_idle(3.0) is None
        await call.played("i0")
        took = await call.silence_until_idle(2.0)
        assert took is not None and 1.0 - TICK <= took <= 1.0 + TICK
        [again, hangup] = await call.idle()
        assert again == prompt
        assert (hangup.turn_id, hangup.action, hangup.silent_s) == ("i1", "hangup", 1.5)
        # The goodbye plays; the hang-up is the brain's and the tools service's: nothing more.
        await call.agent_says("i1", "Goodbye!")
        await call.played("i1")
        assert await call.silence_until_idle(3.0) is None
        assert len(await call.idle()) == 2
    finally:
        await call.close()


async def test_no_idle_while_a_caller_turn_waits_for_its_answer(bus) -> None:
    # A slow tool or an approval: the caller asked, the agent said "let me check" and waits
    # for the outcome. That silence is not the caller's.
    call = Call(bus, "call-idle-2", QUIET_CALLER)
    try:
        await call.caller_turn("Book me for Friday.")
        assert await call.silence_until_idle(2.0) is None  # the brain has not answered yet
        await call.agent_says("t1", "Let me check the calendar.", last=False)
        seq = mark_seq(0, len(call.session._turns["t1"].audio.frames))
        await call.session._on_progress(AgentSpeechProgress(
            org_id=ORG, call_id=call.call_id, turn_id="t1", mark=f"t1:{seq}", seq=seq))
        assert await call.silence_until_idle(3.0) is None  # played; the tool is slow
        await call.agent_says("t1", "You're booked for Friday.", first_seq=1)
        await call.played("t1")
        took = await call.silence_until_idle(2.0)  # the answer's end begins the silence
        assert took is not None and 0.5 - TICK <= took <= 0.5 + TICK
        assert [(e.turn_id, e.action) for e in await call.idle()] == [("i0", "prompt")]

        # A turn the brain completes without a word (an end_call alone that failed) ends too.
        await call.caller_turn("Hmm, never mind.")
        assert await call.silence_until_idle(2.0) is None
        await call.session._on_event(TurnCompleted(org_id=ORG, call_id=call.call_id,
                                                   turn_id="t2"))
        took = await call.silence_until_idle(2.0)
        assert took is not None and 0.5 - TICK <= took <= 0.5 + TICK
        assert [(e.turn_id, e.action) for e in await call.idle()] == [
            ("i0", "prompt"), ("i1", "prompt")]
    finally:
        await call.close()


async def test_caller_speech_or_a_key_press_starts_the_silence_over(bus) -> None:
    # Keys not taken as input (a key that is makes a turn, which holds the count until it is
    # answered: test_session_keys.py) still show the caller is there.
    call = Call(bus, "call-idle-3", msgspec.structs.replace(QUIET_CALLER, keypad_input=False))
    try:
        await call.audio(0.4)
        await call.session._on_event(CallDtmf(org_id=ORG, call_id=call.call_id, digit="5"))
        took = await call.silence_until_idle(2.0)
        assert took is not None and 0.5 - TICK <= took <= 0.5 + TICK
        [prompt] = await call.idle()
        assert prompt.silent_s == 0.5
        await call.audio(0.6)
        # A cough (speech, no words): the caller is there. Its wordless turn is dropped at the
        # max wait (2.5 s), and the count begins again from 0, the prompt included.
        await call.speech(0.5)
        took = await call.silence_until_idle(5.0)
        assert took is not None and 2.5 + 0.5 - TICK <= took <= 2.5 + 0.5 + 3 * TICK
        [_, again] = await call.idle()
        assert (again.turn_id, again.action, again.silent_s) == ("i1", "prompt", 0.5)
    finally:
        await call.close()


async def test_zero_turns_each_timer_off(bus) -> None:
    off = Call(bus, "call-idle-4", AgentSettings(greeting="", idle_prompt_s=0, idle_hangup_s=0))
    hang_up_only = Call(bus, "call-idle-5", AgentSettings(greeting="", idle_prompt_s=0,
                                                          idle_hangup_s=1.0))
    prompt_only = Call(bus, "call-idle-6", AgentSettings(greeting="", idle_prompt_s=0.5,
                                                         idle_hangup_s=0))
    try:
        for call in (off, hang_up_only, prompt_only):
            await call.audio(5.0)
        assert await off.idle() == []
        assert [(e.action, e.silent_s) for e in await hang_up_only.idle()] == [("hangup", 1.0)]
        assert [(e.action, e.silent_s) for e in await prompt_only.idle()] == [("prompt", 0.5)]
    finally:
        for call in (off, hang_up_only, prompt_only):
            await call.close()


async def test_a_successor_goes_on_with_the_silence_it_took_over(bus) -> None:
    # Media instance A prompted and died; B takes the call over and reads the call's events:
    # it does not prompt again, and hangs up when the silence A counted reaches idle_hangup_s.
    first = Call(bus, "call-idle-7", QUIET_CALLER)
    assert await first.silence_until_idle(1.0) is not None
    await first.close()
    [prompt] = await first.idle()
    second = Call(bus, "call-idle-7", QUIET_CALLER)
    try:
        second.session._history = {}
        for event in await bus.replay_call("call-idle-7", org_id=ORG):
            second.session._catch_up(event)
        await second.session._caught_up()
        took = await second.silence_until_idle(2.0)
        assert took is not None and 1.0 - TICK <= took <= 1.0 + TICK
        [again, hangup] = await second.idle()
        assert again == prompt and (hangup.turn_id, hangup.action) == ("i1", "hangup")
        # Had B not known of A's prompt, its own would have been the same event: dropped.
        third = Call(bus, "call-idle-7", QUIET_CALLER)
        assert await third.silence_until_idle(1.0) is not None
        await third.close()
        assert await third.idle() == [prompt, hangup]
    finally:
        await second.close()


async def test_a_successors_goodbye_is_reported_played(bus) -> None:
    # A answered the caller (t1 played) and handed the call over; the caller stays silent and
    # B plays the idle goodbye, still within A's caller turn. The tools service hangs up once
    # it reads the goodbye's agent.speech.finished: B's must be stored, not taken by JetStream
    # for a repeat of A's (ids counted per session, per caller turn, collided), which left the
    # caller 20 s of dead air before the hang-up.
    first = Call(bus, "call-idle-8", QUIET_CALLER)
    await first.caller_turn("Thanks, that's all I needed.")
    await first.agent_says("t1", "You're welcome!")
    await first.played("t1")
    await first.close()
    second = Call(bus, "call-idle-8", QUIET_CALLER)
    try:
        second.session._history = {}
        for event in await bus.replay_call("call-idle-8", org_id=ORG):
            second.session._catch_up(event)
        await second.session._caught_up()
        second.session.turn_no = first.session.turn_no  # as the lease resumes it
        await second.agent_says("i0", "Goodbye!")
        await second.played("i0")
    finally:
        await second.close()
    finished = [e.turn_id for e in await bus.replay_call("call-idle-8", org_id=ORG)
                if isinstance(e, AgentSpeechFinished)]
    assert finished == ["t1", "i0"]


async def test_a_hang_up_that_did_not_happen_is_asked_for_again(bus) -> None:
    # The goodbye played, but the gateway timed out on the hang-up (or refused it): the caller
    # did not answer, the line stays open and silent. It is hung up on after all, not left open
    # until max_duration_s: another caller.idle hangup (the next ordinal) after a further
    # interval of silence, by this session or a successor that took the call over.
    call = Call(bus, "call-idle-9", AgentSettings(greeting="", idle_prompt_s=0,
                                                  idle_hangup_s=1.0))
    retry_s = 15.0  # IdleSettings.hangup_retry_ms
    try:
        assert await call.silence_until_idle(2.0) is not None
        await call.agent_says("i0", "Goodbye!")
        await call.played("i0")
        took = await call.silence_until_idle(retry_s + 1.0)
        assert took is not None and retry_s - TICK <= took <= retry_s + TICK
        assert [(e.turn_id, e.action, e.silent_s) for e in await call.idle()] == [
            ("i0", "hangup", 1.0), ("i1", "hangup", 1.0 + retry_s)]
    finally:
        await call.close()
    successor = Call(bus, "call-idle-9", AgentSettings(greeting="", idle_prompt_s=0,
                                                       idle_hangup_s=1.0))
    try:
        successor.session._history = {}
        for event in await bus.replay_call("call-idle-9", org_id=ORG):
            successor.session._catch_up(event)
        await successor.session._caught_up()
        took = await successor.silence_until_idle(retry_s + 1.0)
        assert took is not None and retry_s - TICK <= took <= retry_s + TICK
        assert [(e.turn_id, e.action) for e in await successor.idle()][2:] == [("i2", "hangup")]
    finally:
        await successor.close()


async def stored(call: Call, event: ToolRequested | ToolFailed | TurnCompleted) -> None:
    """Another service's event of the call: stored, and seen by the session."""
    await call.bus.publish(event)
    await call.session._on_event(event)


async def hand_off_fails(call: Call, turn_id: str, name: str) -> None:
    """The brain asked for ``name`` after ``turn_id``'s last words; the tools service failed it."""
    tool_call_id = f"{turn_id}-{name}"
    await stored(call, ToolRequested(org_id=ORG, call_id=call.call_id, turn_id=turn_id,
                                     tool_call_id=tool_call_id, name=name))
    await stored(call, ToolFailed(org_id=ORG, call_id=call.call_id, tool_call_id=tool_call_id,
                                  name=name, error="the gateway did not answer in time"))


async def test_no_idle_while_the_brain_answers_a_failed_hand_off(bus) -> None:
    # "Thanks for calling, goodbye!" played and the turn completed, but the hang-up failed: the
    # brain takes the turn up again and the model writes why ("t1.1"). That silence is not the
    # caller's: counted, a prompt could come right after the agent's explanation.
    call = Call(bus, "call-idle-10", QUIET_CALLER)
    try:
        await call.caller_turn("That's all, thanks.")
        await call.agent_says("t1", "Thanks for calling, goodbye!")
        await stored(call, TurnCompleted(org_id=ORG, call_id=call.call_id, turn_id="t1"))
        await call.played("t1")
        await hand_off_fails(call, "t1", "end_call")
        assert await call.silence_until_idle(2.0) is None  # the model writes the follow-up

        # A successor that takes the call over now knows it too.
        await call.session._outbox.drain(2)
        successor = Call(bus, call.call_id, QUIET_CALLER)
        try:
            successor.session._history = {}
            successor.session.turn_no = call.session.turn_no  # as the lease resumes it
            for event in await bus.replay_call(call.call_id, org_id=ORG):
                successor.session._catch_up(event)
            await successor.session._caught_up()
            assert await successor.silence_until_idle(2.0) is None
        finally:
            await successor.close()

        await call.agent_says("t1.1", "Sorry, I couldn't end the call.")
        await call.session._on_event(TurnCompleted(org_id=ORG, call_id=call.call_id,
                                                   turn_id="t1"))
        await call.played("t1.1")
        took = await call.silence_until_idle(2.0)  # the follow-up's end begins the silence
        assert took is not None and 0.5 - TICK <= took <= 0.5 + TICK

        # A transfer refused at once (a number the agent may not dial): its tool.failed can
        # come before the turn's first completion, and the announcement ends before the model
        # has written why. Pending until the brain completes the turn a second time.
        await call.caller_turn("Put me through to sales.")
        await call.agent_says("t2", "Let me transfer you.")
        await hand_off_fails(call, "t2", "transfer_call")
        await call.session._on_event(TurnCompleted(org_id=ORG, call_id=call.call_id,
                                                   turn_id="t2"))
        await call.played("t2")
        assert await call.silence_until_idle(2.0) is None
        await call.agent_says("t2.1", "I can't transfer you right now.")
        await call.session._on_event(TurnCompleted(org_id=ORG, call_id=call.call_id,
                                                   turn_id="t2"))
        await call.played("t2.1")
        took = await call.silence_until_idle(2.0)
        assert took is not None and 0.5 - TICK <= took <= 0.5 + TICK
        assert [(e.turn_id, e.action) for e in await call.idle()] == [
            ("i0", "prompt"), ("i1", "prompt")]
    finally:
        await call.close()


async def test_a_successor_that_took_over_during_the_greeting_counts_the_silence(bus) -> None:
    # A began the greeting and died before its last mark was echoed. B does not voice it again
    # (agent.speech.started says it was heard), and no turn.completed comes for a greeting, nor
    # an echo B could take for its end: B must not wait for "t0" for the rest of the call.
    first = Call(bus, "call-idle-11", IDLE)
    greeting = AgentSay(org_id=ORG, call_id=first.call_id, turn_id="t0", seq=0, text="Hello!",
                        last=True)
    await bus.publish(greeting)  # as the brain stores it
    await first.agent_says("t0", "Hello!")
    await first.close()
    second = Call(bus, "call-idle-11", IDLE)
    try:
        second.session._history = {}
        for event in await bus.replay_call("call-idle-11", org_id=ORG):
            second.session._catch_up(event)
        await second.session._caught_up()
        assert "t0" not in second.session._turns  # not said twice
        took = await second.silence_until_idle(3.0)
        assert took is not None and 0.5 - TICK <= took <= 0.5 + TICK
        assert [(e.turn_id, e.action) for e in await second.idle()] == [("i0", "prompt")]
    finally:
        await second.close()


async def test_a_hand_off_whose_last_words_the_caller_cut_off_is_not_pending(bus) -> None:
    # "Thanks for calling, goodbye!" and the caller presses a key over it (interruption by
    # key): the tools service refuses the end_call (the caller interrupted the goodbye) and the
    # brain does not take the turn up again — an interrupted turn is over; it answers the
    # caller's next turn, if one comes. A key press makes none here (keys are not input for
    # this agent): had the refusal made the turn pending again, the silence after it would
    # never count, and the caller would be neither prompted nor hung up on for the rest of the
    # call.
    by_key = AgentSettings(greeting="", idle_prompt_s=0.5, idle_hangup_s=1.5,
                           interruption_mode="dtmf", keypad_input=False)
    call = Call(bus, "call-idle-11", by_key)
    try:
        await call.caller_turn("That's all, thanks.")
        await call.agent_says("t1", "Thanks for calling, goodbye!")
        await stored(call, ToolRequested(org_id=ORG, call_id=call.call_id, turn_id="t1",
                                         tool_call_id="t1-end_call", name="end_call"))
        await stored(call, TurnCompleted(org_id=ORG, call_id=call.call_id, turn_id="t1"))
        await call.session._on_event(CallDtmf(org_id=ORG, call_id=call.call_id, digit="1"))
        assert call.session._turns["t1"].interrupted
        await stored(call, ToolFailed(
            org_id=ORG, call_id=call.call_id, tool_call_id="t1-end_call", name="end_call",
            error="not hung up: the caller interrupted the goodbye, so the call goes on"))
        took = await call.silence_until_idle(2.0)
        assert took is not None and 0.5 - TICK <= took <= 0.5 + TICK

        # The other order: a transfer refused at once (a number the agent may not dial), then
        # the caller cuts its announcement off before the brain took the turn up again (so it
        # does not: the turn was interrupted).
        await call.caller_turn("Put me through to sales.")
        await call.agent_says("t2", "Let me transfer you.")
        await hand_off_fails(call, "t2", "transfer_call")
        await stored(call, TurnCompleted(org_id=ORG, call_id=call.call_id, turn_id="t2"))
        await call.session._on_event(CallDtmf(org_id=ORG, call_id=call.call_id, digit="2"))
        assert call.session._turns["t2"].interrupted
        took = await call.silence_until_idle(2.0)
        assert took is not None and 0.5 - TICK <= took <= 0.5 + TICK
    finally:
        await call.close()

    # A successor that reads the call's events knows the turns are over too.
    successor = Call(bus, call.call_id, by_key)
    try:
        successor.session._history = {}
        successor.session.turn_no = call.session.turn_no  # as the lease resumes it
        for event in await bus.replay_call(call.call_id, org_id=ORG):
            successor.session._catch_up(event)
        await successor.session._caught_up()
        assert await successor.silence_until_idle(2.0) is not None
    finally:
        await successor.close()


async def test_a_turn_detected_again_after_a_take_over_is_not_pending_after_a_turn_of_keys(
        bus) -> None:
    # The caller says "Repeat that, please." (t1) and at once presses # (k1); the brain drops
    # t1 for k1 and answers that; then the instance dies. Its successor resumes before t1's end
    # (the lease lags the events) and detects t1 again, under its id (JetStream drops the
    # repeat). Once per turn held only for the latest turn, and k1 was later: t1 became pending
    # again, no completion ever came, and the caller was never prompted nor hung up on.
    first = Call(bus, "call-idle-12", QUIET_CALLER)
    try:
        await first.caller_turn("Repeat that, please.")
        await first.session._on_event(CallDtmf(org_id=ORG, call_id=first.call_id, digit="#"))
        await stored(first, TurnCompleted(org_id=ORG, call_id=first.call_id, turn_id="t1",
                                          cancelled=True))
        await first.agent_says("k1", "You pressed pound.")
        await first.played("k1")
        await stored(first, TurnCompleted(org_id=ORG, call_id=first.call_id, turn_id="k1"))
    finally:
        await first.close()
    successor = Call(bus, first.call_id, QUIET_CALLER)
    try:
        successor.session._history = {}
        for event in await bus.replay_call(first.call_id, org_id=ORG):
            successor.session._catch_up(event)
        await successor.session._caught_up()
        await successor.caller_turn("Repeat that, please.")  # t1 again (turn_no 0 resumed)
        took = await successor.silence_until_idle(2.0)
        assert took is not None and 0.5 - TICK <= took <= 0.5 + TICK
    finally:
        await successor.close()


async def test_an_agent_turn_paused_by_the_caller_ends_when_the_next_one_starts(bus) -> None:
    # Low sensitivity: "Stop." over the agent pauses it (700 ms of speech) but one word does not
    # confirm the interruption; the caller's turn ends and the brain answers it before the 1.5 s
    # resume. The paused turn was left cut for good, neither resumed nor interrupted: no
    # agent.speech.interrupted for it, and, as its audio never finished, the call was busy
    # for ever — the caller was never prompted nor hung up on.
    settings = AgentSettings(greeting="", idle_prompt_s=0.5, idle_hangup_s=1.5,
                             interruption_sensitivity="low")
    call = Call(bus, "call-idle-paused", settings)
    try:
        await call.agent_says("t0", "Our opening hours are", "nine to five on weekdays.")
        await call.speech(1.0)
        assert call.session._turns["t0"].audio.cut_frames is not None  # paused
        await call.audio(0.6)
        call.session.detector.reset()
        await call.session._end_turn(TurnEnd("Stop.", "silence", 0, 0, 0, 0))
        await call.agent_says("t1", "Sure, I'll stop there.")
        await call.played("t1")
        took = await call.silence_until_idle(2.0)
        assert took is not None and 0.5 - TICK <= took <= 0.5 + TICK
        await call.session._outbox.drain(2)
        events = await bus.replay_call(call.call_id, org_id=ORG)
        assert [e.turn_id for e in events if isinstance(e, AgentSpeechInterrupted)] == ["t0"]
    finally:
        await call.close()


async def refusing_marks(bus: Bus, call_id: str, refused: list[str]):
    """Play the call's gateway whose socket is closed: every mark refused (its name noted)."""
    async def gateway(msg) -> None:
        refused.append(json.loads(msg.data)["name"])
        await msg.respond(json.dumps(
            {"ok": False, "error": "mark not sent: the call's socket is closed"}).encode())

    return await bus.nc.subscribe(command_subject(call_id, "mark"), cb=gateway)


async def test_an_agent_turn_whose_last_mark_the_gateway_refused_leaves_nothing_pending(
        bus) -> None:
    # The agent's last words went out as the carrier's socket closed (a DTMF redirect, or the
    # connection lost and the call reconnected on a new stream): the gateway refused the mark
    # after them, "mark not sent: the call's socket is closed". The session kept it as placed
    # and waited for its echo, which never comes: the turn stayed playing for ever, so the
    # caller's silence never counted again for the rest of the call (no prompt, no hang-up).
    refused: list[str] = []
    sub = await refusing_marks(bus, "call-idle-refused", refused)
    call = Call(bus, "call-idle-refused", QUIET_CALLER)
    try:
        await call.agent_says("t1", "I'll put you through now.")
        await wait_for(lambda: refused and call.session._turns["t1"].spoken)
        turn = call.session._turns["t1"]
        assert turn.audio.pending_marks == [] and not turn.audio.playing(time.monotonic())
        took = await call.silence_until_idle(2.0)
        assert took is not None and 0.5 - TICK <= took <= 0.5 + TICK
    finally:
        await call.close()
        await sub.unsubscribe()


async def test_a_greeting_whose_last_mark_the_gateway_refused_leaves_the_silence_to_count(
        bus) -> None:
    # As above, for the greeting (t0): the stream restarted as its last words went out, and
    # the gateway refused the mark after them. The greeting's turn is done with, but the idle
    # state still waited for its audio to be over (a greeting's end is only its last echo: the
    # brain completes no greeting), so a caller who never spoke was never prompted or hung up on.
    sub = await refusing_marks(bus, "call-idle-refused-0", [])
    call = Call(bus, "call-idle-refused-0", IDLE)
    try:
        await call.agent_says("t0", "Hello!")
        await wait_for(lambda: call.session._turns["t0"].audio.echoes_lost)
        took = await call.silence_until_idle(2.0)
        assert took is not None and 0.5 - TICK <= took <= 0.5 + TICK
    finally:
        await call.close()
        await sub.unsubscribe()


async def test_an_agent_turn_sent_to_a_stream_that_restarted_leaves_nothing_pending(bus) -> None:
    # The agent's answer went out, the carrier's stream then restarted (a DTMF redirect, a
    # gateway failover: the call reconnected on a new stream) before it played out. The old
    # stream's queued audio is gone and none of its marks will be echoed: in-band marks are
    # dropped with their frames, unanswered (no refusal to learn from), and the last mark's
    # command timed out. The turn counted as playing for the rest of the call.
    call = Call(bus, "call-idle-restarted", QUIET_CALLER)
    try:
        await call.agent_says("t1", "I'll put you through now.")
        await wait_for(lambda: call.session._turns["t1"].spoken)
        assert await call.silence_until_idle(1.0) is None  # playing: its last mark not echoed
        await call.session._on_event(CallStreamStarted(
            org_id=ORG, call_id=call.call_id, stream_id="MZ2", gateway_instance="gw-2"))
        took = await call.silence_until_idle(2.0)
        assert took is not None and 0.5 - TICK <= took <= 0.5 + TICK
    finally:
        await call.close()
