"""The caller over the agent's audio: a pause that was a false alarm plays the rest, and ends.

Driven as in test_session_idle: inbound audio frame by frame (the audio clock), the agent's
turns from a stand-in synthesiser, the carrier's echoes given by the test, and a stand-in
gateway answering ``clear`` and ``mark`` as the real one does (ok), noting each mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import msgspec

from parley.common.bus import Bus
from parley.common.events import (
    AgentReplyPrepared,
    AgentSay,
    AgentSpeechFinished,
    AgentSpeechInterrupted,
    AgentSpeechProgress,
    CallDtmf,
    CallEnded,
    Event,
    TurnUserEnded,
)
from parley.media.ownership import Leases
from parley.media.playback import FRAME_MS, GENERATION, mark_seq
from parley.media.providers.base import Final, Partial

from .test_session_idle import NOISE, ORG, QUIET_CALLER, SILENCE, Call, wait_for


async def gateway(call: Call, marks: list[int]):
    """Answer the call's clear and mark commands ok; the marks' seqs are noted."""
    async def answer(msg) -> None:
        if msg.subject.endswith(".mark"):
            marks.append(int(json.loads(msg.data)["name"].split(":")[1]))
        await msg.respond(b'{"ok": true}')

    return await call.bus.nc.subscribe(f"parley.cmd.gateway.{call.call_id}.*", cb=answer)


async def echo(call: Call, turn_id: str, seq: int) -> None:
    await call.session._on_progress(AgentSpeechProgress(
        org_id=ORG, call_id=call.call_id, turn_id=turn_id, mark=f"{turn_id}:{seq}", seq=seq))


async def agent_begins(call: Call, turn_id: str, *texts: str, last: bool = True):
    """The agent says ``texts`` and the carrier begins to play them (the first frame's mark
    echoed)."""
    await call.agent_says(turn_id, *texts, last=last)
    await echo(call, turn_id, mark_seq(0, 1))
    return call.session._turns[turn_id]


async def agent_ends(call: Call, turn_id: str, *texts: str, first_seq: int) -> None:
    """The rest of the agent's turn (from clause ``first_seq``) is said and played to its end,
    and the caller's next frames come."""
    await call.agent_says(turn_id, *texts, first_seq=first_seq)
    await call.played(turn_id)
    await call.audio(0.1)


async def presses(call: Call, keys: str) -> None:
    for digit in keys:
        await call.session._on_event(CallDtmf(org_id=ORG, call_id=call.call_id, digit=digit))


async def in_real_time(call: Call, seconds: float) -> None:
    """``seconds`` of the caller's silence, 100 ms at a time as the wall clock goes (a paused
    agent resumes by wall time)."""
    for _ in range(round(seconds / 0.1)):
        await call.audio(0.1)
        await asyncio.sleep(0.1)


def in_mode(bus: Bus, call_id: str, mode: str, **settings: object) -> Call:
    """A call whose caller may interrupt the agent as ``interruption_mode`` ``mode`` lets them."""
    return Call(bus, call_id, msgspec.structs.replace(
        QUIET_CALLER, interruption_mode=mode, **settings))


def caller_turns(events: list[Event]) -> list[tuple[str, str]]:
    """(turn id, text) of each caller turn among ``events``, in order."""
    return [(e.turn_id, e.text) for e in events if isinstance(e, TurnUserEnded)]


async def published(call: Call) -> list[Event]:
    """The call's events so far, the session's outbox drained."""
    await call.session._outbox.drain(2)
    return await call.bus.replay_call(call.call_id, org_id=ORG)


async def test_a_false_alarm_once_the_agent_had_played_out_still_ends_its_turn(bus) -> None:
    # The agent's last words have played (by its echoes and the time since) but the echo of
    # its last mark is still on its way when the caller coughs (the line's latency). The cough
    # pauses the agent at its end (clear: the late echo is one of the flushed marks), and no
    # words come: 1.5 s later the rest plays, which is nothing. Nothing was sent, so no mark
    # of the resumed run was ever echoed: the turn counted as playing for the rest of the call
    # (no agent.speech.finished; the caller's silence never counted, no prompt, no hang-up).
    call = Call(bus, "call-barge-in-1", QUIET_CALLER)
    marks: list[int] = []
    sub = await gateway(call, marks)
    try:
        await call.agent_says("t1", "Our hours are nine to five.")
        turn = call.session._turns["t1"]
        await wait_for(lambda: turn.spoken and turn.audio.text_done)
        frames = len(turn.audio.frames)
        await echo(call, "t1", mark_seq(0, 1))  # playback began
        await asyncio.sleep(frames * 0.02 + 0.05)  # ... and has played out, by the time since
        await call.speech(0.6)  # a cough over it
        assert turn.audio.cut_frames == frames
        await echo(call, "t1", mark_seq(0, frames))  # flushed by the clear: ignored
        await call.audio(0.6)
        await in_real_time(call, 2.5)  # no words: the pause is over after 1.5 s (wall time)
        assert turn.audio.cut_frames is None and not turn.interrupted  # resumed
        for seq in [seq for seq in marks if seq >= GENERATION]:  # the carrier echoes at once
            await echo(call, "t1", seq)
        await wait_for(lambda: turn.audio.finished)
        assert await call.silence_until_idle(4.0) is not None
        events = await published(call)
        assert [e.turn_id for e in events if isinstance(e, AgentSpeechFinished)] == ["t1"]
    finally:
        await call.close()
        await sub.unsubscribe()


