import asyncio
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from parley.common.configuration import update_agent
from parley.common.events import (
    AgentSay,
    AgentSpeechFinished,
    AgentSpeechInterrupted,
    CallDtmf,
    CallRequested,
    SpeechStarted,
    ToolRequested,
    TurnUserEnded,
)
from parley.common.tools.builtin_specs import offered_builtins
from parley.tools.builtins import KnowledgeQuery, schedule_callback
from parley.tools.call_context import CallContext
from parley.tools.outcomes import ToolError

from .conftest import AGENT, CALLER, ORG, request_tool, start_call


@pytest.fixture
async def gateway(bus):
    """A stand-in for the gateway instance holding the call: records commands, answers ok."""
    received: list[tuple[str, dict]] = []
    refusals: dict[str, str] = {}

    async def on_command(msg):
        verb = msg.subject.rsplit(".", 1)[1]
        received.append((msg.subject, json.loads(msg.data)))
        reply = {"ok": False, "error": refusals[verb]} if verb in refusals else {"ok": True}
        await msg.respond(json.dumps(reply).encode())

    sub = await bus.nc.subscribe("parley.cmd.gateway.*.*", cb=on_command)
    yield received, refusals
    await sub.unsubscribe()


async def test_end_call_sends_hangup_to_the_gateway(bus, service, events, gateway):
    received, _ = gateway
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "end_call")
    done = await events.outcome(request.tool_call_id)
    assert done.type == "tool.completed", done
    assert received == [(f"parley.cmd.gateway.{call_id}.hangup", {"reason": "agent_hangup"})]


async def test_an_idle_hang_up_ends_the_call_with_reason_idle(bus, service, events, gateway):
    # The brain's goodbye to a caller silent for idle_hangup_s: call.ended says why.
    received, _ = gateway
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "end_call", {"reason": "idle"})
    done = await events.outcome(request.tool_call_id)
    assert done.type == "tool.completed", done
    assert received == [(f"parley.cmd.gateway.{call_id}.hangup", {"reason": "idle"})]
    # The model is not offered the argument, and no other reason is accepted.
    assert "reason" not in offered_builtins([])["end_call"].parameters["properties"]
    other = await request_tool(bus, call_id, "end_call", {"reason": "max_duration"})
    failed = await events.outcome(other.tool_call_id)
    assert failed.type == "tool.failed" and "invalid arguments for end_call" in failed.error
    assert len(received) == 1


async def test_a_call_whose_arguments_the_model_garbled_fails_back_to_it(
        bus, service, events, gateway):
    # The model wrote end_call's arguments as no JSON object: the brain requests it with
    # arguments_error, and it fails as arguments that break the schema do (the model reads why
    # in its next round), without hanging up.
    received, _ = gateway
    await service()
    call_id = await start_call(bus)
    request = ToolRequested(org_id=ORG, call_id=call_id, turn_id="t1", tool_call_id="toolu_bad",
                            name="end_call", arguments_error="the arguments are not valid JSON "
                            "(Expecting value: line 1 column 12); you sent: {\"reason\": }")
    await bus.publish(request)
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed", failed
    assert failed.error.startswith("invalid arguments for end_call: the arguments are not valid "
                                   "JSON (Expecting value")
    assert 'you sent: {"reason": }' in failed.error and "call the tool again" in failed.error
    assert received == []


