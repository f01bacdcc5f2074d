import asyncio

import msgspec

from parley.common.configuration import update_agent
from parley.common.events import AgentSay

from .conftest import (
    CALLER,
    MANAGED_AGENT,
    MANAGED_NUMBER,
    ORG,
    closed,
    reconnect_path,
    stream_token,
    wait_for,
)
from .test_media_stream import request


async def send(ws, message: dict) -> None:
    await ws.send_str(msgspec.json.encode(message).decode())


async def receive(ws) -> dict:
    return msgspec.json.decode((await ws.receive(timeout=5)).data)


async def setup_relay(gateway, events):
    call_sid, call_id, _ = await gateway.inbound_call(MANAGED_NUMBER)
    ws = await gateway.ws("/twilio/relay")
    await send(ws, {"type": "setup", "sessionId": "VX" + "1" * 32, "callSid": call_sid,
                    "accountSid": "AC", "from": CALLER, "to": MANAGED_NUMBER,
                    "direction": "inbound", "callType": "PSTN", "customParameters": {
                        "call_id": call_id, "org_id": ORG, "agent_id": MANAGED_AGENT,
                        "stream_token": stream_token(call_id)}})
    await events.wait("call.stream_started", call_id)
    return ws, call_sid, call_id


async def greeted(ws) -> None:
    """Twilio says the welcome greeting (the agent's, "Hi, Acme here.") as the call connects."""
    await info(ws, "agentSpeaking", "on")
    await info(ws, "tokensPlayed", "Hi, Acme here.")
    await info(ws, "agentSpeaking", "off")


async def test_relay_session_bridges_prompts_speech_and_interrupts(gateway, events, bus):
    ws, call_sid, call_id = await setup_relay(gateway, events)
    await greeted(ws)
    [started] = events.of("call.stream_started", call_id)
    assert started.pipeline == "managed" and started.stream_id == "VX" + "1" * 32

    await send(ws, {"type": "prompt", "voicePrompt": "I want to", "lang": "en-US",
                    "last": False})
    await send(ws, {"type": "prompt", "voicePrompt": "I want to book a table.",
                    "lang": "en-US", "last": True})
    [turn] = await events.wait("turn.user_ended", call_id)
    assert turn.text == "I want to book a table." and turn.reason == "prompt"
    [final] = events.of("transcript.final", call_id)
    assert final.text == turn.text
    # The partial prompt is the turn's partial transcript (the brain warms up from it).
    [partial] = events.of("transcript.partial", call_id)
    assert partial.text == "I want to"
    assert partial.utterance_id == final.utterance_id == turn.turn_id

    for seq, (text, last) in enumerate([("Sure.", False), ("For how many people?", True)]):
        await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="turn_a", seq=seq,
                                   text=text, last=last))
    assert await receive(ws) == {"type": "text", "token": "Sure.", "last": False}
    assert await receive(ws) == {"type": "text", "token": " For how many people?",
                                 "last": True}

    await send(ws, {"type": "interrupt", "utteranceUntilInterrupt": "For how",
                    "durationUntilInterruptMs": "460"})
    [interrupted] = await events.wait("agent.speech.interrupted", call_id)
    assert interrupted.turn_id == "turn_a" and interrupted.played_text == "For how"
    assert interrupted.cut_ms == 460

    await send(ws, {"type": "dtmf", "digit": "5"})
    assert (await events.wait("call.dtmf", call_id))[0].digit == "5"
    await send(ws, {"type": "error", "description": "Invalid message received"})
    await wait_for(lambda: gateway.metric("gateway_relay_errors_total") == 1)

    assert await request(bus, call_id, "dtmf", {"digits": "42"}) == {"ok": True}
    assert await receive(ws) == {"type": "sendDigits", "digits": "42"}
    assert (await request(bus, call_id, "mark", {"name": "x"}))["ok"] is False
    assert await request(bus, call_id, "hangup") == {"ok": True}
    end = await receive(ws)
    assert end["type"] == "end"
    assert msgspec.json.decode(end["handoffData"]) == {"reason": "agent_hangup"}
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "agent_hangup"
    await ws.close()
    await asyncio.sleep(0.1)
    assert len(events.of("call.ended", call_id)) == 1


