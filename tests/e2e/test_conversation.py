"""A whole conversation across every service, each its own process, offline providers.

The caller (simulated, Piper's voice) asks a price the agent only knows from its knowledge base,
books an appointment through a sensitive tool a human approves, and says goodbye; the agent
hangs up. Gateway, recorder, media (Whisper + Piper), brain (local responder) and tools run as
processes against real NATS and Postgres; the assertions read the event log in Postgres.
"""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import psycopg
import pytest
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from parley.brain.knowledge import ingest
from parley.common.configuration import create_api_key
from parley.common.events import decode
from parley.common.tools.repository import add_tool
from parley.devkit.infra import free_port
from parley.devkit.telephony.call_script import CallScript, Utterance
from parley.devkit.telephony.caller_simulator import CallerSimulator
from parley.media.providers.local.piper_tts import PiperTts

from .conftest import AGENT_NUMBER, AUTH_TOKEN, CALLER, ORG, Platform, stored_call

pytestmark = pytest.mark.timeout(240)

KNOWLEDGE = b"""# Bright Smile Dental

## Prices
A teeth cleaning costs $95. A whitening session costs $250.

## Hours
We are open Monday to Friday from 8 am to 5 pm.
"""


async def synthesise(text: str) -> bytes:
    stream = await PiperTts().open()
    await stream.say(text, last=True)
    return b"".join([chunk.audio async for chunk in stream.audio()])


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9$']+", text.lower())


async def wait_log(platform: Platform, name: str, proc, line: str, timeout: float = 60) -> None:
    log = platform.logs / f"{name}.log"
    deadline = time.monotonic() + timeout
    while line not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        await asyncio.sleep(0.1)


@pytest.fixture
async def booking_api():
    """The dental office's booking endpoint (what book_appointment calls)."""
    booked: list[dict] = []

    async def book(request: web.Request) -> web.Response:
        body = await request.json()
        booked.append(body)
        return web.json_response({"confirmed": True, "day": body.get("day", ""),
                                  "time": body.get("time", "")})

    app = web.Application()
    app.router.add_post("/appointments", book)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/appointments", booked
    await runner.cleanup()


@pytest.fixture
async def everything(platform: Platform, booking_api):
    url, booked = booking_api
    async with await psycopg.AsyncConnection.connect(platform.database_url,
                                                     autocommit=True) as conn:
        await conn.execute("UPDATE orgs SET allow_private_tool_targets = true WHERE org_id = %s",
                           (ORG,))
        await add_tool(conn, ORG, "reception", {
            "name": "book_appointment", "description": "Book a dental appointment",
            "url": url, "sensitive": True, "approval_timeout_s": 30,
            "parameters": {"type": "object", "required": ["day"], "properties": {
                "day": {"type": "string", "description": "day of the appointment"},
                "time": {"type": "string", "description": "time of the appointment"}}}})
        _, approver = await create_api_key(conn, ORG, name="desk", scopes=["tools:approve"])
    async with AsyncConnectionPool(platform.database_url, min_size=1, max_size=2,
                                   open=False) as pool:
        await ingest(pool, ORG, "reception", "clinic.md", KNOWLEDGE)
    tools_port = free_port()
    procs = {
        "media": platform.spawn("media", PARLEY_INSTANCE_ID="media-1"),
        "brain": platform.spawn("brain"),
        "tools": platform.spawn("tools", PARLEY_TOOLS_HTTP_PORT=str(tools_port)),
    }
    await wait_log(platform, "media", procs["media"], "media ready")
    await wait_log(platform, "brain", procs["brain"], "brain ready")
    await wait_log(platform, "tools", procs["tools"], "tools up")
    return f"http://127.0.0.1:{tools_port}", approver, booked