async def test_an_idle_hang_up_the_caller_spoke_over_does_not_happen(
        bus, service, events, gateway):
    # "I'll end the call now. Goodbye!" — "No wait, I'm here!": the caller barged in on the
    # goodbye (agent.speech.interrupted), so the caller is there after all and the call goes on.
    received, _ = gateway
    await service()
    call_id = await start_call(bus)
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="t1", seq=0,
                               text="I'll end the call now. Goodbye!", last=True))
    await bus.publish(AgentSpeechInterrupted(org_id=ORG, call_id=call_id, turn_id="t1",
                                             played_text="I'll end the"))
    idle = await request_tool(bus, call_id, "end_call", {"reason": "idle"})
    failed = await events.outcome(idle.tool_call_id)
    assert failed.type == "tool.failed" and "the call goes on" in failed.error
    assert received == []
    # The model, having heard the caller out, says goodbye again and hangs up in its turn.
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="t2", seq=0,
                               text="Glad you're there. Goodbye!", last=True))
    await bus.publish(AgentSpeechFinished(org_id=ORG, call_id=call_id, turn_id="t2"))
    asked = await request_tool(bus, call_id, "end_call", turn_id="t2")
    assert (await events.outcome(asked.tool_call_id)).type == "tool.completed"
    assert received == [(f"parley.cmd.gateway.{call_id}.hangup", {"reason": "agent_hangup"})]


@pytest.mark.parametrize("tool", ["end_call", "transfer_call"])
async def test_a_hand_off_whose_last_words_the_caller_interrupted_does_not_happen(
        bus, pool, service, events, gateway, tool):
    # "Thanks for calling. Goodbye!" — "Wait, one more thing!": the caller barged in on the
    # model's goodbye (or on "Let me transfer you"), so they are not done: no hang-up, no
    # transfer; the model answers them in their turn and reads why.
    received, _ = gateway
    await allow_transfers(pool, "+14155550123")
    await service()
    call_id = await start_call(bus)
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="t1", seq=0,
                               text="Thanks for calling. Goodbye!", last=True))
    await bus.publish(AgentSpeechInterrupted(org_id=ORG, call_id=call_id, turn_id="t1",
                                             played_text="Thanks for calling."))
    request = await request_tool(bus, call_id, tool,
                                 {"to": "+14155550123"} if tool == "transfer_call" else {})
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed" and "the caller interrupted" in failed.error
    assert not failed.retryable
    assert received == []


@pytest.mark.parametrize("tool", ["end_call", "transfer_call"])
async def test_a_hand_off_whose_round_was_cut_short_by_a_new_turn_does_not_happen(
        bus, pool, service, events, gateway, tool):
    # The brain said "Thanks for calling. Goodbye!", requested the hang-up (or transfer) and was
    # killed before the clause closing its speech: media played the goodbye but never finishes
    # it. The caller then spoke again ("Actually, one more thing"), without barging in (nothing
    # was playing by then), and the brain answers that new turn. The tools service used to
    # wait out its 20 s for the last words and then hang up on a caller mid-conversation.
    received, _ = gateway
    await allow_transfers(pool, "+14155550123")
    await service()
    arguments = {"to": "+14155550123"} if tool == "transfer_call" else {}
    verb = "transfer" if tool == "transfer_call" else "hangup"

    cut_short = await start_call(bus)
    await bus.publish(TurnUserEnded(org_id=ORG, call_id=cut_short, turn_id="t1",
                                    text="That's all, thanks."))
    await bus.publish(AgentSay(org_id=ORG, call_id=cut_short, turn_id="t1", seq=0,
                               text="Thanks for calling. Goodbye!"))
    request = await request_tool(bus, cut_short, tool, arguments)
    await asyncio.sleep(0.3)
    await bus.publish(TurnUserEnded(org_id=ORG, call_id=cut_short, turn_id="t2",
                                    text="Actually, one more thing."))
    failed = await events.outcome(request.tool_call_id, timeout=25.0)
    assert failed.type == "tool.failed" and "the caller spoke again" in failed.error, failed
    assert not failed.retryable
    assert received == []

    # A goodbye that closed (the brain was not cut short) and that the caller only talked over
    # without interrupting ("ok bye"): it plays out, and the hand-off goes ahead as asked.
    talked_over = await start_call(bus)
    await bus.publish(AgentSay(org_id=ORG, call_id=talked_over, turn_id="t1", seq=0,
                               text="Thanks for calling. Goodbye!", last=True))
    request = await request_tool(bus, talked_over, tool, arguments)
    await bus.publish(TurnUserEnded(org_id=ORG, call_id=talked_over, turn_id="t2",
                                    text="ok bye then"))
    await bus.publish(AgentSpeechFinished(org_id=ORG, call_id=talked_over, turn_id="t1"))
    assert (await events.outcome(request.tool_call_id)).type == "tool.completed"
    assert [subject for subject, _ in received] == [f"parley.cmd.gateway.{talked_over}.{verb}"]