async def test_relay_protocol_errors_close_precisely(gateway, events):
    ws = await gateway.ws("/twilio/relay")
    await send(ws, {"type": "prompt", "voicePrompt": "hi", "last": True})
    assert await closed(ws) == (4404, "prompt before setup")

    ws = await gateway.ws("/twilio/relay")
    await send(ws, {"type": 7})
    code, reason = await closed(ws)
    assert code == 4400 and reason.startswith("invalid message")

    ws, _, _ = await setup_relay(gateway, events)
    await send(ws, {"type": "prompt", "last": True})  # no voicePrompt
    code, reason = await closed(ws)
    assert code == 4400 and "voicePrompt" in reason


async def test_relay_ignores_a_message_of_a_type_we_do_not_know(gateway, events, caplog):
    """Twilio adds message types to ConversationRelay; the socket closed on the first one it
    did not know (4401) and the call dropped. A well-formed message of an unknown type is now
    ignored, before setup as after: counted by type, logged once per socket, and the caller's
    next prompt is still a turn."""
    ws = await gateway.ws("/twilio/relay")
    await send(ws, {"type": "hello", "version": 2})
    await ws.close()
    ws, _, call_id = await setup_relay(gateway, events)
    await send(ws, {"type": "transcriptionUpdate", "text": "I want"})
    await send(ws, {"type": "transcriptionUpdate", "text": "I want a table"})
    await send(ws, {"type": "prompt", "voicePrompt": "A table for two.", "last": True})
    [turn] = await events.wait("turn.user_ended", call_id)
    assert turn.text == "A table for two."
    assert gateway.metric("gateway_unknown_messages_total", protocol="twilio_relay",
                          event="transcriptionUpdate") == 2
    await wait_for(lambda: gateway.metric("gateway_unknown_messages_total",
                                          protocol="twilio_relay", event="hello") == 1)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and "unknown event" in r.getMessage()]
    assert len(warnings) == 2  # once per socket
    assert not ws.closed
    await ws.close()


async def say(bus, call_id: str, turn_id: str, clauses: list[str]) -> None:
    for seq, text in enumerate(clauses):
        await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id=turn_id, seq=seq,
                                   text=text, last=seq == len(clauses) - 1))


async def info(ws, name: str, value: str) -> None:
    await send(ws, {"type": "info", "name": name, "value": value})


async def test_relay_reports_a_goodbye_played_out_so_the_hang_up_need_not_wait(
        gateway, events, bus):
    """'Thanks for calling. Goodbye!' + end_call on a managed call: the tools service hangs up
    on agent.speech.finished of the turn (else after 20 s). The relay never emitted it, so the
    caller stayed on the line ~20 s after the goodbye. Twilio's tokensPlayed / agentSpeaking
    info messages (events="speaker-events tokens-played") now tell it when the turn played out;
    not before its last words have played, and a pause between clauses is no end."""
    ws, _, call_id = await setup_relay(gateway, events)
    await greeted(ws)
    await events.wait("agent.speech.finished", call_id)  # t0
    await info(ws, "roundTripDelayMs", "120")  # a report we do not use is no protocol error
    await say(bus, call_id, "turn_bye", ["Thanks for calling.", "Goodbye!"])
    assert (await receive(ws))["token"] == "Thanks for calling."
    assert await receive(ws) == {"type": "text", "token": " Goodbye!", "last": True}

    await info(ws, "agentSpeaking", "on")
    await info(ws, "tokensPlayed", "Thanks for calling.")
    await info(ws, "agentSpeaking", "off")  # between the clauses: "Goodbye!" is still to come
    await info(ws, "agentSpeaking", "on")
    await info(ws, "tokensPlayed", "Goodbye!")  # reported as played; the audio is still ending
    await send(ws, {"type": "dtmf", "digit": "1"})  # a marker: everything before is handled
    await events.wait("call.dtmf", call_id)
    assert len(events.of("agent.speech.finished", call_id)) == 1

    await info(ws, "agentSpeaking", "off")
    [_, finished] = await events.wait("agent.speech.finished", call_id, count=2, timeout=2)
    assert finished.turn_id == "turn_bye"
    assert not ws.closed