async def test_a_conversation_with_knowledge_an_approved_tool_and_a_hang_up(
        platform: Platform, everything, bus, tmp_path) -> None:
    tools_url, approver, booked = everything
    approvals: list[str] = []

    async def on_event(msg) -> None:  # the front desk approves what the agent asks
        event = decode(msg.data)
        if event.type == "tool.approval_requested":
            approvals.append(event.tool_call_id)
            async with aiohttp.ClientSession() as http, http.post(
                    f"{tools_url}/v1/tool-calls/{event.tool_call_id}/approve",
                    headers={"X-API-Key": approver}) as response:
                assert response.status == 200, await response.text()

    sub = await bus.nc.subscribe("parley.ev.*.call.*.tool.approval_requested", cb=on_event)
    utterances = (
        Utterance(audio=await synthesise("How much is a teeth cleaning?"), label="price"),
        Utterance(audio=await synthesise("I would like to book an appointment on Friday "
                                         "at ten."), label="book"),
        Utterance(audio=await synthesise("Thank you, goodbye."), label="bye"),
    )
    simulator = CallerSimulator(
        gateway_url=platform.gateway_url, auth_token=AUTH_TOKEN, from_number=CALLER,
        to_number=AGENT_NUMBER, wav_path=tmp_path / "call.wav",
        script=CallScript(utterances=utterances, reply_timeout=25.0, hang_up_when_done=False,
                          hangup_after=90.0))
    result = await simulator.run()
    await sub.unsubscribe()
    assert result.stop_reason == "gateway_closed", result.stop_reason
    assert not result.protocol_errors

    async with await psycopg.AsyncConnection.connect(platform.database_url) as conn:
        cursor = await conn.execute("SELECT call_id FROM carrier_calls WHERE carrier_call_id = %s",
                                    (result.call_sid,))
        call_id = (await cursor.fetchone())[0]
    types, row = await stored_call(platform.database_url, call_id, until="call.ended")
    async with await psycopg.AsyncConnection.connect(platform.database_url) as conn:
        cursor = await conn.execute(
            "SELECT type, data FROM events WHERE aggregate_id = %s ORDER BY position",
            (call_id,))
        events = [(t, p) for t, p in await cursor.fetchall()]

    said = {}
    for kind, payload in events:
        if kind == "agent.say":
            said.setdefault(payload["turn_id"], []).append(payload["text"])
    answers = {turn: " ".join(texts) for turn, texts in said.items()}
    ended = [p for k, p in events if k == "turn.user_ended"]
    # A turn ended at the max wait on a partial may be revised by the late final (a starved CPU
    # makes Whisper slow): the revision carries the superseded turn's id in `revises`.
    superseded = {p["revises"] for p in ended if p["revises"]}
    user = [p for p in ended if p["turn_id"] not in superseded]
    assert [len(user)] == [3], [(p["turn_id"], p["text"], p["revises"]) for p in ended]
    assert "$95" in answers[user[0]["turn_id"]] or "95" in answers[user[0]["turn_id"]], answers
    heard = [(p["text"], p["reason"], p["eou_delay_ms"]) for p in ended]
    heard += [(p["text"], "final", p["latency_ms"]) for k, p in events if k == "transcript.final"]
    assert approvals and booked and booked[0]["day"].lower().startswith("friday"), (
        booked, approvals, heard, answers)
    assert "tool.approval_requested" in types and "tool.approved" in types
    assert "tool.completed" in types
    end_call = [p for k, p in events if k == "tool.requested" and p["name"] == "end_call"]
    assert end_call, answers
    positions = [types.index(t) for t in ("call.stream_started", "turn.user_ended",
                                          "knowledge.retrieved", "tool.approval_requested",
                                          "tool.approved", "tool.completed", "call.ended")]
    assert positions == sorted(positions), types
    assert row["state"] == "ended" and row["end_reason"] == "agent_hangup"
    bye_turn = end_call[0]["turn_id"]
    finished = [i for i, (k, p) in enumerate(events)
                if k == "agent.speech.finished" and p["turn_id"] == bye_turn]
    ended = [i for i, (k, _) in enumerate(events) if k == "call.ended"]
    assert finished and finished[0] < ended[0], "the goodbye was cut off by the hang-up"
    assert all(latency is not None for latency in result.latencies_ms[:2]), result.latencies_ms


async def call_events(database_url: str, call_id: str) -> list[tuple[str, dict]]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT type, data FROM events WHERE aggregate_id = %s ORDER BY position",
            (call_id,))
        return [(t, d) for t, d in await cursor.fetchall()]


def in_order(types: list[str], expected: list[str]) -> bool:
    remaining = iter(types)
    return all(any(item == seen for seen in remaining) for item in expected)


async def place_call(platform: Platform, to: str) -> str:
    async with aiohttp.ClientSession() as http, http.post(
            platform.gateway_url + "/v1/calls", headers={"X-API-Key": platform.api_key},
            json={"agent_id": "reception", "to": to, "from": AGENT_NUMBER}) as response:
        body = await response.json()
        assert response.status == 201, body
        return str(body["call_id"])


