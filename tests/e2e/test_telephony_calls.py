"""Inbound and outbound calls through the Twilio emulator / caller simulator, across processes.

The gateway and the recorder run as their own processes against real NATS and Postgres; the
assertions read what the recorder stored: every call.* event in order, and the calls projection.
"""

import asyncio

import aiohttp
import psycopg

from parley.devkit.telephony.call_script import CallScript, KeyPress, Utterance
from parley.devkit.telephony.caller_simulator import CallerSimulator

from .conftest import (
    AGENT_NUMBER,
    AUTH_TOKEN,
    CALLEE_HUMAN,
    CALLEE_MACHINE,
    CALLER,
    Platform,
    emulator_state,
    stored_call,
)

HELLO = bytes([0x10, 0x90] * 4000)  # one second of loud µ-law "speech"


def subsequence(expected: list[str], actual: list[str]) -> bool:
    remaining = iter(actual)
    return all(any(item == seen for seen in remaining) for item in expected)


async def call_id_for_sid(database_url: str, call_sid: str) -> str:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        for _ in range(100):
            cursor = await conn.execute(
                "SELECT call_id FROM carrier_calls WHERE carrier_call_id = %s", (call_sid,))
            row = await cursor.fetchone()
            if row:
                return row[0]
            await asyncio.sleep(0.05)
    raise AssertionError(f"no call for {call_sid}")


async def test_inbound_call_from_webhook_to_hangup(platform: Platform) -> None:
    simulator = CallerSimulator(
        gateway_url=platform.gateway_url, auth_token=AUTH_TOKEN, from_number=CALLER,
        to_number=AGENT_NUMBER,
        script=CallScript(utterances=(Utterance(audio=HELLO, label="hello", at=0.2),),
                          key_presses=(KeyPress(digit="5", at=1.4),), hangup_after=2.0))
    result = await simulator.run()
    assert result.stop_reason == "hangup_after" and not result.protocol_errors

    call_id = await call_id_for_sid(platform.database_url, result.call_sid)
    types, row = await stored_call(platform.database_url, call_id, until="call.ended")
    assert subsequence(["call.requested", "call.answered", "call.stream_started", "call.dtmf",
                        "call.ended"], types), types
    assert types[0] == "call.requested" and types[-1] == "call.ended"
    assert types.count("call.ended") == 1
    assert (row["state"], row["direction"], row["from_number"], row["to_number"]) == \
        ("ended", "inbound", CALLER, AGENT_NUMBER)
    assert row["org_id"] == "dental" and row["agent_id"] == "reception"
    assert row["end_reason"] == "caller_hangup" and 1.5 < row["duration_s"] < 5


async def place_call(platform: Platform, to: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.post(platform.gateway_url + "/v1/calls", headers={
                "X-API-Key": platform.api_key}, json={
                "agent_id": "reception", "to": to, "from": AGENT_NUMBER,
                "metadata": {"campaign": "recall"}}) as response:
            body = await response.json()
            assert response.status == 201, body
            return str(body["call_id"])


async def test_outbound_call_answered_by_a_human(platform: Platform) -> None:
    call_id = await place_call(platform, CALLEE_HUMAN)
    state = emulator_state(platform)
    await asyncio.sleep(1.5)  # the callee listens for a while, then the agent side hangs up
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{platform.gateway_url}/v1/calls/{call_id}",
                            headers={"X-API-Key": platform.api_key}) as response:
            assert response.status == 200
    sid = next(iter(state.calls))
    await hang_up_through_rest(platform, sid)
    types, row = await stored_call(platform.database_url, call_id, until="call.ended")
    # Async AMD: the stream starts at answer, the verdict arrives while the call is live.
    assert subsequence(["call.requested", "call.dialing", "call.ringing", "call.answered",
                        "call.stream_started", "call.machine_detected", "call.ended"],
                       types), types
    assert types.count("call.ended") == 1
    assert (row["state"], row["direction"], row["to_number"], row["answered_by"]) == \
        ("ended", "outbound", CALLEE_HUMAN, "human")


async def hang_up_through_rest(platform: Platform, sid: str) -> None:
    from parley.devkit.telephony.twilio_sdk import twilio_client_for

    from .conftest import ACCOUNT_SID

    def hang_up() -> None:
        client = twilio_client_for(platform.emulator_url, ACCOUNT_SID, AUTH_TOKEN)
        client.calls(sid).update(status="completed")

    await asyncio.to_thread(hang_up)


async def test_outbound_call_answered_by_a_machine_is_hung_up(platform: Platform) -> None:
    call_id = await place_call(platform, CALLEE_MACHINE)
    types, row = await stored_call(platform.database_url, call_id, until="call.ended")
    assert subsequence(["call.requested", "call.dialing", "call.answered",
                        "call.machine_detected", "call.ended"], types), types
    assert row["answered_by"] == "machine_end_beep" and row["state"] == "ended"
    assert row["end_reason"] == "machine"


async def test_parley_call_shows_the_call_live_from_the_bus(platform: Platform, nats_url: str,
                                                             tmp_path) -> None:
    import os
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "parley.devkit.cli", "call", platform.gateway_url,
        "--from", CALLER, "--to", AGENT_NUMBER, "--dtmf", "7@0.6", "--hangup-after", "1.5",
        env={**os.environ, "PARLEY_NATS_URL": nats_url, "PARLEY_TWILIO_AUTH_TOKEN": AUTH_TOKEN},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=tmp_path)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, err.decode()
    assert "[bus] caller pressed 7" in text and "[bus] call ended: caller_hangup" in text, text
    assert (tmp_path / "parley-call.wav").exists()  # the stereo recording of the call