async def test_a_turn_echoed_to_its_end_before_its_last_clause_came_still_ends(bus) -> None:
    # The agent said five clauses (25 frames: a mark after the last, as after every 500 ms),
    # then the brain took its time over the turn's end (an empty last clause after a slow
    # response). The carrier echoed the 25th frame's mark meanwhile: all of it played, before
    # the text was known to be done. Once it was, the mark after the last frame was thought
    # not missing (played already), none was sent, and nothing ever finished the turn.
    call = Call(bus, "call-barge-in-2", QUIET_CALLER)
    marks: list[int] = []
    sub = await gateway(call, marks)
    try:
        await call.agent_says("t1", "One.", "Two.", "Three.", "Four.", "Five.", last=False)
        turn = call.session._turns["t1"]
        assert len(turn.audio.frames) == 25 and turn.audio.pending_marks[-1] == 25
        await echo(call, "t1", mark_seq(0, 25))
        await call.agent_says("t1", "", first_seq=5)  # the turn's end, nothing more to say
        await wait_for(lambda: turn.spoken)
        for seq in marks:  # the carrier echoes a mark with nothing queued before it at once
            await echo(call, "t1", seq)
        assert turn.audio.finished
        assert await call.silence_until_idle(2.0) is not None
    finally:
        await call.close()
        await sub.unsubscribe()


async def test_a_backchannel_while_the_agent_waits_between_its_words_is_no_turn(bus) -> None:
    # "Let me check that for you." The agent's turn goes on (its tools are slow: no more words
    # yet, its last clause still to come) and its words so far have played. The caller says
    # "Okay." That was taken as a turn of its own, the agent being silent just then: the brain
    # cancelled the turn it was running (tools and all) for a newer one, and answered "Okay.".
    call = Call(bus, "call-barge-in-3", QUIET_CALLER)
    try:
        turn = await agent_begins(call, "t1", "Let me check that for you.", last=False)
        await asyncio.sleep(len(turn.audio.frames) * 0.02 + 0.05)  # its words have played
        await call.speech(0.4)
        await call.session._on_stt(Final("Okay.", speech_final=True))
        await call.audio(3.0)  # a backchannel's silence, and more
        assert not call.session.detector.in_turn
        events = await published(call)
        assert caller_turns(events) == []
        assert call.session.detector.dropped_backchannels == 1
    finally:
        await call.close()


async def test_what_was_heard_does_not_count_the_wait_between_two_clauses_as_played(bus) -> None:
    # "Let me check." played (its first mark echoed, its 100 ms since), then nothing for a
    # while: the tools were slow, the carrier had nothing to play. The next clause's audio went
    # out, and the caller spoke over it at once. The played position was the last echo plus
    # all the time since, capped only by the next unechoed mark (500 ms on): the wait counted
    # as played, and agent.speech.interrupted said the caller heard words of the second clause
    # the carrier had not yet begun to play.
    call = Call(bus, "call-barge-in-4", QUIET_CALLER)
    sub = await gateway(call, [])
    try:
        await call.agent_says("t1", "Let me check.", last=False)
        turn = call.session._turns["t1"]
        first = len(turn.audio.frames)
        await echo(call, "t1", mark_seq(0, 1))
        await asyncio.sleep(0.3)  # its audio has played; the carrier waits for more
        await call.agent_says("t1", "You're booked for Friday.", first_seq=1)
        await wait_for(lambda: turn.audio.sent > first)
        await call.session._interrupt(turn, time.monotonic())  # the caller cuts in at once
        [interrupted] = [e for e in await published(call) if isinstance(e, AgentSpeechInterrupted)]
        # Heard: the first clause, and at most the frame the carrier was about to play.
        assert interrupted.cut_ms <= (first + 1) * 20
    finally:
        await call.close()
        await sub.unsubscribe()


async def test_speech_over_an_answer_queued_behind_the_one_playing_cuts_both(bus) -> None:
    # "Press one for sales, two for support, ..." — the caller pressed 1 early, and the answer
    # to the keys ("Connecting you to sales.") went out behind the menu still playing. Then the
    # caller spoke over the menu. Barge-in looked only at the newest turn: it paused and
    # interrupted the answer (nothing of it heard), the gateway's clear flushed the menu's
    # rest with it, and the menu was never said to be cut off: its flushed marks echoed back
    # and it was reported heard to its end (agent.speech.finished).
    call = Call(bus, "call-barge-in-5", QUIET_CALLER)
    sub = await gateway(call, [])
    try:
        await call.agent_says("t1", "Press one for sales.", "Two for support.", "Three for",
                              "billing.", "Four for anything else.")
        menu = call.session._turns["t1"]
        await wait_for(lambda: menu.spoken)
        await echo(call, "t1", mark_seq(0, 1))  # the menu has begun to play
        await call.agent_says("k1", "Connecting you to sales.")
        answer = call.session._turns["k1"]
        await wait_for(lambda: answer.spoken)
        await call.speech(0.6)  # the caller speaks over the menu
        await call.session._on_stt(Final("Wait, I meant support."))
        await echo(call, "t1", mark_seq(0, len(menu.audio.frames)))  # flushed by the clear
        events = await published(call)
        assert sorted(e.turn_id for e in events if isinstance(e, AgentSpeechInterrupted)) == [
            "k1", "t1"]
        assert [e.turn_id for e in events if isinstance(e, AgentSpeechFinished)] == []
        [heard] = [e for e in events if isinstance(e, AgentSpeechInterrupted)
                   and e.turn_id == "k1"]
        assert heard.played_text == "" and heard.cut_ms == 0
    finally:
        await call.close()
        await sub.unsubscribe()