async def test_relay_barge_in_on_the_goodbye_is_an_interruption_not_an_end(
        gateway, events, bus):
    ws, _, call_id = await setup_relay(gateway, events)
    await say(bus, call_id, "turn_bye", ["Thanks for calling.", "Goodbye!"])
    await receive(ws)
    await receive(ws)
    await info(ws, "agentSpeaking", "on")
    await info(ws, "tokensPlayed", "Thanks for calling.")
    await send(ws, {"type": "interrupt", "utteranceUntilInterrupt": "Thanks for calling.",
                    "durationUntilInterruptMs": 900})
    await info(ws, "agentSpeaking", "off")
    [interrupted] = await events.wait("agent.speech.interrupted", call_id)
    assert interrupted.turn_id == "turn_bye"
    assert interrupted.played_text == "Thanks for calling."
    await send(ws, {"type": "dtmf", "digit": "1"})
    await events.wait("call.dtmf", call_id)
    assert events.of("agent.speech.finished", call_id) == []

    # The next turn is followed on its own.
    await say(bus, call_id, "turn_next", ["Sure, go ahead."])
    await receive(ws)
    await info(ws, "agentSpeaking", "on")
    await info(ws, "agentSpeaking", "off")
    await info(ws, "tokensPlayed", "Sure, go ahead.")  # the report after the off: both count
    [finished] = await events.wait("agent.speech.finished", call_id, timeout=2)
    assert finished.turn_id == "turn_next"


async def test_relay_leaves_the_greeting_to_twilios_welcome_greeting(gateway, events, bus):
    """The TwiML gives Twilio the agent's greeting as welcomeGreeting, which it says as the
    caller connects; the brain's greeting (turn t0, on call.stream_started) was sent as text
    too, so a managed call's caller heard it twice."""
    ws, _, call_id = await setup_relay(gateway, events)
    await say(bus, call_id, "t0", ["Thanks for calling Bright Smile Dental!"])
    await events.wait("agent.say", call_id)
    # A caller who talks over the welcome greeting interrupts t0, as on media's pipeline.
    await send(ws, {"type": "interrupt", "utteranceUntilInterrupt": "Thanks for",
                    "durationUntilInterruptMs": "700"})
    [interrupted] = await events.wait("agent.speech.interrupted", call_id)
    assert interrupted.turn_id == "t0"
    await say(bus, call_id, "t1", ["Sure."])
    assert await receive(ws) == {"type": "text", "token": "Sure.", "last": True}  # t0 never sent


async def test_relay_reports_the_welcome_greeting_played_out_as_any_agent_turn(
        gateway, events, bus):
    """Twilio says the agent's greeting (welcomeGreeting, agent turn t0) on its own, and the
    relay followed only the text it sent: the greeting could be interrupted but never got the
    agent.speech.finished every other agent turn gets (and t0 gets on cascading calls), so
    whoever reads the call's events could not tell when the greeting ended. It finishes now by
    the same rule as the others, once Twilio reports it played and stops speaking."""
    ws, call_sid, call_id = await setup_relay(gateway, events)
    await info(ws, "agentSpeaking", "on")
    await info(ws, "tokensPlayed", "Hi, Acme here.")
    await send(ws, {"type": "dtmf", "digit": "1"})  # a marker: everything before is handled
    await events.wait("call.dtmf", call_id)
    assert events.of("agent.speech.finished", call_id) == []  # still speaking
    await info(ws, "agentSpeaking", "off")
    [finished] = await events.wait("agent.speech.finished", call_id, timeout=2)
    assert finished.turn_id == "t0"
    # The brain's greeting comes as t0 too: not sent (Twilio said it), nor finished again.
    await say(bus, call_id, "t0", ["Hi, Acme here."])
    await say(bus, call_id, "t1", ["Sure."])
    assert await receive(ws) == {"type": "text", "token": "Sure.", "last": True}
    await info(ws, "agentSpeaking", "on")
    await info(ws, "tokensPlayed", "Sure.")
    await info(ws, "agentSpeaking", "off")
    await events.wait("agent.speech.finished", call_id, count=2, timeout=2)
    assert [f.turn_id for f in events.of("agent.speech.finished", call_id)] == ["t0", "t1"]


