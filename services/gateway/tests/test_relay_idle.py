"""Idle handling on managed (ConversationRelay) calls: the bridge counts the caller's silence.

Before, media's idle clock was the only one, and media does not serve managed calls: a caller
who went silent (or a line left open) on a managed call kept it, and its bill, open until
``max_duration_s`` (30 min by default).
"""

import asyncio

from parley.common.configuration import AgentSettings, update_agent
from parley.common.events import TurnCompleted
from parley.gateway.twilio.relay_idle import SPOKEN_CHARS_PER_S, RelayIdle

from .conftest import MANAGED_AGENT, MANAGED_NUMBER, ORG
from .test_media_stream import request
from .test_relay import connect, info, receive, say, send

PROMPT_S, HANGUP_S = 0.6, 1.5


def run(idle: RelayIdle, start: float, end: float) -> list[tuple[float, str]]:
    """Tick every 250 ms (as the session does) from ``start`` to ``end``: what came due, when.

    The time up to a tick counts as silence if nothing is going on at the tick, so what is due
    comes up to one tick early.
    """
    due, now = [], start
    while now <= end + 1e-9:
        action = idle.tick(now)
        if action is not None:
            due.append((round(now, 2), action))
        now += 0.25
    return due


def test_agent_text_holds_the_count_for_as_long_as_it_takes_to_say() -> None:
    idle = RelayIdle(AgentSettings(idle_prompt_s=1.0, idle_hangup_s=0))
    idle.agent_text("t1", "x" * 24, now=0.0)  # 2 s to say at 12 characters a second
    assert 24 / SPOKEN_CHARS_PER_S == 2.0
    assert idle.busy(1.9) and not idle.busy(2.0)
    assert run(idle, 0.0, 5.0) == [(2.75, "prompt")]


def test_twilio_saying_it_stopped_ends_the_estimate_and_speaking_holds_the_count() -> None:
    idle = RelayIdle(AgentSettings(idle_prompt_s=1.0, idle_hangup_s=0))
    idle.agent_text("t1", "x" * 120, now=0.0)  # 10 s by the estimate
    idle.agent_speaking_changed(True, all_played=False, now=0.2)
    assert run(idle, 0.0, 2.5) == []
    idle.agent_speaking_changed(False, all_played=True, now=2.75)  # said faster: over now
    assert not idle.busy(2.75)
    assert run(idle, 2.75, 5.0) == [(3.5, "prompt")]
    # Not all of it played (Twilio paused between clauses): the estimate still holds.
    idle = RelayIdle(AgentSettings(idle_prompt_s=1.0, idle_hangup_s=0))
    idle.agent_text("t1", "x" * 36, now=0.0)  # 3 s
    idle.agent_speaking_changed(False, all_played=False, now=1.0)
    assert run(idle, 0.0, 5.0) == [(3.75, "prompt")]
    # Speaking "on" holds the count however long it lasts.
    idle = RelayIdle(AgentSettings(idle_prompt_s=1.0, idle_hangup_s=0))
    idle.agent_speaking_changed(True, all_played=True, now=0.0)
    assert run(idle, 0.0, 30.0) == []


def test_an_idle_turns_words_pause_the_count_and_other_agent_text_restarts_it() -> None:
    idle = RelayIdle(AgentSettings(idle_prompt_s=1.0, idle_hangup_s=3.0))
    assert run(idle, 0.0, 1.0) == [(1.0, "prompt")]
    idle.state.next_idle_turn()
    idle.agent_text("i0", "x" * 12, now=1.0)  # 1 s, not counted
    assert run(idle, 1.25, 4.0) == [(3.75, "hangup")]  # 3 s of silence besides the prompt
    idle.agent_text("t2", "Sure.", now=4.0)
    assert idle.state.clock.silent_ms == 0
    idle.caller_active()
    idle.client_speaking_changed(True)
    assert idle.busy(10.0)


async def quick_idle(db) -> None:
    await update_agent(db, ORG, MANAGED_AGENT, {"idle_prompt_s": PROMPT_S,
                                                "idle_hangup_s": HANGUP_S})


async def setup(gateway, events, *, session: str = "1"):
    """A managed call's socket, set up; the welcome greeting ("Hi, Acme here.") has played."""
    call_sid, call_id, _ = await gateway.inbound_call(MANAGED_NUMBER)
    ws = await connect(gateway, events, call_sid, call_id, session=session)
    await play(ws, "Hi, Acme here.")
    return ws, call_sid, call_id


async def play(ws, text: str) -> None:
    """Twilio says ``text`` (sent to it) and reports it."""
    await info(ws, "agentSpeaking", "on")
    await info(ws, "tokensPlayed", text)
    await info(ws, "agentSpeaking", "off")