async def test_an_interruption_clears_the_carrier_again_if_the_pause_could_not(bus) -> None:
    # The caller speaks over the agent: the pause's clear goes unanswered (the gateway slow,
    # a NATS blip), so the carrier may still be playing. The caller's words then confirm the
    # interruption, but the turn was cut already, so no clear was sent again: the agent went
    # on talking over the caller to the end of its turn while the brain answered the words.
    call = Call(bus, "call-barge-in-6", QUIET_CALLER)
    clears: list[bool] = []

    async def gateway(msg) -> None:
        clears.append(bool(clears))
        if len(clears) > 1:  # the first goes unanswered
            await msg.respond(b'{"ok": true}')

    sub = await bus.nc.subscribe(f"parley.cmd.gateway.{call.call_id}.clear", cb=gateway)
    try:
        await agent_begins(call, "t1", "Our opening hours are", "nine to five on weekdays.")
        await call.speech(0.6)
        assert call.session._turns["t1"].audio.cut_frames is not None and len(clears) == 1
        await call.session._on_stt(Final("Wait, stop."))
        assert call.session._turns["t1"].interrupted
        await wait_for(lambda: len(clears) == 2)
    finally:
        await call.close()
        await sub.unsubscribe()


async def test_okay_over_the_agent_pauses_it_and_the_rest_plays_from_the_cut(bus) -> None:
    # The caller says "Okaaay" over the agent, long enough to pause it. Only a backchannel:
    # once the caller stops, the rest plays from where it was cut (a new mark generation),
    # nothing is interrupted, and the backchannel is no turn.
    call = Call(bus, "call-barge-in-7", QUIET_CALLER)
    marks: list[int] = []
    sub = await gateway(call, marks)
    try:
        turn = await agent_begins(call, "t1", "Your table is booked", "for Friday at seven.",
                                  "We look forward", "to seeing you.")
        await asyncio.sleep(0.1)
        await call.speech(0.5)
        cut = turn.audio.cut_frames
        assert cut is not None and 1 <= cut < len(turn.audio.frames)
        await call.session._on_stt(Final("Okay.", speech_final=True))
        await call.audio(0.4)  # the caller has stopped: resumed at once
        assert turn.audio.cut_frames is None and turn.audio.generation == 1
        assert turn.audio.sent == len(turn.audio.frames)
        assert turn.audio.pending_marks[0] == cut + 1  # a mark after the first frame sent again
        await call.audio(2.0)
        await call.played("t1")
        events = await published(call)
        assert [e for e in events if isinstance(e, AgentSpeechInterrupted | TurnUserEnded)] == []
        assert [e.turn_id for e in events if isinstance(e, AgentSpeechFinished)] == ["t1"]
        assert call.session.detector.dropped_backchannels == 1
    finally:
        await call.close()
        await sub.unsubscribe()


async def spoken_over(call: Call, words: str) -> None:
    """The caller says ``words`` over the agent and stops: the turn ends (a backchannel's
    silence and more)."""
    await call.speech(0.6)
    await call.session._on_stt(Final(words, speech_final=True))
    await call.audio(1.0)


async def test_a_turn_spoken_over_an_agent_that_cannot_be_interrupted_waits_for_it(bus) -> None:
    # Mode none: the caller's speech does not barge in. "Can you also check Saturday?" over
    # the agent's answer, the brain still writing it. Media cleared nothing and interrupted
    # nothing, but published the caller's turn at once: the brain cancelled the turn it was
    # running for the newer one, and the caller heard an answer that stopped mid-sentence
    # (wherever generation had got to). Now the turn waits until the agent's turn has played,
    # then goes out with its words and its timing as heard.
    call = in_mode(bus, "call-barge-in-none-1", "none")
    clears: list[str] = []

    async def clear(msg) -> None:
        clears.append(msg.subject)
        await msg.respond(b'{"ok": true}')

    sub = await bus.nc.subscribe(f"parley.cmd.gateway.{call.call_id}.clear", cb=clear)
    try:
        turn = await agent_begins(call, "t1", "Friday at ten is free.", "Friday at two", last=False)
        await spoken_over(call, "Can you also check Saturday?")
        assert call.session.turn_no == 1  # the turn has ended ...
        await call.audio(2.0)
        events = await published(call)
        assert caller_turns(events) == []  # ... and waits
        assert not turn.interrupted and turn.audio.cut_frames is None and clears == []
        await agent_ends(call, "t1", "is free too.", first_seq=2)  # the rest of the answer
        events = await published(call)
        [ended] = [e for e in events if isinstance(e, TurnUserEnded)]
        assert (ended.turn_id, ended.text) == ("t1", "Can you also check Saturday?")
        assert ended.reason == "utterance_end"
        assert ended.eou_delay_ms < 1000  # the silence waited then, not the wait for the agent
        assert [e.turn_id for e in events if isinstance(e, AgentSpeechFinished)] == ["t1"]
        assert [e for e in events if isinstance(e, AgentSpeechInterrupted)] == []
    finally:
        await call.close()
        await sub.unsubscribe()