async def test_a_reconnected_relay_follows_no_greeting(gateway, events, bus):
    """A call back on a new socket gets no welcome greeting (the reconnect's TwiML has none):
    the greeting is not followed there, so it neither finishes nor takes the interruption."""
    ws, call_sid, call_id = await setup_relay(gateway, events)
    await ws.close()  # before Twilio said the greeting
    again = await connect(gateway, events, call_sid, call_id, session="2")
    await say(bus, call_id, "t1", ["Sorry, we were cut off."])
    assert (await receive(again))["token"] == "Sorry, we were cut off."
    await info(again, "agentSpeaking", "on")
    await info(again, "tokensPlayed", "Sorry, we were cut off.")
    await info(again, "agentSpeaking", "off")
    [finished] = await events.wait("agent.speech.finished", call_id, timeout=2)
    assert finished.turn_id == "t1"
    await asyncio.sleep(0.1)
    assert [f.turn_id for f in events.of("agent.speech.finished", call_id)] == ["t1"]


async def test_relay_does_not_send_clauses_of_the_turn_the_caller_interrupted(
        gateway, events, bus):
    """The brain cancels a turn only once it sees agent.speech.interrupted, so clauses of it
    can reach the relay after Twilio's interrupt. They were sent as text: the caller heard
    more of the reply they had cut off, and the tracker kept an entry for them that never
    played, which then took the next turn's tokensPlayed reports (its finished came late or
    never). They are now dropped, as media drops them after a barge-in."""
    ws, _, call_id = await setup_relay(gateway, events)
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="turn_a", seq=0,
                               text="Let me check.", last=False))
    assert (await receive(ws))["token"] == "Let me check."
    await info(ws, "agentSpeaking", "on")
    await send(ws, {"type": "interrupt", "utteranceUntilInterrupt": "Let me",
                    "durationUntilInterruptMs": 300})
    await info(ws, "agentSpeaking", "off")
    await events.wait("agent.speech.interrupted", call_id)

    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="turn_a", seq=1,
                               text="Anything else?", last=True))  # sent before the cancel
    await say(bus, call_id, "turn_b", ["Done.", "Anything else?"])
    assert await receive(ws) == {"type": "text", "token": "Done.", "last": False}
    assert await receive(ws) == {"type": "text", "token": " Anything else?", "last": True}
    await info(ws, "agentSpeaking", "on")
    await info(ws, "tokensPlayed", "Done.")
    await info(ws, "tokensPlayed", "Anything else?")
    await info(ws, "agentSpeaking", "off")
    [finished] = await events.wait("agent.speech.finished", call_id, timeout=2)
    assert finished.turn_id == "turn_b"


async def test_relay_credits_an_interruption_to_the_turn_twilio_was_speaking(
        gateway, events, bus):
    """A transfer refused at once: the brain says why (turn_a.1) while Twilio is still saying
    turn_a. The caller's interruption then went to turn_a.1, the last turn sent, so the brain
    overwrote the wrong utterance with the heard text. It now goes to the earliest turn not
    yet reported played in full."""
    ws, _, call_id = await setup_relay(gateway, events)
    await say(bus, call_id, "turn_a", ["Sure.", "Let me transfer you."])
    await say(bus, call_id, "turn_a.1", ["I can't transfer you right now."])
    for _ in range(3):
        await receive(ws)
    await info(ws, "agentSpeaking", "on")
    await info(ws, "tokensPlayed", "Sure.")
    await send(ws, {"type": "interrupt", "utteranceUntilInterrupt": "Sure. Let me",
                    "durationUntilInterruptMs": 900})
    [interrupted] = await events.wait("agent.speech.interrupted", call_id)
    assert interrupted.turn_id == "turn_a" and interrupted.played_text == "Sure. Let me"

    # Once turn_a has all been reported played, what Twilio says is turn_a.1's.
    await say(bus, call_id, "turn_b", ["Okay."])
    await say(bus, call_id, "turn_b.1", ["Sorry, that failed."])
    await receive(ws)
    await receive(ws)
    await info(ws, "tokensPlayed", "Okay.")
    await send(ws, {"type": "interrupt", "utteranceUntilInterrupt": "Sorry",
                    "durationUntilInterruptMs": 200})
    await events.wait("agent.speech.interrupted", call_id, count=2)
    assert events.of("agent.speech.interrupted", call_id)[1].turn_id == "turn_b.1"