@pytest.mark.parametrize("reply", ["speech", "key"])
async def test_an_idle_hang_up_the_caller_answered_without_barging_in_does_not_happen(
        bus, service, events, gateway, reply):
    # An agent whose interruption_mode is "none" or "dtmf" (or a caller who says only "yeah",
    # a backchannel): the caller answers the goodbye ("wait, I'm here!") or presses a key, but
    # does not interrupt it, so it plays out (agent.speech.finished). The caller is there all
    # the same: the call goes on.
    received, _ = gateway
    await service()
    call_id = await start_call(bus)
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="t1", seq=0,
                               text="I'll end the call now. Goodbye!", last=True))
    await bus.publish(SpeechStarted(org_id=ORG, call_id=call_id, offset_ms=31_000)
                      if reply == "speech" else CallDtmf(org_id=ORG, call_id=call_id, digit="1"))
    await bus.publish(AgentSpeechFinished(org_id=ORG, call_id=call_id, turn_id="t1"))
    idle = await request_tool(bus, call_id, "end_call", {"reason": "idle"})
    failed = await events.outcome(idle.tool_call_id)
    assert failed.type == "tool.failed" and "the call goes on" in failed.error
    assert received == []


async def test_end_call_on_a_call_no_gateway_holds_fails(bus, service, events):
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "end_call")
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed"
    assert "not live" in failed.error


async def allow_transfers(pool, *numbers: str) -> None:
    async with pool.connection() as conn:
        await update_agent(conn, ORG, AGENT, {"transfer_numbers": list(numbers)})


async def test_transfer_and_dtmf_send_their_commands(bus, pool, service, events, gateway):
    received, refusals = gateway
    await allow_transfers(pool, "+14155550123")
    await service()
    call_id = await start_call(bus)
    transfer = await request_tool(bus, call_id, "transfer_call", {"to": "+14155550123"})
    assert (await events.outcome(transfer.tool_call_id)).type == "tool.completed"
    dtmf = await request_tool(bus, call_id, "send_dtmf", {"digits": "12#"})
    assert (await events.outcome(dtmf.tool_call_id)).type == "tool.completed"
    assert received == [
        (f"parley.cmd.gateway.{call_id}.transfer", {"to": "+14155550123", "mode": "cold"}),
        (f"parley.cmd.gateway.{call_id}.dtmf", {"digits": "12#"})]

    refusals["dtmf"] = "the carrier does not support DTMF on this call"
    refused = await request_tool(bus, call_id, "send_dtmf", {"digits": "1"})
    failed = await events.outcome(refused.tool_call_id)
    assert failed.type == "tool.failed" and "does not support DTMF" in failed.error

    bad = await request_tool(bus, call_id, "transfer_call", {"to": "555-1234"})
    failed = await events.outcome(bad.tool_call_id)
    assert failed.type == "tool.failed" and "invalid arguments for transfer_call" in failed.error
    assert len(received) == 3