async def test_a_key_interrupts_in_mode_dtmf_and_the_turn_held_goes_out_before_it(bus) -> None:
    # Mode dtmf: the caller's words over the agent wait for it (as above), but a key cuts it
    # off; the caller's turn goes out then, followed by the turn of keys it came before.
    call = in_mode(bus, "call-barge-in-dtmf-1", "dtmf", keypad_end_key="#")
    sub = await gateway(call, [])
    try:
        turn = await agent_begins(call, "t1", "Please say or enter", "your account number.",
                                  last=False)
        await spoken_over(call, "It is one two three.")
        await presses(call, "#")
        assert turn.interrupted
        await call.audio(0.1)
        events = await published(call)
        assert caller_turns(events) == [("t1", "It is one two three."), ("k1", "#")]
    finally:
        await call.close()
        await sub.unsubscribe()


async def test_a_turn_held_for_the_agent_is_not_lost_when_the_call_ends(bus) -> None:
    # The caller spoke over an agent that cannot be interrupted, then hung up before it had
    # finished: the turn the session held goes out as the session ends (the brain answers no
    # ended call; the caller's words are on the record as a turn).
    call = in_mode(bus, "call-barge-in-none-2", "none")
    call.session.s.leases = Leases(bus, "test")
    try:
        await agent_begins(call, "t1", "Our hours are", "nine to five.", last=False)
        await spoken_over(call, "Never mind, goodbye.")
        await call.session._on_event(CallEnded(org_id=ORG, call_id=call.call_id,
                                               reason="caller_hangup"))
        await call.session._close()
        events = await bus.replay_call(call.call_id, org_id=ORG)
        assert caller_turns(events) == [("t1", "Never mind, goodbye.")]
    finally:
        await call.close()


async def test_a_turn_held_for_the_agent_keeps_the_resume_point_before_it(bus) -> None:
    # Only this session has the turn it holds: were it killed, a successor resumed after that
    # turn's speech would never hear it. The lease's resume point stays before it.
    call = in_mode(bus, "call-barge-in-none-3", "none")
    try:
        await agent_begins(call, "t1", "Our hours are", "nine to five.", last=False)
        await call.audio(1.0)
        spoke_at = call.session.audio_ms
        await spoken_over(call, "And on Saturdays?")
        await call.audio(3.0)  # the agent still speaking: held
        assert call.session._held_turns
        assert call.session._lease_state().resume_ms <= spoke_at
    finally:
        await call.close()


async def caught_up(call: Call, seconds: float, *, speech: bool = False) -> None:
    """``seconds`` of the caller's past audio, as a successor's catch-up from the AUDIO stream
    delivers it (behind live): noise the VAD takes for speech, or silence."""
    for n in range(round(seconds * 50)):
        call.seq += 1
        frame = NOISE[n % 50 * 160:n % 50 * 160 + 160] if speech else SILENCE
        await call.session._on_audio(frame, call.seq, call.seq * 20, time.time() - 5, True)


async def test_speech_a_successor_catches_up_on_does_not_barge_in_on_the_agent_now(bus) -> None:
    # A successor takes the call over and catches up on the caller's audio since the lease's
    # resume point, seconds old, while the agent's answer plays now. That old speech was
    # compared with the playback of now: it paused the agent (clear) and its words cut it off
    # (agent.speech.interrupted), though the caller had said them before the answer began.
    call = Call(bus, "call-barge-in-catch-up-1", QUIET_CALLER)
    clears: list[str] = []

    async def clear(msg) -> None:
        clears.append(msg.subject)
        await msg.respond(b'{"ok": true}')

    sub = await bus.nc.subscribe(f"parley.cmd.gateway.{call.call_id}.*", cb=clear)
    try:
        turn = await agent_begins(call, "t1", "Your table is booked", "for Friday at seven.",
                                  "We look forward", "to seeing you.")
        await caught_up(call, 0.6, speech=True)
        await call.session._on_stt(Final("Wait, stop.", speech_final=False))
        await caught_up(call, 0.2)
        assert turn.audio.cut_frames is None and not turn.interrupted
        assert [subject for subject in clears if subject.endswith(".clear")] == []
        events = await published(call)
        assert [e for e in events if isinstance(e, AgentSpeechInterrupted)] == []
    finally:
        await call.close()
        await sub.unsubscribe()


