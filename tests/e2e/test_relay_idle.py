"""A caller who says nothing on a managed (ConversationRelay) call: asked once, then hung up on.

Gateway, recorder, brain (local responder) and tools run as processes against real NATS and
Postgres; media does not serve managed calls. The test is Twilio: it posts the signed voice
webhook, opens the ``<ConversationRelay>`` socket the TwiML names, and "says" each text it is
sent (``info`` reports: agentSpeaking on, tokensPlayed, agentSpeaking off) while the caller
stays silent. The gateway's relay counts the silence; the assertions read the event log.
"""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ElementTree
from typing import Any

import aiohttp
import msgspec
import psycopg
import pytest
from aiohttp import WSMsgType

from parley.devkit.infra import free_port
from parley.devkit.telephony.twilio_protocol import SIGNATURE_HEADER, compute_signature, new_sid
from parley.devkit.telephony.webhook_client import UrlMap, send_webhook, voice_params

from .conftest import ACCOUNT_SID, AGENT_NUMBER, AUTH_TOKEN, CALLER, Platform, stored_call
from .test_conversation import call_events, in_order, wait_log

pytestmark = pytest.mark.timeout(120)

GOODBYE = "I haven't heard anything for a while, so I'll end the call now. Goodbye!"


class ConversationRelay:
    """Twilio's side of one ConversationRelay socket, with a caller who says nothing."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.said: list[str] = []  # each turn's text, once its last token came and was played
        self.played_at: list[float] = []  # when Twilio reported each of them played out
        self.end: dict[str, Any] | None = None
        self.end_at = 0.0

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(msgspec.json.encode(message).decode())

    async def play(self, text: str) -> None:
        """Say ``text`` and report it, as Twilio does with events="speaker-events tokens-played".
        """
        await self.send({"type": "info", "name": "agentSpeaking", "value": "on"})
        await self.send({"type": "info", "name": "tokensPlayed", "value": text})
        await self.send({"type": "info", "name": "agentSpeaking", "value": "off"})

    async def run(self, timeout: float) -> None:
        """Say what comes until the gateway ends the session (``end``)."""
        try:
            async with asyncio.timeout(timeout):  # (not receive's: a ping restarts that one)
                await self._say_until_end()
        except TimeoutError:
            raise AssertionError(f"the call went on for {timeout} s; said: {self.said}"
                                 ) from None

    async def _say_until_end(self) -> None:
        tokens: list[str] = []
        while True:
            msg = await self.ws.receive()
            if msg.type is not WSMsgType.TEXT:
                raise AssertionError(f"the socket closed ({msg.type.name} {msg.data} "
                                     f"{msg.extra}) without an end; said: {self.said}")
            message = msgspec.json.decode(msg.data)
            if message["type"] == "text":
                tokens.append(message["token"])
                if message["last"]:
                    text, tokens = "".join(tokens).strip(), []
                    await self.play(text)
                    self.said.append(text)
                    self.played_at.append(time.monotonic())
            elif message["type"] == "end":
                self.end, self.end_at = message, time.monotonic()
                return
            else:
                raise AssertionError(f"unexpected message from the gateway: {message}")


async def test_a_silent_caller_on_a_managed_call_is_prompted_then_hung_up_on_as_idle(
        platform: Platform) -> None:
    async with await psycopg.AsyncConnection.connect(platform.database_url,
                                                     autocommit=True) as conn:
        # Each test has a database of its own: the e2e agent can be made managed here.
        # (record off: the REST emulator knows only the calls it dialled itself.)
        await conn.execute(
            "UPDATE agents SET settings = settings || %s::jsonb WHERE agent_id = 'reception'",
            ('{"pipeline": "managed", "greeting": "Hello!", "idle_prompt_s": 1.5, '
             '"idle_hangup_s": 4, "record": false}',))
    procs = {
        "brain": platform.spawn("brain"),
        "tools": platform.spawn("tools", PARLEY_TOOLS_HTTP_PORT=str(free_port())),
    }
    await wait_log(platform, "brain", procs["brain"], "brain ready")
    await wait_log(platform, "tools", procs["tools"], "tools up")

    call_sid, no_map = new_sid("CA"), UrlMap()
    params = voice_params(account_sid=ACCOUNT_SID, call_sid=call_sid, from_number=CALLER,
                          to_number=AGENT_NUMBER, direction="inbound", call_status="ringing")
    async with aiohttp.ClientSession() as http:
        answer = await send_webhook(http, no_map, url=platform.gateway_url + "/twilio/voice",
                                    params=params, auth_token=AUTH_TOKEN)
        connect = ElementTree.fromstring(answer).find("Connect")
        assert connect is not None, answer
        relay = connect.find("ConversationRelay")
        assert relay is not None, answer
        assert relay.get("welcomeGreeting") == "Hello!", answer
        assert "tokens-played" in relay.get("events", ""), answer
        custom = {p.get("name", ""): p.get("value", "") for p in relay.iter("Parameter")}
        call_id, url = custom["call_id"], relay.get("url", "")

        ws = await http.ws_connect(url, headers={
            SIGNATURE_HEADER: compute_signature(AUTH_TOKEN, url)})
        twilio = ConversationRelay(ws)
        await twilio.send({"type": "setup", "sessionId": new_sid("VX"), "callSid": call_sid,
                           "accountSid": ACCOUNT_SID, "from": CALLER, "to": AGENT_NUMBER,
                           "direction": "inbound", "callType": "PSTN",
                           "customParameters": custom})
        await twilio.play("Hello!")  # the welcomeGreeting, said as the caller connected
        await twilio.run(timeout=15)
        assert twilio.said == ["Are you still there?", GOODBYE], twilio.said
        # The hang-up goes to Twilio's REST API first; the emulator knows only the calls it
        # dialled, so it answers 404 and the gateway ends the session on the socket instead.
        assert twilio.end is not None
        assert msgspec.json.decode(twilio.end["handoffData"]) == {"reason": "idle"}
        # Right after the goodbye played, not after the tools service's 20 s fallback.
        assert twilio.end_at - twilio.played_at[-1] < 3.0, twilio.end_at - twilio.played_at[-1]

        # Twilio then closes the socket and asks the <Connect action>: the call is over.
        await ws.close()
        action = connect.get("action", "")
        after = await send_webhook(http, no_map, url=action, auth_token=AUTH_TOKEN,
                                   params={**params, "CallStatus": "in-progress"})
        assert ElementTree.fromstring(after).find("Hangup") is not None, after

    types, row = await stored_call(platform.database_url, call_id, until="call.ended")
    events = await call_events(platform.database_url, call_id)
    idle = [(d["turn_id"], d["action"]) for t, d in events if t == "caller.idle"]
    assert idle == [("i0", "prompt"), ("i1", "hangup")], types
    said = {d["turn_id"]: d["text"] for t, d in events if t == "agent.say"}
    assert said == {"t0": "Hello!", "i0": "Are you still there?", "i1": GOODBYE}, said
    [end_call] = [d for t, d in events if t == "tool.requested"]
    assert (end_call["turn_id"], end_call["name"], end_call["arguments"]) == (
        "i1", "end_call", {"reason": "idle"})
    finished = [d["turn_id"] for t, d in events if t == "agent.speech.finished"]
    assert [turn for turn in finished if turn.startswith("i")] == ["i0", "i1"], finished
    steps = [(t, d.get("turn_id", "")) for t, d in events]
    assert in_order(steps, [("call.stream_started", ""), ("caller.idle", "i0"),
                            ("agent.say", "i0"), ("agent.speech.finished", "i0"),
                            ("caller.idle", "i1"), ("agent.say", "i1"),
                            ("agent.speech.finished", "i1"), ("call.ended", "")]), steps
    # Either side of the goodbye's finish: this Twilio plays the goodbye the moment it comes,
    # and the tools service reads the call's past before it waits for the finish.
    assert in_order(steps, [("caller.idle", "i1"), ("tool.requested", "i1"),
                            ("call.ended", "")]), steps
    assert types.count("call.ended") == 1 and "turn.user_ended" not in types, types
    [ended] = [d for t, d in events if t == "call.ended"]
    assert ended["reason"] == "idle"
    assert row["state"] == "ended" and row["end_reason"] == "idle"
    # About 1.5 s after the greeting, and 4 s of silence in all (the prompt not counted);
    # the relay's clock ticks every 0.25 s.
    silences = [d["silent_s"] for t, d in events if t == "caller.idle"]
    assert 1.5 <= silences[0] < 2.0 and 4.0 <= silences[1] < 4.5, silences

    async with await psycopg.AsyncConnection.connect(platform.database_url) as conn:
        cursor = await conn.execute(
            "SELECT type, at FROM events WHERE aggregate_id = %s AND (type = 'call.ended' OR "
            "(type = 'agent.speech.finished' AND data->>'turn_id' = 'i1'))", (call_id,))
        at = dict(await cursor.fetchall())
    hang_up_s = (at["call.ended"] - at["agent.speech.finished"]).total_seconds()
    assert 0 <= hang_up_s < 3.0, hang_up_s
