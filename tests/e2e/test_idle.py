"""A caller who says nothing, across every service: asked once, then hung up on as idle.

Gateway, recorder, media (Whisper + Piper), brain (local responder) and tools run as processes
against real NATS and Postgres; the simulated caller stays on the line in silence (a dead line
whose carrier keeps streaming silence). The assertions read the event log in Postgres.
"""

from __future__ import annotations

import psycopg
import pytest

from parley.devkit.infra import free_port
from parley.devkit.telephony.call_script import CallScript
from parley.devkit.telephony.caller_simulator import CallerSimulator

from .conftest import AGENT_NUMBER, AUTH_TOKEN, CALLER, Platform, stored_call
from .test_conversation import call_events, in_order, wait_log

pytestmark = pytest.mark.timeout(180)


async def test_a_silent_caller_is_prompted_then_hung_up_on_as_idle(platform: Platform,
                                                                     tmp_path) -> None:
    async with await psycopg.AsyncConnection.connect(platform.database_url,
                                                     autocommit=True) as conn:
        await conn.execute(
            "UPDATE agents SET settings = settings || %s::jsonb WHERE agent_id = 'reception'",
            ('{"greeting": "Hello!", "idle_prompt_s": 1.5, "idle_hangup_s": 4}',))
    procs = {
        "media": platform.spawn("media", PARLEY_INSTANCE_ID="media-1"),
        "brain": platform.spawn("brain"),
        "tools": platform.spawn("tools", PARLEY_TOOLS_HTTP_PORT=str(free_port())),
    }
    await wait_log(platform, "media", procs["media"], "media ready")
    await wait_log(platform, "brain", procs["brain"], "brain ready")
    await wait_log(platform, "tools", procs["tools"], "tools up")

    simulator = CallerSimulator(
        gateway_url=platform.gateway_url, auth_token=AUTH_TOKEN, from_number=CALLER,
        to_number=AGENT_NUMBER, wav_path=tmp_path / "idle.wav",
        script=CallScript(hang_up_when_done=False, hangup_after=60.0))
    result = await simulator.run()
    assert result.stop_reason == "gateway_closed", result.stop_reason  # not our hang-up
    assert not result.protocol_errors

    async with await psycopg.AsyncConnection.connect(platform.database_url) as conn:
        cursor = await conn.execute(
            "SELECT call_id FROM carrier_calls WHERE carrier_call_id = %s", (result.call_sid,))
        call_id = (await cursor.fetchone())[0]
    types, row = await stored_call(platform.database_url, call_id, until="call.ended")
    events = await call_events(platform.database_url, call_id)
    idle = [(d["turn_id"], d["action"]) for t, d in events if t == "caller.idle"]
    assert idle == [("i0", "prompt"), ("i1", "hangup")], types
    said = {d["turn_id"]: d["text"] for t, d in events if t == "agent.say"}
    assert said["i0"] == "Are you still there?" and "Goodbye" in said["i1"], said
    [end_call] = [d for t, d in events if t == "tool.requested"]
    assert (end_call["turn_id"], end_call["name"], end_call["arguments"]) == (
        "i1", "end_call", {"reason": "idle"})
    assert in_order(types, ["agent.speech.finished", "caller.idle", "agent.say",
                            "agent.speech.finished", "caller.idle", "agent.say",
                            "tool.requested", "agent.speech.finished", "call.ended"]), types
    assert "turn.user_ended" not in types
    assert row["state"] == "ended" and row["end_reason"] == "idle"
    # About 1.5 s after the greeting, and 4 s of silence in all (the prompt not counted).
    silences = [d["silent_s"] for t, d in events if t == "caller.idle"]
    assert silences == [1.5, 4.0]