async def test_a_backchannel_a_successor_catches_up_on_is_not_judged_by_the_agent_now(
        bus) -> None:
    # The caller's "Okay." from before the take-over, heard again in the catch-up while the
    # successor's agent audio plays: whether the agent was speaking when it was said is not
    # known from the playback of now. It was dropped as a backchannel over the agent; it is
    # judged as said over silence (a turn, after a backchannel's longer silence).
    call = Call(bus, "call-barge-in-catch-up-2", QUIET_CALLER)
    sub = await gateway(call, [])
    try:
        await agent_begins(call, "t1", "Let me check that for you.", last=False)
        await caught_up(call, 0.4, speech=True)
        await call.session._on_stt(Final("Okay.", speech_final=True))
        await caught_up(call, 2.0)
        assert call.session.detector.dropped_backchannels == 0
        events = await published(call)
        assert [e.text for e in events if isinstance(e, TurnUserEnded)] == ["Okay."]
    finally:
        await call.close()
        await sub.unsubscribe()


async def test_keys_that_cannot_interrupt_wait_for_the_agent_like_words(bus) -> None:
    # "For sales press 1, for support press 2." Modes speech and none: keys do not barge in,
    # and the caller pressed 1 (then #) over the menu, the brain still writing it. Media cut
    # nothing, but published the turn of keys at once: the brain cancelled the menu's turn for
    # the newer one, and the caller heard it stop mid-sentence. Now the keys wait for the menu
    # to have played, as words do, and go out then.
    for mode in ("speech", "none"):
        call = in_mode(bus, f"call-barge-in-keys-{mode}", mode, keypad_end_key="#")
        sub = await gateway(call, [])
        try:
            turn = await agent_begins(call, "t1", "For sales press 1,", "for support", last=False)
            await presses(call, "1#")
            await call.audio(1.0)
            events = await published(call)
            assert caller_turns(events) == [], mode
            assert not turn.interrupted and turn.audio.cut_frames is None
            await agent_ends(call, "t1", "press 2.", first_seq=2)  # the rest of the menu
            events = await published(call)
            assert caller_turns(events) == [("k1", "1#")], mode
            [keys] = [e for e in events if isinstance(e, TurnUserEnded)]
            assert keys.eou_delay_ms < 1000  # at the end key, not the wait for the agent
            assert [e for e in events if isinstance(e, AgentSpeechInterrupted)] == []
        finally:
            await call.close()
            await sub.unsubscribe()


async def test_words_too_few_to_interrupt_wait_for_the_agent_in_mode_speech(bus) -> None:
    # Mode speech at low sensitivity: two content words interrupt, 700 ms of speech pauses.
    # "Stop." (one word) over the agent's answer paused it, and is no interruption: the agent
    # played on from the cut, but the words were published as a turn as they ended, and the
    # brain cancelled the answer it was still writing for it: cut off after all, by a turn
    # that was not let interrupt.
    # Now a turn that ends over the agent's turn without having interrupted it waits for that
    # turn to have played, whatever the mode.
    call = in_mode(bus, "call-barge-in-speech-low-1", "speech", interruption_sensitivity="low")
    sub = await gateway(call, [])
    try:
        turn = await agent_begins(call, "t1", "Friday at ten is free.", "Friday at two", last=False)
        await call.speech(0.6)  # long enough to pause the agent (with the VAD's hangover)
        await call.session._on_stt(Final("Stop.", speech_final=True))
        await call.audio(1.0)
        assert call.session.turn_no == 1  # the turn has ended ...
        assert turn.audio.cut_frames is not None and not turn.interrupted  # paused
        await in_real_time(call, 2.0)  # no more words: the pause is over after 1.5 s (wall time)
        assert turn.audio.cut_frames is None and not turn.interrupted  # resumed
        events = await published(call)
        assert caller_turns(events) == []  # ... and waits
        await agent_ends(call, "t1", "is free too.", first_seq=2)
        events = await published(call)
        assert caller_turns(events) == [("t1", "Stop.")]
        assert [e for e in events if isinstance(e, AgentSpeechInterrupted)] == []
    finally:
        await call.close()
        await sub.unsubscribe()


async def test_words_that_interrupt_in_mode_speech_go_out_at_once(bus) -> None:
    # The other side of the rule: words enough to interrupt cut the agent off, and the turn
    # they make is published as it ends (the brain answers it now).
    call = in_mode(bus, "call-barge-in-speech-2", "speech", interruption_sensitivity="low")
    sub = await gateway(call, [])
    try:
        turn = await agent_begins(call, "t1", "Friday at ten is free.", "Friday at two", last=False)
        await call.speech(0.4)
        await call.session._on_stt(Final("Stop, not Friday.", speech_final=True))
        await call.audio(1.0)
        assert turn.interrupted
        events = await published(call)
        assert caller_turns(events) == [("t1", "Stop, not Friday.")]
    finally:
        await call.close()
        await sub.unsubscribe()