async def test_transfer_to_a_number_the_agent_does_not_allow_is_refused(
        bus, pool, service, events, gateway):
    # Toll fraud: a caller talks the model into a cold transfer to a premium-rate or foreign
    # number, which the org pays for. Only the agent's transfer_numbers may be dialled.
    received, _ = gateway
    await service()
    call_id = await start_call(bus)
    premium = await request_tool(bus, call_id, "transfer_call", {"to": "+882345678901"})
    failed = await events.outcome(premium.tool_call_id)
    assert failed.type == "tool.failed" and failed.retryable is False
    assert "no transfer numbers" in failed.error and "offer a callback" in failed.error

    await allow_transfers(pool, "+14155550123", "+14155550124")
    abroad = await request_tool(bus, call_id, "transfer_call", {"to": "+442071234567"})
    failed = await events.outcome(abroad.tool_call_id)
    assert failed.type == "tool.failed"
    assert failed.error == ("transfer target +442071234567 not allowed for this agent; transfer "
                            "only to +14155550123, +14155550124, or offer a callback "
                            "(schedule_callback).")
    assert received == []  # the gateway was never asked

    allowed = await request_tool(bus, call_id, "transfer_call", {"to": "+14155550124"})
    assert (await events.outcome(allowed.tool_call_id)).type == "tool.completed"
    assert received == [(f"parley.cmd.gateway.{call_id}.transfer",
                         {"to": "+14155550124", "mode": "cold"})]


async def test_a_refused_transfer_does_not_wait_for_the_last_words(
        bus, pool, service, events, gateway):
    # "Let me transfer you to our front desk." is still playing: a target the agent may not dial
    # fails at once, so the brain tells the caller meanwhile rather than after a silence. An
    # allowed transfer still waits for the words to play out.
    received, _ = gateway
    await allow_transfers(pool, "+14155550123")
    await service()
    call_id = await start_call(bus)
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="t1", seq=0,
                               text="Let me transfer you to our front desk.", last=True))
    abroad = await request_tool(bus, call_id, "transfer_call", {"to": "+442071234567"})
    failed = await events.outcome(abroad.tool_call_id, timeout=5.0)
    assert failed.type == "tool.failed" and "not allowed for this agent" in failed.error

    allowed = await request_tool(bus, call_id, "transfer_call", {"to": "+14155550123"})
    await asyncio.sleep(0.5)
    assert received == [] and not events.of("tool.completed", allowed.tool_call_id)
    await bus.publish(AgentSpeechFinished(org_id=ORG, call_id=call_id, turn_id="t1"))
    assert (await events.outcome(allowed.tool_call_id)).type == "tool.completed"
    assert received == [(f"parley.cmd.gateway.{call_id}.transfer",
                         {"to": "+14155550123", "mode": "cold"})]


async def test_lookup_knowledge_without_a_knowledge_base_fails_clearly(bus, service, events):
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "lookup_knowledge", {"query": "opening hours"})
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed"
    assert failed.error.startswith("knowledge lookup unavailable")


async def test_lookup_knowledge_calls_the_injected_lookup(bus, service, events):
    asked: list[KnowledgeQuery] = []

    async def knowledge(query: KnowledgeQuery):
        asked.append(query)
        if query.query == "broken":
            raise ToolError("the index is rebuilding", retryable=True)
        return {"passages": [{"text": "We open at 9.", "score": 0.9}]}

    await service(knowledge=knowledge)
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "lookup_knowledge", {"query": "opening hours"})
    done = await events.outcome(request.tool_call_id)
    assert done.type == "tool.completed"
    assert done.result["passages"][0]["text"] == "We open at 9."
    assert asked[0] == KnowledgeQuery(org_id=ORG, agent_id=AGENT, call_id=call_id,
                                      query="opening hours")

    broken = await request_tool(bus, call_id, "lookup_knowledge", {"query": "broken"})
    failed = await events.outcome(broken.tool_call_id)
    assert failed.type == "tool.failed" and failed.retryable is True


def in_days(days: float) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat()


