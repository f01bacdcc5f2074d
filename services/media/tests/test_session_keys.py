"""Key presses as caller input: the keys a caller types become a turn of their own (``k<n>``).

The session is driven by its inbound audio (the audio clock, as live) and the call's events;
what it emits is read back from the EVENTS stream.
"""

from __future__ import annotations

import time

from parley.common.bus import Bus
from parley.common.configuration.models import AgentSettings
from parley.common.events import CallDtmf, Event, TurnUserEnded
from parley.media.router import ProviderRouter
from parley.media.session import CallSession, SessionServices
from parley.media.turns import TurnEnd

ORG = "acme"
SILENCE = b"\xff" * 160
KEYS = AgentSettings(greeting="", idle_prompt_s=0, idle_hangup_s=0, keypad_timeout_ms=1000)


class Call:
    def __init__(self, bus: Bus, call_id: str, settings: AgentSettings = KEYS) -> None:
        services = SessionServices(
            bus=bus, leases=None,  # type: ignore[arg-type]  # run() is not called
            stt=ProviderRouter("stt", {"never": object()}, ["never"]),  # type: ignore[dict-item]
            tts=ProviderRouter("tts", {"never": object()}, ["never"]),  # type: ignore[dict-item]
            instance="test")
        self.bus, self.call_id = bus, call_id
        self.session = CallSession(services, call_id=call_id, org_id=ORG, agent_id="agent",
                                   settings=settings, revision=1)
        self.session._history = None  # the call's past events are read
        self.seq = 0

    async def audio(self, seconds: float) -> None:
        for _ in range(round(seconds * 50)):
            self.seq += 1
            await self.session._on_audio(SILENCE, self.seq, self.seq * 20, time.time(), False)

    async def press(self, *keys: str) -> None:
        for key in keys:
            await self.session._on_event(CallDtmf(org_id=ORG, call_id=self.call_id, digit=key))

    async def events(self) -> list[Event]:
        await self.session._outbox.drain(2)
        return await self.bus.replay_call(self.call_id, org_id=ORG)

    async def turns(self) -> list[tuple[str, str, str]]:
        return [(e.turn_id, e.text, e.reason) for e in await self.events()
                if isinstance(e, TurnUserEnded)]


async def take_over(bus: Bus, call_id: str) -> Call:
    """A successor's session, having read the call's past events (as its run() does)."""
    successor = Call(bus, call_id)
    successor.session._history = {}
    for event in await bus.replay_call(call_id, org_id=ORG):
        successor.session._catch_up(event)
    await successor.session._caught_up()
    return successor


async def test_keys_end_their_turn_when_the_caller_stops_typing(bus) -> None:
    call = Call(bus, "call-keys-1")
    await call.audio(0.2)
    await call.press("1")
    await call.audio(0.5)
    await call.press("2")
    await call.audio(0.98)  # 1 s after the last key, less a frame: still typing
    assert await call.turns() == []
    await call.audio(0.02)
    assert await call.turns() == [("k1", "12", "dtmf")]
    [turn] = [e for e in await call.events() if isinstance(e, TurnUserEnded)]
    assert turn.eou_delay_ms == 1000
    await call.audio(2)
    assert await call.turns() == [("k1", "12", "dtmf")]  # once
    # The turn awaits its answer (no idle prompt meanwhile, as for a spoken turn).
    assert call.session._idle_state.unanswered == "k1"


async def test_the_end_key_ends_the_turn_at_once(bus) -> None:
    call = Call(bus, "call-keys-2")
    await call.audio(0.1)
    await call.press("4", "2", "#")
    assert await call.turns() == [("k1", "42#", "dtmf")]
    await call.press("#")  # alone: "repeat that", say
    await call.audio(2)
    assert await call.turns() == [("k1", "42#", "dtmf"), ("k2", "#", "dtmf")]


async def test_a_key_press_delivered_twice_is_one_press(bus) -> None:
    """nats-server killed for 8 s (a chaos run): the caller typed 1 2 # meanwhile, and the
    gateway, their acks lost, published them again under their ids. JetStream stored each
    once, but the session's live subscription got both copies and made two turns of "12#"
    (k1, then k2 80 ms later), the second cancelling the brain's answer to the first."""
    call = Call(bus, "call-keys-twice")
    await call.audio(0.1)
    presses = [CallDtmf(org_id=ORG, call_id=call.call_id, digit=key) for key in "12#"]
    for press in presses + presses:
        await call.session._on_event(press)
    await call.audio(2)
    assert await call.turns() == [("k1", "12#", "dtmf")]


async def test_keys_are_no_turn_when_the_agent_takes_no_keypad_input(bus) -> None:
    call = Call(bus, "call-keys-3", AgentSettings(greeting="", keypad_input=False))
    await call.audio(0.1)
    await call.press("1", "#")
    await call.audio(3)
    assert await call.turns() == []


async def test_spoken_turns_keep_their_numbers_around_turns_of_keys(bus) -> None:
    call = Call(bus, "call-keys-4")
    await call.session._end_turn(TurnEnd("I'd like to pay my bill.", "silence", 0, 0, 0, 0))
    await call.press("9", "9", "#")
    await call.session._end_turn(TurnEnd("Did that work?", "silence", 0, 0, 0, 0))
    assert await call.turns() == [("t1", "I'd like to pay my bill.", "silence"),
                                  ("k1", "99#", "dtmf"), ("t2", "Did that work?", "silence")]