async def test_a_turn_that_may_interrupt_goes_out_while_the_agent_is_silent_in_its_turn(
        bus) -> None:
    # "Let me check that for you." has played and the agent's tools are slow: it is silent
    # within its turn, its last clause still to come. Barge-in acts on audio the caller hears,
    # so "Actually, make it Saturday instead." (mode speech: words enough to interrupt) or a
    # key (mode dtmf) cut nothing, and the hold kept them until the agent's turn had played:
    # the caller's change of mind waited for an answer to what they no longer asked. Words or
    # keys that would have interrupted the agent audible go out at once; in modes where they
    # may not interrupt they still wait.
    cases = [("speech", "Actually, make it Saturday instead.", False),
             ("dtmf", "1#", False), ("none", "Actually, make it Saturday instead.", True),
             ("speech", "1#", True)]
    for n, (mode, said, held) in enumerate(cases):
        call = in_mode(bus, f"call-barge-in-silent-{n}", mode, keypad_end_key="#")
        try:
            await call.agent_says("t1", "Let me check that for you.", last=False)
            turn = call.session._turns["t1"]
            await echo(call, "t1", mark_seq(0, len(turn.audio.frames)))
            await asyncio.sleep(len(turn.audio.frames) * 0.02 + 0.05)  # its words have played
            if said == "1#":
                await presses(call, said)
                await call.audio(0.5)
            else:
                await spoken_over(call, said)
            assert bool(call.session._held_turns) is held, (mode, said)
            events = await published(call)
            ended = [e.text for e in events if isinstance(e, TurnUserEnded)]
            assert ended == ([] if held else [said]), (mode, said)
        finally:
            await call.close()


async def test_a_turn_held_for_an_agent_turn_that_never_ends_goes_out_after_a_while(bus) -> None:
    # The agent said "Let me check that for you." and its turn's last clause never came (the
    # brain instance running it died and nothing redelivered it, or the synthesiser stuck).
    # The caller's "Hello? Are you still there?" was held until that turn had played: for
    # ever. Now, once the agent has been silent within its turn for HOLD_QUIET_S of the
    # call's audio, the turn goes out (logged and counted).
    from parley.media.session import HOLD_QUIET_S

    call = in_mode(bus, "call-barge-in-none-4", "none")
    expired: list[int] = []
    call.session.s.on_hold_expired = lambda: expired.append(1)
    try:
        await call.agent_says("t1", "Let me check that for you.", last=False)
        turn = call.session._turns["t1"]
        await echo(call, "t1", mark_seq(0, len(turn.audio.frames)))  # its words have played
        await spoken_over(call, "Hello? Are you still there?")
        assert call.session._held_turns  # the agent mid-turn: held
        await call.audio(HOLD_QUIET_S - 2.0)
        assert call.session._held_turns and expired == []  # a slow tool: still waited for
        await call.audio(2.5)
        assert not call.session._held_turns and expired == [1]
        events = await published(call)
        assert caller_turns(events) == [("t1", "Hello? Are you still there?")]
        await spoken_over(call, "Hello?")  # that agent turn given up on: not waited for again
        assert not call.session._held_turns and expired == [1]
    finally:
        await call.close()


async def test_a_turn_held_for_an_agent_turn_whose_marks_are_never_echoed_goes_out(bus) -> None:
    # Mode none; the carrier never echoes the agent's marks (a Plivo account without
    # playedStream, a gateway bug, an echo lost). The caller's "Can you also check Saturday?"
    # over the agent's answer was held until that answer had played, known by its last mark's
    # echo: the agent counted as speaking while any audio sent was unechoed, the hold's quiet
    # bound never ran, and the turn was never published (nor the agent's turn done with). Now
    # audio sent has played by its own length and ECHO_GRACE_S after it was sent: the turn
    # goes out then, and the agent's turn is over as heard.
    from parley.media.playback import ECHO_GRACE_S

    call = in_mode(bus, "call-barge-in-none-no-echo", "none")
    try:
        await call.agent_says("t1", *["Friday at ten is free."] * 10)  # 1 s of audio
        sent_at = time.monotonic()
        turn = call.session._turns["t1"]
        await spoken_over(call, "Can you also check Saturday?")
        assert call.session._held_turns  # the agent's answer is playing: held
        bound_s = turn.audio.duration_ms / 1000 + ECHO_GRACE_S
        while call.session._held_turns and time.monotonic() - sent_at < bound_s + 10:
            await call.audio(0.1)  # the caller's audio keeps coming, in real time
            await asyncio.sleep(0.1)
        released_after_s = time.monotonic() - sent_at
        assert not call.session._held_turns, "the held turn never went out"
        assert released_after_s < bound_s + 3.0  # (a slow, shared machine: some slack)
        events = await published(call)
        assert caller_turns(events) == [("t1", "Can you also check Saturday?")]
        assert turn.audio.echoes_lost and not call.session._agent_mid_turn()
    finally:
        await call.close()


async def test_a_turn_held_while_the_agent_keeps_talking_is_not_let_out_early(bus) -> None:
    # The bound counts the agent's silence within its turn, not the hold: an agent that says
    # more (a long answer in many clauses) is still speaking, and the turn waits for it.
    from parley.media.session import HOLD_QUIET_S

    call = in_mode(bus, "call-barge-in-none-5", "none")
    call.session.s.on_hold_expired = lambda: None
    try:
        turn = await agent_begins(call, "t1", "First,", last=False)
        await spoken_over(call, "And then?")
        seq = 1
        for _ in range(round(HOLD_QUIET_S)):  # a clause every second of audio
            await call.audio(1.0)
            await call.agent_says("t1", "and more,", first_seq=seq, last=False)
            seq += 1
        assert call.session._held_turns
        await call.agent_says("t1", "done.", first_seq=seq)
        await call.played("t1")
        await call.audio(0.1)
        assert not call.session._held_turns
        assert turn.audio.finished
    finally:
        await call.close()