async def test_schedule_callback_stores_a_request(bus, pool, service, events):
    await service()
    call_id = await start_call(bus)
    when = datetime.now(timezone(timedelta(hours=-5))).replace(microsecond=0) + timedelta(days=2)
    request = await request_tool(bus, call_id, "schedule_callback",
                                 {"when": when.isoformat(), "note": "billing"})
    done = await events.outcome(request.tool_call_id)
    assert done.type == "tool.completed", done
    assert done.result["number"] == CALLER
    async with pool.connection() as conn:
        cursor = await conn.execute(
            "SELECT org_id, agent_id, number, note, callback_at, status FROM tool_callbacks "
            "WHERE call_id = %s", (call_id,))
        rows = await cursor.fetchall()
    assert rows == [(ORG, AGENT, CALLER, "billing", when, "pending")]

    past = await request_tool(bus, call_id, "schedule_callback", {"when": "2001-01-01T00:00Z"})
    failed = await events.outcome(past.tool_call_id)
    assert failed.type == "tool.failed" and "in the future" in failed.error


async def test_a_callback_to_a_number_other_than_the_callers_is_refused(
        bus, pool, service, events):
    # Toll fraud: the caller talks the model into booking a "callback" to a premium-rate or
    # foreign number, which the gateway later dials at the org's expense. By default only the
    # caller's own number can be called back.
    await service()
    call_id = await start_call(bus)
    premium = await request_tool(bus, call_id, "schedule_callback",
                                 {"when": in_days(1), "number": "+882345678901"})
    failed = await events.outcome(premium.tool_call_id)
    assert failed.type == "tool.failed" and failed.retryable is False
    assert failed.error == ("callback to +882345678901 not allowed for this agent: it can only "
                            f"call back the caller's own number ({CALLER}). Offer that, or "
                            "take a message.")

    # An agent whose settings allow other numbers by prefix: those, and only those.
    async with pool.connection() as conn:
        await update_agent(conn, ORG, AGENT, {"callback_number_prefixes": ["+1415", "+1650"]})
    abroad = await request_tool(bus, call_id, "schedule_callback",
                                {"when": in_days(1), "number": "+442071234567"})
    failed = await events.outcome(abroad.tool_call_id)
    assert failed.type == "tool.failed"
    assert "numbers starting +1415, +1650" in failed.error
    office = await request_tool(bus, call_id, "schedule_callback",
                                {"when": in_days(1), "number": "+14155550123"})
    assert (await events.outcome(office.tool_call_id)).type == "tool.completed"
    async with pool.connection() as conn:
        cursor = await conn.execute("SELECT number FROM tool_callbacks WHERE call_id = %s",
                                    (call_id,))
        assert await cursor.fetchall() == [("+14155550123",)]


async def test_a_caller_without_a_phone_number_cannot_be_called_back(bus, service, events):
    # A withheld number reaches us as "anonymous" (or a SIP address): nothing to dial.
    await service()
    call_id = "call_anonymous"
    await bus.publish(CallRequested(org_id=ORG, call_id=call_id, direction="inbound",
                                    agent_id=AGENT, from_number="anonymous",
                                    to_number="+14155550100"))
    request = await request_tool(bus, call_id, "schedule_callback", {"when": in_days(1)})
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed"
    assert "the caller's number is unknown" in failed.error


async def test_a_callback_too_far_ahead_or_booked_twice_is_refused(bus, pool, service, events):
    await service()
    call_id = await start_call(bus)
    late = await request_tool(bus, call_id, "schedule_callback", {"when": in_days(31)})
    failed = await events.outcome(late.tool_call_id)
    assert failed.type == "tool.failed" and "at most 30 days ahead" in failed.error

    first = await request_tool(bus, call_id, "schedule_callback", {"when": in_days(2)})
    assert (await events.outcome(first.tool_call_id)).type == "tool.completed"
    again = await request_tool(bus, call_id, "schedule_callback", {"when": in_days(3)})
    failed = await events.outcome(again.tool_call_id)
    assert failed.type == "tool.failed"
    assert f"a callback to {CALLER} is already booked for" in failed.error
    async with pool.connection() as conn:
        cursor = await conn.execute("SELECT count(*) FROM tool_callbacks WHERE call_id = %s",
                                    (call_id,))
        assert await cursor.fetchone() == (1,)