async def test_a_silent_caller_on_a_managed_call_is_prompted_then_hung_up_on(
        gateway, events, bus, db):
    await quick_idle(db)
    ws, _, call_id = await setup(gateway, events)
    [prompt] = await events.wait("caller.idle", call_id, timeout=3)
    assert prompt.turn_id == "i0" and prompt.action == "prompt"
    assert PROMPT_S <= prompt.silent_s < PROMPT_S + 0.5

    # The brain says the agent's idle_prompt in turn i0; Twilio says it.
    await say(bus, call_id, "i0", ["Are you still there?"])
    assert (await receive(ws))["token"] == "Are you still there?"
    await play(ws, "Are you still there?")
    await events.wait("agent.speech.finished", call_id)
    [_, hang_up] = await events.wait("caller.idle", call_id, count=2, timeout=3)
    assert hang_up.turn_id == "i1" and hang_up.action == "hangup"
    assert HANGUP_S <= hang_up.silent_s < HANGUP_S + 0.5
    assert not ws.closed


async def test_no_idle_while_a_caller_turn_waits_for_its_answer_and_speech_starts_it_over(
        gateway, events, bus, db):
    await quick_idle(db)
    ws, _, call_id = await setup(gateway, events)
    await send(ws, {"type": "prompt", "voicePrompt": "What are your hours?", "last": True})
    [turn] = await events.wait("turn.user_ended", call_id)
    await asyncio.sleep(PROMPT_S + 0.6)  # a slow tool: the brain has not answered
    assert events.of("caller.idle", call_id) == []

    await say(bus, call_id, turn.turn_id, ["We open at nine."])
    assert (await receive(ws))["token"] == "We open at nine."
    await bus.publish(TurnCompleted(org_id=ORG, call_id=call_id, turn_id=turn.turn_id))
    await info(ws, "agentSpeaking", "on")
    await asyncio.sleep(PROMPT_S + 0.4)  # Twilio is still saying it
    assert events.of("caller.idle", call_id) == []
    await info(ws, "tokensPlayed", "We open at nine.")
    await info(ws, "agentSpeaking", "off")
    # The caller starts to speak, then stops without a prompt (a cough): the count restarts.
    await asyncio.sleep(PROMPT_S / 2)
    await info(ws, "clientSpeaking", "on")
    await asyncio.sleep(PROMPT_S + 0.2)
    assert events.of("caller.idle", call_id) == []
    await info(ws, "clientSpeaking", "off")
    [prompt] = await events.wait("caller.idle", call_id, timeout=3)
    assert prompt.turn_id == "i0" and prompt.silent_s < PROMPT_S + 0.5


async def test_a_reconnected_socket_goes_on_with_the_calls_idle_turns(
        gateway, events, bus, db):
    """The n-th caller.idle has the same id on any socket: a reconnect that counted from i0
    again was dropped as a repeat (its prompt never said)."""
    await quick_idle(db)
    ws, call_sid, call_id = await setup(gateway, events)
    await events.wait("caller.idle", call_id, timeout=3)  # i0, the prompt
    await ws.close()
    again = await connect(gateway, events, call_sid, call_id, session="2")
    await send(again, {"type": "prompt", "voicePrompt": "Sorry, I'm back.", "last": True})
    [turn] = await events.wait("turn.user_ended", call_id)
    await bus.publish(TurnCompleted(org_id=ORG, call_id=call_id, turn_id=turn.turn_id))
    [_, prompt] = await events.wait("caller.idle", call_id, count=2, timeout=3)
    assert prompt.turn_id == "i1" and prompt.action == "prompt"
    assert prompt.id != events.of("caller.idle", call_id)[0].id


async def test_idle_off_means_no_idle_events(gateway, events, bus, db):
    await update_agent(db, ORG, MANAGED_AGENT, {"idle_prompt_s": 0, "idle_hangup_s": 0})
    ws, _, call_id = await setup(gateway, events)
    await asyncio.sleep(1.0)
    assert events.of("caller.idle", call_id) == []
    assert not ws.closed


async def test_nothing_is_due_once_the_call_has_ended(gateway, events, bus, db):
    """The socket outlives call.ended until Twilio closes it (the session's end, the REST
    hang-up): a caller.idle of an ended call would have the brain say goodbye to nobody."""
    await quick_idle(db)
    ws, _, call_id = await setup(gateway, events)
    assert await request(bus, call_id, "hangup") == {"ok": True}
    assert (await receive(ws))["type"] == "end"
    await events.wait("call.ended", call_id)
    await asyncio.sleep(PROMPT_S + 0.6)
    assert events.of("caller.idle", call_id) == []