async def test_an_answer_queued_behind_the_agent_turn_still_playing_is_not_given_up(bus) -> None:
    # Mode none: the caller spoke over a long answer, synthesised faster than real time and so
    # all sent while most of it was still to play; the reply to the caller went out right
    # after it, queued at the carrier behind it. An unechoed turn stops counting as playing its
    # own length and ECHO_GRACE_S after it was sent, and the reply's own length was counted
    # from when it was sent, not from when the audio ahead of it will have played: it was
    # taken as played (echoes lost) while the caller had not heard a word of it, and stopped
    # counting as the agent speaking.
    from parley.media.playback import ECHO_GRACE_S

    call = in_mode(bus, "call-barge-in-none-queued", "none")
    try:
        first = await agent_begins(call, "t1", *["Friday at ten is free."] * 60)
        await wait_for(lambda: first.spoken and first.audio.sent == len(first.audio.frames))
        await call.agent_says("t2", *["And Saturday too."] * 5)
        reply = call.session._turns["t2"]
        await wait_for(lambda: reply.spoken and reply.audio.text_done
                       and reply.audio.sent == len(reply.audio.frames))
        sent_at = time.monotonic()
        ahead_s = (first.audio.sent * FRAME_MS - first.audio.position_ms(sent_at)) / 1000
        own_bound_s = reply.audio.duration_ms / 1000 + ECHO_GRACE_S
        assert ahead_s > own_bound_s + 1.0, (ahead_s, own_bound_s)  # (the set-up, as meant)
        await in_real_time(call, own_bound_s + 0.5)  # the first answer still playing
        assert not reply.audio.echoes_lost and reply.audio.playing(time.monotonic())
    finally:
        await call.close()


async def test_a_held_turn_revised_by_its_late_words_goes_out_before_its_interruption(
        bus) -> None:
    # Mode none: the caller spoke over the agent's t0, and their turn ended at max wait on a
    # stale partial ("I would like"): held for t0 to play. The recogniser's late words then
    # revised it. The revision stops the answer to the old turn, and media published that
    # answer's agent.speech.interrupted at once, though the turn it answers was still held:
    # the call's events had t1 interrupted before t1 had ended. Now the interruption waits
    # for the turn: t1, its interruption, then t2 revising it, once t0 has played.
    call = in_mode(bus, "call-barge-in-none-revised", "none")
    try:
        await agent_begins(call, "t0", "Thanks for calling the clinic.", "How can I",
                           last=False)
        await call.speech(0.6)
        await call.session._on_stt(Partial("I would like"))
        # the brain prepares a reply to those words; it would play once the turn is out
        await call.session._on_prepared(AgentReplyPrepared(
            org_id=ORG, call_id=call.call_id, turn_id="t1", words="i would like",
            text="Sure, what would you like?", last=True))
        await call.audio(3.0)  # past the max wait: the turn ends on the partial, held
        [held] = call.session._held_turns
        assert held.turn_id == "t1" and held.prepared is not None
        await call.session._on_stt(Final("I would like to book an appointment on Friday.",
                                         speech_final=True))
        await call.audio(0.1)
        assert call.session.turn_no == 2  # revised (and held behind t1)
        await agent_ends(call, "t0", "help you today?", first_seq=2)
        events = [e for e in await published(call) if isinstance(
            e, TurnUserEnded | AgentSpeechInterrupted)]
        assert [(e.type, e.turn_id) for e in events] == [
            ("turn.user_ended", "t1"), ("agent.speech.interrupted", "t1"),
            ("turn.user_ended", "t2")]
        assert isinstance(events[2], TurnUserEnded) and events[2].revises == "t1"
        assert events[2].text == "I would like to book an appointment on Friday."
        assert isinstance(events[1], AgentSpeechInterrupted) and events[1].played_text == ""
        call.session._on_say(AgentSay(org_id=ORG, call_id=call.call_id, turn_id="t1", seq=0,
                                      text="Sure.", last=True))
        assert "t1" not in call.session._turns  # the answer to the old words is never said
        assert held.prepared.discarded and not held.prepared.audio.sent  # nor the prepared one
    finally:
        await call.close()


@contextlib.asynccontextmanager
async def recogniser_failing(call: Call, *, backoff_s: float):
    """The call's recogniser is Deepgram (its emulator, yielded), opened and followed as run()
    does; each reopen after a quick failure waits ``backoff_s``."""
    from parley.devkit.emulators.deepgram import DeepgramEmulator
    from parley.media.providers.deepgram_stt import DeepgramStt
    from parley.media.router import ProviderRouter

    server = DeepgramEmulator(api_key="dg")
    await server.start()
    session = call.session
    session.s.stt = ProviderRouter("stt", {"deepgram": DeepgramStt("dg", base_url=server.base_url)},
                                   ["deepgram"], retry_initial_s=0.01)  # type: ignore[dict-item]
    session._stt_chain = ["deepgram"]
    session.stt_retry_initial_s = session.stt_retry_max_s = backoff_s
    session._stt_name, session._stt = await session.s.stt.open(session._stt_chain,
                                                               session._open_stt)
    session._stt_task = asyncio.create_task(session._recognise())
    try:
        yield server
    finally:
        session.stop("test")
        session._stt_task.cancel()
        await asyncio.gather(session._stt_task, return_exceptions=True)
        await session._close_stt(session._stt)
        await server.stop()