async def test_two_callbacks_booked_at_once_to_one_number_are_not_both_booked(pool):
    # One round of the model asks for two callbacks to the caller, handled at the same time:
    # each checks that none is booked yet before either has booked. Only one may be booked,
    # and the other refused as a callback booked first is.
    call = CallContext(org_id=ORG, call_id="call_twice", agent_id=AGENT, customer_number=CALLER)
    async with pool.connection() as first, pool.connection() as second:
        async with first.transaction():  # booked, not committed yet: the second checks now
            await schedule_callback(first, {"when": in_days(1)}, call, "toolu_1")
            racing = asyncio.create_task(schedule_callback(second, {"when": in_days(2)}, call,
                                                           "toolu_2"))
            await asyncio.sleep(0.3)
        with pytest.raises(ToolError, match=f"a callback to \\{CALLER} is already booked"):
            await racing
        cursor = await second.execute(
            "SELECT tool_call_id FROM tool_callbacks WHERE call_id = %s", (call.call_id,))
        assert await cursor.fetchall() == [("toolu_1",)]
    # The same tool call delivered again is the one it booked, not a refusal.
    async with pool.connection() as conn:
        again = await schedule_callback(conn, {"when": in_days(1)}, call, "toolu_1")
    assert again.ok and again.result["number"] == CALLER


@pytest.mark.parametrize("tool", ["end_call", "transfer_call"])
async def test_a_hand_off_the_gateway_did_not_confirm_in_time_is_under_way(
        bus, pool, service, events, tool):
    # The gateway holding the call takes the command but is slow at the carrier's REST API:
    # the hand-off is most likely happening. Reported as failed, the model would tell the
    # caller it could not transfer them (and might transfer again) while the transfer went on.
    async def slow_gateway(msg):
        await asyncio.sleep(4.0)  # past the service's 3 s hand-off timeout
        await msg.respond(b'{"ok": true}')

    sub = await bus.nc.subscribe("parley.cmd.gateway.*.*", cb=slow_gateway)
    try:
        await allow_transfers(pool, "+14155550123")
        await service()
        call_id = await start_call(bus)
        request = await request_tool(bus, call_id, tool,
                                     {"to": "+14155550123"} if tool == "transfer_call" else {})
        outcome = await events.outcome(request.tool_call_id)
        assert outcome.type == "tool.completed", outcome
        assert outcome.result["confirmed"] is False
    finally:
        await sub.unsubscribe()


@pytest.mark.parametrize("tool", ["end_call", "transfer_call"])
async def test_a_hand_off_the_gateway_refuses_late_fails(bus, pool, service, events, tool):
    # The gateway is at the carrier's REST API (its own timeout: 10 s) past the 2 s command
    # timeout, and then Twilio refuses the redirect. That answer was dropped: the hand-off was
    # "under way" while the caller stayed with an agent that thought them gone, and on a
    # managed call nothing prompts a silent caller. The tools service now waits for it.
    async def slow_refusing_gateway(msg):
        await asyncio.sleep(2.5)
        await msg.respond(b'{"ok": false, "error": "Twilio refused the redirect"}')

    sub = await bus.nc.subscribe("parley.cmd.gateway.*.*", cb=slow_refusing_gateway)
    try:
        await allow_transfers(pool, "+14155550123")
        await service()
        call_id = await start_call(bus)
        request = await request_tool(bus, call_id, tool,
                                     {"to": "+14155550123"} if tool == "transfer_call" else {})
        outcome = await events.outcome(request.tool_call_id)
        assert outcome.type == "tool.failed", outcome
        assert "Twilio refused the redirect" in outcome.error
    finally:
        await sub.unsubscribe()