async def test_relay_credits_an_interruption_to_the_turn_heard_not_an_earlier_unreported_one(
        gateway, events, bus):
    """A turn whose text Twilio's reports never covered ("$95", said and reported as "ninety
    five dollars") stayed the earliest not played in full, so every later interruption went
    to it: the goodbye the caller cut off ("wait, one more thing") was not interrupted for
    the tools service, which hung up on them after its 20 s wait, and its later clauses were
    still sent. Twilio says what the caller heard of the turn it was saying; that turn it is."""
    ws, _, call_id = await setup_relay(gateway, events)
    await say(bus, call_id, "turn_a", ["That comes to $95."])
    await receive(ws)
    await info(ws, "agentSpeaking", "on")
    await info(ws, "tokensPlayed", "That comes to")
    await info(ws, "tokensPlayed", "ninety five dollars.")
    await info(ws, "agentSpeaking", "off")

    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="turn_b", seq=0,
                               text="Thanks for calling.", last=False))
    assert (await receive(ws))["token"] == "Thanks for calling."
    await info(ws, "agentSpeaking", "on")
    await send(ws, {"type": "interrupt", "utteranceUntilInterrupt": "Thanks for",
                    "durationUntilInterruptMs": 500})
    [interrupted] = await events.wait("agent.speech.interrupted", call_id)
    assert interrupted.turn_id == "turn_b"
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="turn_b", seq=1,
                               text="Goodbye!", last=True))  # before the brain cancels it
    await say(bus, call_id, "turn_c", ["Sure, what is it?"])
    assert await receive(ws) == {"type": "text", "token": "Sure, what is it?", "last": True}


async def test_an_empty_prompt_makes_no_turn(gateway, events, bus):
    """A final prompt with no words became a turn.user_ended with empty text: the brain asked
    the model to answer nothing (Anthropic refuses a blank message with 400)."""
    ws, _, call_id = await setup_relay(gateway, events)
    await send(ws, {"type": "prompt", "voicePrompt": " ", "lang": "en-US", "last": True})
    await send(ws, {"type": "prompt", "voicePrompt": "Hello?", "lang": "en-US", "last": True})
    [turn] = await events.wait("turn.user_ended", call_id)
    assert turn.text == "Hello?"
    await asyncio.sleep(0.1)
    assert [t.text for t in events.of("turn.user_ended", call_id)] == ["Hello?"]
    assert [f.text for f in events.of("transcript.final", call_id)] == ["Hello?"]


# -- keys typed: a caller turn (parley.common.keypad) ------------------------------------------
# Before, a key press on a managed call was only call.dtmf: "enter your order number, then
# press pound" got no answer, as the brain never heard the keys.

async def press(ws, events, call_id: str, keys: str) -> None:
    """The caller types ``keys``; returns once the relay has published each as call.dtmf."""
    count = len(events.of("call.dtmf", call_id))
    for key in keys:
        await send(ws, {"type": "dtmf", "digit": key})
    await events.wait("call.dtmf", call_id, count=count + len(keys))