async def test_a_socket_that_cannot_read_the_calls_past_counts_no_idle(
        gateway, events, bus, db, caplog):
    """Unread, the call's idle turns so far are unknown: a reconnect numbering from i0 again
    gave its caller.idle the id of one already stored, which JetStream dropped unheard (the
    caller was never prompted, the relay believed it had). Reading is tried three times; if it
    still fails, this socket does no idle handling (max_duration_s still ends the call)."""
    await quick_idle(db)
    replay, attempts = bus.replay, []

    def failing_replay(*args, **kwargs):
        attempts.append(args)
        raise ConnectionError("nats: timeout")

    bus.replay = failing_replay
    try:
        ws, _, call_id = await setup(gateway, events)
        await asyncio.sleep(PROMPT_S + 1.5)
    finally:
        bus.replay = replay
    assert len(attempts) == 3
    assert events.of("caller.idle", call_id) == []
    assert "no idle handling on this socket" in caplog.text
    assert not ws.closed


async def test_a_socket_the_call_has_left_counts_no_more(gateway, make_gateway, events, db):
    """A call reconnected to a socket on another instance while the old one, its peer gone
    without a close, is not yet taken for dead (10-15 s): the old socket's idle clock ran on,
    blind to the caller speaking on the new one, and prompted them mid-sentence."""
    await quick_idle(db)
    old, call_sid, call_id = await setup(gateway, events)
    other = await make_gateway()  # another instance
    new = await connect(other, events, call_sid, call_id, session="2")
    await info(new, "clientSpeaking", "on")  # the caller talks on and on
    await asyncio.sleep(PROMPT_S + 1.0)
    assert events.of("caller.idle", call_id) == []
    assert not old.closed  # still open on the first instance
    await info(new, "clientSpeaking", "off")
    [prompt] = await events.wait("caller.idle", call_id, timeout=3)  # the new socket's
    assert prompt.turn_id == "i0"


async def test_a_caller_telling_a_long_story_is_not_asked_whether_they_are_there(
        gateway, events, db):
    """The relay heard nothing of a caller mid-utterance but clientSpeaking, if Twilio sends it:
    without, a story longer than idle_prompt_s got "Are you still there?" over it. The TwiML
    asks for partial prompts, and each starts the silence over."""
    await quick_idle(db)
    ws, _, call_id = await setup(gateway, events)
    words = "So the thing is, last week I came in and"
    for count in range(1, 9):  # 8 × 0.2 s of talking, longer than the prompt's 0.6 s
        await send(ws, {"type": "prompt", "voicePrompt": " ".join(words.split()[:count]),
                        "lang": "en-US", "last": False})
        await asyncio.sleep(0.2)
    assert events.of("caller.idle", call_id) == []
    partials = events.of("transcript.partial", call_id)
    assert partials and len({p.utterance_id for p in partials}) == 1


async def test_a_keys_turn_waits_for_its_answer_as_a_spoken_one_does(gateway, events, bus, db):
    """The keys a caller types are a caller turn: no "Are you still there?" while the brain
    looks their order number up."""
    await update_agent(db, ORG, MANAGED_AGENT, {"idle_prompt_s": PROMPT_S,
                                                "idle_hangup_s": HANGUP_S,
                                                "keypad_timeout_ms": 300})
    ws, _, call_id = await setup(gateway, events)
    for key in "42#":
        await send(ws, {"type": "dtmf", "digit": key})
    [turn] = await events.wait("turn.user_ended", call_id)
    assert turn.reason == "dtmf"
    await asyncio.sleep(PROMPT_S + 0.6)  # a slow tool: the brain has not answered
    assert events.of("caller.idle", call_id) == []
    await bus.publish(TurnCompleted(org_id=ORG, call_id=call_id, turn_id=turn.turn_id))
    [prompt] = await events.wait("caller.idle", call_id, timeout=3)
    assert prompt.turn_id == "i0"


async def test_a_caller_typing_keys_is_not_asked_whether_they_are_there(gateway, events, db):
    """An agent that waits longer for the next key than it lets a silence last: the caller
    looking for their card between two digits is busy, not silent."""
    await update_agent(db, ORG, MANAGED_AGENT, {"idle_prompt_s": PROMPT_S,
                                                "idle_hangup_s": HANGUP_S,
                                                "keypad_timeout_ms": 2000})
    ws, _, call_id = await setup(gateway, events)
    await send(ws, {"type": "dtmf", "digit": "4"})
    await asyncio.sleep(PROMPT_S + 0.8)
    assert events.of("caller.idle", call_id) == []
    [turn] = await events.wait("turn.user_ended", call_id, timeout=3)
    assert (turn.reason, turn.text) == ("dtmf", "4")
    assert events.of("caller.idle", call_id) == []  # the turn awaits its answer now