async def test_outbound_call_answered_by_a_person_who_talks_with_the_agent(
        platform: Platform, everything) -> None:
    from parley.devkit.telephony.emulated_call import Callee

    from .conftest import emulator_state

    question = await synthesise("What time do you open on Friday?")
    emulator_state(platform).callees["+14155550166"] = Callee(
        answered_by="human", script=CallScript(utterances=(
            Utterance(audio=question, label="question"),), hang_up_when_done=True,
            reply_timeout=25.0))
    call_id = await place_call(platform, "+14155550166")
    types, row = await stored_call(platform.database_url, call_id, until="call.ended",
                                   timeout=60)
    assert in_order(types, ["call.requested", "call.dialing", "call.answered",
                            "call.stream_started", "agent.say", "agent.speech.started",
                            "turn.user_ended", "turn.started", "agent.say", "call.ended"]), types
    # The answer's audio may start before the brain's turn.started: a reply prepared while
    # the caller's turn was being confirmed plays the moment it ends.
    answered = types.index("turn.user_ended")
    assert "agent.speech.started" in types[answered:types.index("call.ended")], types
    events = await call_events(platform.database_url, call_id)
    answer = " ".join(d["text"] for t, d in events if t == "agent.say" and d["turn_id"] == "t1")
    assert "8" in answer or "eight" in answer.lower(), answer
    ended = next(d for t, d in events if t == "turn.user_ended")
    if ended.get("prepared_text"):  # what media played first is what the brain said first
        assert answer.startswith(ended["prepared_text"]), (ended, answer)
    assert (row["direction"], row["answered_by"], row["state"]) == ("outbound", "human",
                                                                    "ended")


async def test_outbound_call_answered_by_a_machine_is_hung_up_before_anyone_speaks(
        platform: Platform, everything) -> None:
    from .conftest import CALLEE_MACHINE

    call_id = await place_call(platform, CALLEE_MACHINE)
    types, row = await stored_call(platform.database_url, call_id, until="call.ended",
                                   timeout=30)
    assert in_order(types, ["call.requested", "call.dialing", "call.answered",
                            "call.machine_detected", "call.ended"]), types
    assert "turn.user_ended" not in types
    assert (row["answered_by"], row["end_reason"]) == ("machine_end_beep", "machine")


async def test_barge_in_and_dtmf_across_every_service(platform: Platform, everything,
                                                      tmp_path) -> None:
    from parley.devkit.telephony.call_script import KeyPress

    async with await psycopg.AsyncConnection.connect(platform.database_url,
                                                     autocommit=True) as conn:
        # No idle prompt in the quiet seconds before the key press (tests/e2e/test_idle.py).
        await conn.execute(
            "UPDATE agents SET settings = settings || %s::jsonb WHERE agent_id = 'reception'",
            ('{"interruption_mode": "any", "idle_prompt_s": 0, "idle_hangup_s": 0, '
             '"greeting": "Thank you for calling Bright Smile Dental, the friendliest dental '
             'office in town, where we look after the whole family from the first tooth to the '
             'last. How can I help you today?"}',))
    interruption = await synthesise("Sorry, what are your opening hours?")
    simulator = CallerSimulator(
        gateway_url=platform.gateway_url, auth_token=AUTH_TOKEN, from_number=CALLER,
        to_number=AGENT_NUMBER, wav_path=tmp_path / "barge.wav",
        script=CallScript(utterances=(Utterance(audio=interruption, label="interrupt",
                                                over_agent_after=2.0),),
                          key_presses=(KeyPress(digit="1", at=14.0),),
                          reply_timeout=25.0, hang_up_when_done=False, hangup_after=18.0))
    result = await simulator.run()
    assert not result.protocol_errors
    async with await psycopg.AsyncConnection.connect(platform.database_url) as conn:
        cursor = await conn.execute(
            "SELECT call_id FROM carrier_calls WHERE carrier_call_id = %s", (result.call_sid,))
        call_id = (await cursor.fetchone())[0]
    types, row = await stored_call(platform.database_url, call_id, until="call.ended")
    events = await call_events(platform.database_url, call_id)
    cut = [d for t, d in events if t == "agent.speech.interrupted" and d["turn_id"] == "t0"]
    assert cut, types
    heard = words(cut[0]["played_text"])
    greeting = words("Thank you for calling Bright Smile Dental, the friendliest dental office "
                     "in town")
    assert heard and heard == greeting[:len(heard)], cut[0]["played_text"]
    assert in_order(types, ["agent.speech.started", "speech.started",
                            "agent.speech.interrupted", "turn.user_ended", "turn.started",
                            "call.dtmf", "call.ended"]), types
    dtmf = [d for t, d in events if t == "call.dtmf"]
    assert [d["digit"] for d in dtmf] == ["1"]
    # The key is input too: a turn of its own once the caller stopped typing (2 s), which the
    # brain answers (offline, by reading it back).
    keys = [d for t, d in events if t == "turn.user_ended" and d.get("reason") == "dtmf"]
    assert [(d["turn_id"], d["text"]) for d in keys] == [("k1", "1")], keys
    answer = " ".join(d["text"] for t, d in events if t == "agent.say" and d["turn_id"] == "k1")
    assert "You pressed 1" in answer, answer
    assert row["state"] == "ended" and row["end_reason"] == "caller_hangup"