async def test_keys_typed_become_a_caller_turn_once_the_caller_stops(gateway, events, db):
    await update_agent(db, ORG, MANAGED_AGENT, {"keypad_timeout_ms": 600})
    ws, _, call_id = await setup_relay(gateway, events)
    loop = asyncio.get_running_loop()
    await press(ws, events, call_id, "1")
    await asyncio.sleep(0.2)  # well within the timeout: the next key moves the turn's end on
    last_key = loop.time()  # before it is sent: the relay has it no sooner
    await press(ws, events, call_id, "2")
    [turn] = await events.wait("turn.user_ended", call_id, timeout=3)
    assert loop.time() - last_key >= 0.6
    assert turn.text == "12" and turn.reason == "dtmf" and turn.turn_id.startswith("turn_")
    assert [d.digit for d in events.of("call.dtmf", call_id)] == ["1", "2"]
    assert events.of("transcript.final", call_id) == []  # keys are not speech

    # The next keys are a turn of their own.
    await press(ws, events, call_id, "7")
    [_, second] = await events.wait("turn.user_ended", call_id, count=2, timeout=3)
    assert second.text == "7" and second.turn_id != turn.turn_id


async def test_the_end_key_ends_the_keys_turn_at_once(gateway, events):
    ws, _, call_id = await setup_relay(gateway, events)  # keypad_timeout_ms 2000, end key #
    await press(ws, events, call_id, "12#")
    [turn] = await events.wait("turn.user_ended", call_id, timeout=1)
    assert turn.text == "12#" and turn.reason == "dtmf"


async def test_keypad_input_off_keys_are_no_turn_but_still_call_dtmf(gateway, events, db):
    await update_agent(db, ORG, MANAGED_AGENT, {"keypad_timeout_ms": 300})
    ws, _, call_id = await setup_relay(gateway, events)
    await press(ws, events, call_id, "12")
    await events.wait("turn.user_ended", call_id, timeout=3)  # input on: the keys are a turn

    await update_agent(db, ORG, MANAGED_AGENT, {"keypad_input": False})
    ws, _, call_id = await setup_relay(gateway, events)  # the next call: input off
    await press(ws, events, call_id, "12#")
    await asyncio.sleep(0.6)
    assert events.of("turn.user_ended", call_id) == []
    assert [d.digit for d in events.of("call.dtmf", call_id)] == ["1", "2", "#"]


async def test_keys_pending_when_the_call_ends_or_the_socket_closes_make_no_turn(
        gateway, events, bus, db):
    # Long enough for the hang-up to be seen first however loaded the machine.
    await update_agent(db, ORG, MANAGED_AGENT, {"keypad_timeout_ms": 2000})
    ws, _, call_id = await setup_relay(gateway, events)
    await press(ws, events, call_id, "1#")
    await events.wait("turn.user_ended", call_id)
    await press(ws, events, call_id, "2")
    assert await request(bus, call_id, "hangup") == {"ok": True}
    await events.wait("call.ended", call_id)
    await press(ws, events, call_id, "3")  # the socket outlives the call until Twilio closes it
    await asyncio.sleep(2.2)  # "2" (and "3") would have made their turn by now
    assert [t.text for t in events.of("turn.user_ended", call_id)] == ["1#"]

    await update_agent(db, ORG, MANAGED_AGENT, {"keypad_timeout_ms": 500})
    ws, _, call_id = await setup_relay(gateway, events)  # another call
    await press(ws, events, call_id, "4")
    await ws.close()  # and no socket takes the call again (see the next test)
    await asyncio.sleep(1.0)
    assert events.of("turn.user_ended", call_id) == []


async def connect(gateway, events, call_sid: str, call_id: str, *, session: str):
    """A socket for the call, set up (a reconnect: Twilio back through the reconnect URL)."""
    if events.of("call.stream_started", call_id):  # Twilio asks the <Connect action> first
        response = await gateway.post(reconnect_path(call_id),
                                      {"CallSid": call_sid})
        assert "<ConversationRelay" in await response.text()
    ws = await gateway.ws("/twilio/relay")
    await send(ws, {"type": "setup", "sessionId": "VX" + session * 32, "callSid": call_sid,
                    "accountSid": "AC", "from": CALLER, "to": MANAGED_NUMBER,
                    "customParameters": {"call_id": call_id, "org_id": ORG,
                                         "agent_id": MANAGED_AGENT,
                                         "stream_token": stream_token(call_id)}})
    await events.wait("call.stream_started", call_id,
                      count=len(events.of("call.stream_started", call_id)) + 1)
    return ws