async def until_deaf(call: Call, server, *, backoff_s: float) -> None:
    """Deepgram closes every stream with 1011 at its first audio: the caller's audio comes in
    real time until the session waits ``backoff_s`` before reopening it (no recogniser)."""
    session = call.session
    server.faults.close_with_error = True
    deadline = time.monotonic() + 10
    while not (session._stt_delay_s >= backoff_s and session._stt_lock.locked()):
        assert time.monotonic() < deadline, "the recogniser did not back off"
        await call.audio(0.02)
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def deaf_while_the_agent_talks(bus: Bus, call_id: str, *, backoff_s: float):
    """A call (its gateway standing in) whose agent has begun a long turn, t0, and whose
    recogniser fails every stream until the session waits ``backoff_s`` to reopen it (see
    recogniser_failing, until_deaf): yields the call, the agent's turn and the emulator."""
    call = Call(bus, call_id, QUIET_CALLER)
    sub = await gateway(call, [])
    try:
        async with recogniser_failing(call, backoff_s=backoff_s) as server:
            turn = await agent_begins(call, "t0", *[f"Clause {n}." for n in range(100)])
            await until_deaf(call, server, backoff_s=backoff_s)
            yield call, turn, server
    finally:
        await call.close()
        await sub.unsubscribe()


async def test_the_caller_pauses_the_agent_at_once_while_the_recogniser_backs_off(bus) -> None:
    # Deepgram fails every stream at once (1011), with no fallback: the session waits (0.2 s
    # doubling to 3 s) before reopening it, holding its recognition lock. The caller's frames
    # waited on that lock too, VAD and barge-in included: speech over the agent paused it
    # only once the wait was over, up to 3 s late, the agent talking over the caller. Now the
    # frames go on (their audio reaches the new stream with the open turn's replay), the
    # pause comes on the speech alone, and, no words being able to come, speech that goes on
    # over the paused agent (STT_DOWN_INTERRUPT_MS) interrupts it.
    async with deaf_while_the_agent_talks(bus, "call-barge-in-deaf-1",
                                          backoff_s=3.0) as (call, turn, server):
        started = time.monotonic()
        await call.speech(0.6)
        assert time.monotonic() - started < 1.0  # (before: ~3 s, waiting for the reopen)
        assert turn.audio.cut_frames is not None and not turn.interrupted  # paused
        await call.speech(1.0)  # still talking, no words possible: an interruption
        assert turn.interrupted
        assert call.session._stt_lock.locked()  # (the recogniser still not back)
        events = await published(call)
        assert [e.turn_id for e in events if isinstance(e, AgentSpeechInterrupted)] == ["t0"]


async def test_a_cough_while_no_recogniser_listens_resumes_the_agent_once_one_does(bus) -> None:
    # A cough over the agent pauses it; no words come within 1.5 s, and it resumes. But while
    # the recogniser is down (the wait before reopening it) no words can come: the pause is
    # not taken for a false alarm then, and the 1.5 s count from when a recogniser hears the
    # caller again (the open turn's audio replayed to it): the caller's words, if any, still
    # interrupt, and a cough resumes the agent.
    async with deaf_while_the_agent_talks(bus, "call-barge-in-deaf-2",
                                          backoff_s=3.0) as (call, turn, server):
        await call.speech(0.4)  # a cough
        assert turn.audio.cut_frames is not None
        await in_real_time(call, 1.8)
        assert turn.audio.cut_frames is not None  # not resumed: no words could come
        server.faults.close_with_error = False
        await wait_for(lambda: not call.session._stt_lock.locked(), timeout=5)
        await in_real_time(call, 1.0)
        assert turn.audio.cut_frames is not None and not turn.interrupted  # waiting
        await in_real_time(call, 1.0)
        assert turn.audio.cut_frames is None and not turn.interrupted  # resumed


async def test_a_pause_held_for_a_recogniser_that_does_not_come_back_ends_in_time(
        bus, monkeypatch) -> None:
    # The recogniser may stay down for long (one failing every stream at once is reopened
    # every 3 s until given up after 30 s): the pause is held for it a while only
    # (STT_DOWN_PAUSE_MAX_S, 5 s; 1 s here), then taken for a false alarm as ever.
    from parley.media import session as session_module

    monkeypatch.setattr(session_module, "STT_DOWN_PAUSE_MAX_S", 1.0)
    async with deaf_while_the_agent_talks(bus, "call-barge-in-deaf-3",
                                          backoff_s=5.0) as (call, turn, server):
        await call.speech(0.4)  # a cough
        assert turn.audio.cut_frames is not None
        await in_real_time(call, 1.8)
        assert call.session._stt_lock.locked()  # still no recogniser
        assert turn.audio.cut_frames is None and not turn.interrupted  # resumed