async def test_a_successor_publishes_keys_its_predecessor_saw_end_and_numbers_on(bus) -> None:
    call = Call(bus, "call-keys-5")
    await call.audio(0.1)
    await call.press("1", "#")  # k1, published
    await call.session._outbox.drain(2)
    # The predecessor stores the caller's next keys, then dies before its turn is published.
    for key in "57#":
        await bus.publish(CallDtmf(org_id=ORG, call_id=call.call_id, digit=key))
    successor = await take_over(bus, call.call_id)
    assert await successor.turns() == [("k1", "1#", "dtmf"), ("k2", "57#", "dtmf")]

    # A third session reading all of that publishes nothing again, and goes on from k3.
    third = await take_over(bus, call.call_id)
    await third.audio(2)
    await third.press("0", "#")
    assert [t[0] for t in await third.turns()] == ["k1", "k2", "k3"]


async def test_keys_a_predecessor_heard_still_being_typed_end_with_the_successors_audio(
        bus) -> None:
    call = Call(bus, "call-keys-6")
    for key in "31":
        await bus.publish(CallDtmf(org_id=ORG, call_id=call.call_id, digit=key))
    successor = await take_over(bus, call.call_id)
    assert await successor.turns() == []
    await successor.audio(1.2)
    assert await successor.turns() == [("k1", "31", "dtmf")]


async def test_keys_being_typed_at_a_take_over_are_not_cut_in_two(bus) -> None:
    # The caller types 3, 1 while the instance serving the call dies. Its successor resumes at
    # the frame the lease names, a minute into the call (the call's audio clock), and catches up
    # the audio sent since: the keys were placed at 0 on its clock, so their turn ended with
    # the first frame, and the caller's "314#" reached the brain as "31", then "4#".
    from datetime import UTC, datetime

    call = Call(bus, "call-keys-7")
    now = time.time()
    await bus.publish(CallDtmf(org_id=ORG, call_id=call.call_id, digit="3",
                               at=datetime.fromtimestamp(now - 2.0, UTC)))
    successor = await take_over(bus, call.call_id)
    sent = now - 3.0  # the resume frame: sent 3 s ago, 60 s into the call
    for i in range(150):  # the 3 s of audio since, read from the stream (behind)
        if i == 75:  # the caller presses 1 while the successor is still catching up
            await successor.press("1")
        await successor.session._on_audio(SILENCE, i + 1, 60_000 + i * 20, sent + i * 0.02,
                                          True)
    assert await successor.turns() == []  # the caller is still typing
    await successor.press("4", "#")
    assert await successor.turns() == [("k1", "314#", "dtmf")]


async def test_a_caller_typing_keys_is_not_asked_whether_they_are_there(bus) -> None:
    # An agent that waits 5 s for the next key and prompts after 0.5 s of silence: the caller
    # looking for their card between two digits is busy, not silent.
    patient = AgentSettings(greeting="", idle_prompt_s=0.5, idle_hangup_s=0,
                            keypad_timeout_ms=5000)
    call = Call(bus, "call-keys-idle", patient)
    await call.audio(0.1)
    await call.press("1")
    await call.audio(4.9)
    assert call.session._idle_state.idle_count == 0
    await call.audio(0.1)
    assert await call.turns() == [("k1", "1", "dtmf")]
    assert call.session._idle_state.idle_count == 0  # the turn now awaits its answer


async def test_keys_typed_after_a_turn_its_predecessor_published_late_stay_pending(bus) -> None:
    # The caller typed "12", paused, and typed "3" just as the predecessor's turn of "12" was
    # being stored (stored after the "3"); then it died. The "3" begins the next turn.
    call = Call(bus, "call-keys-late")
    for key in "123":
        await bus.publish(CallDtmf(org_id=ORG, call_id=call.call_id, digit=key))
    await bus.publish(TurnUserEnded(org_id=ORG, call_id=call.call_id, turn_id="k1", text="12",
                                    reason="dtmf"))
    successor = await take_over(bus, call.call_id)
    await successor.audio(1.2)
    assert await successor.turns() == [("k1", "12", "dtmf"), ("k2", "3", "dtmf")]


async def test_keys_typed_after_an_unpublished_turn_of_keys_still_make_their_turn(bus) -> None:
    # The predecessor saw "1#" end a turn but died before publishing it; the caller had typed
    # "5" since. The successor publishes k1, and the "5" still ends its own turn when due.
    call = Call(bus, "call-keys-unsent-then")
    for key in "1#5":
        await bus.publish(CallDtmf(org_id=ORG, call_id=call.call_id, digit=key))
    successor = await take_over(bus, call.call_id)
    await successor.audio(1.2)
    assert await successor.turns() == [("k1", "1#", "dtmf"), ("k2", "5", "dtmf")]


async def test_keys_typed_before_the_callers_words_end_their_turn_come_after_them(
        bus) -> None:
    # "My account number is", then 1234# before the endpointing silence is out: the keys
    # wait for the spoken turn, so the model reads the words, then the keys, as they came.
    call = Call(bus, "call-keys-after-words")
    await call.audio(0.2)
    detector = call.session.detector
    detector.speech_started(call.session.audio_ms)
    await call.audio(1.0)
    detector.final("my account number is", call.session.audio_ms)
    detector.speech_stopped(call.session.audio_ms)
    await call.press("1", "2", "3", "4", "#")
    await call.audio(0.3)
    assert await call.turns() == []  # the words' turn is still open: the keys wait for it
    await call.audio(0.4)  # the endpointing silence (600 ms) is out
    assert await call.turns() == [("t1", "my account number is", "silence"),
                                  ("k1", "1234#", "dtmf")]
    [_, keys] = [e for e in await call.events() if isinstance(e, TurnUserEnded)]
    assert keys.eou_delay_ms >= 600  # from the last key to the turn, the wait included
    assert call.session._idle_state.unanswered == "k1"

    # With no words heard (a noise, or the keys' own tones), the keys do not wait.
    detector.speech_started(call.session.audio_ms)
    await call.press("9", "#")
    assert (await call.turns())[-1] == ("k2", "9#", "dtmf")