async def test_keys_typed_when_the_socket_dropped_go_on_on_the_next_one(
        gateway, events, db):
    # "Enter your account number": 1, 2, the socket drops, Twilio reconnects, 3, #. The keys
    # pending on the dropped socket were lost and the brain was asked about account "3#".
    await update_agent(db, ORG, MANAGED_AGENT, {"keypad_timeout_ms": 1500})
    ws, call_sid, call_id = await setup_relay(gateway, events)
    await press(ws, events, call_id, "5#")  # a turn published before the drop
    await events.wait("turn.user_ended", call_id)
    await press(ws, events, call_id, "12")
    await ws.close()
    again = await connect(gateway, events, call_sid, call_id, session="2")
    await press(again, events, call_id, "3#")
    [first, turn] = await events.wait("turn.user_ended", call_id, count=2, timeout=3)
    assert (first.text, turn.text, turn.reason) == ("5#", "123#", "dtmf")

    # Typed and dropped, nothing more: the turn ends when it would have.
    loop = asyncio.get_running_loop()
    await press(again, events, call_id, "7")
    typed = loop.time()
    await again.close()
    third = await connect(gateway, events, call_sid, call_id, session="3")
    [*_, last] = await events.wait("turn.user_ended", call_id, count=3, timeout=4)
    assert last.text == "7" and 1.4 <= loop.time() - typed < 3
    await asyncio.sleep(0.3)
    assert [t.text for t in events.of("turn.user_ended", call_id)] == ["5#", "123#", "7"]
    assert not third.closed


async def test_an_interruption_after_a_reconnect_counts_what_the_caller_heard_before_it(
        gateway, events, bus):
    """'Let me check the calendar.' played, the socket dropped while the tool ran, and the
    answer after it came on the call's next socket: the caller cut in at 'You're booked' and
    the interruption said they had heard 'You're booked' of the turn, all Twilio's new session
    had said. The brain reads a turn's played text from its start, so it put those words
    where 'Let me check the calendar.' was, before the tool use: the model saw itself claim
    the booking before making it. The new socket now reads what the call's earlier sockets
    sent of the turn from the call's events, and the played text begins with it."""
    ws, call_sid, call_id = await setup_relay(gateway, events)
    await greeted(ws)
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="turn_a", seq=0,
                               text="Let me check the calendar.", last=False))
    assert (await receive(ws))["token"] == "Let me check the calendar."
    await info(ws, "agentSpeaking", "on")
    await info(ws, "tokensPlayed", "Let me check the calendar.")
    await info(ws, "agentSpeaking", "off")
    await ws.close()
    again = await connect(gateway, events, call_sid, call_id, session="2")
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="turn_a", seq=1,
                               text="You're booked for Friday.", last=True))
    assert await receive(again) == {"type": "text", "token": "You're booked for Friday.",
                                    "last": True}
    await info(again, "agentSpeaking", "on")
    await send(again, {"type": "interrupt", "utteranceUntilInterrupt": "You're booked",
                       "durationUntilInterruptMs": 600})
    [interrupted] = await events.wait("agent.speech.interrupted", call_id)
    assert interrupted.turn_id == "turn_a"
    assert interrupted.played_text == "Let me check the calendar. You're booked"


# -- the filler for slow tools: said only if the tools keep the caller waiting ----------------

async def test_the_filler_is_said_only_when_the_tools_are_slow(gateway, events, bus):
    ws, _, call_id = await setup_relay(gateway, events)
    filler = {"turn_id": "t1", "text": "One moment.", "filler_after_ms": 300}
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, seq=0, **filler))
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="t1", seq=1,
                               text="It shipped yesterday.", last=True))  # in time
    assert (await receive(ws))["token"] == "It shipped yesterday."

    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, seq=0,
                               **{**filler, "turn_id": "t2"}))
    sent = asyncio.get_running_loop().time()
    token = await receive(ws)  # nothing else came: the tool is slow
    assert token == {"type": "text", "token": "One moment.", "last": False}
    assert asyncio.get_running_loop().time() - sent >= 0.25
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="t2", seq=1,
                               text="It shipped yesterday.", last=True))
    assert (await receive(ws))["token"] == " It shipped yesterday."
