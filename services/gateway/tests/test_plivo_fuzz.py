"""Random bad input at the Plivo socket and callbacks (seeded, so failures reproduce).

Properties: a message is either accepted or closes the socket with a precise protocol code —
never 1011 — webhooks never answer 5xx, and a good call running alongside keeps working.
(Stdlib ``random`` rather than hypothesis, which is not a dependency of the workspace yet.)
"""

import asyncio
import base64
import json
import random
from typing import Any

import pytest

from parley.gateway.close_codes import CloseCode, ProtocolViolation
from parley.gateway.plivo.protocol import decode_message

from . import test_plivo_support as support
from .conftest import closed, wait_for
from .test_plivo_support import PLIVO_NUMBER, PlivoStreamClient, new_call_uuid, started_plivo_stream

make_plivo_gateway = support.make_plivo_gateway
plivo_number = support.plivo_number

SEED = 20240611
PROTOCOL_CODES = {CloseCode.UNSUPPORTED_DATA, CloseCode.INVALID_MESSAGE, CloseCode.UNKNOWN_EVENT,
                  CloseCode.INVALID_PAYLOAD, CloseCode.OUT_OF_ORDER, CloseCode.NOT_STARTED,
                  CloseCode.DUPLICATE_START, CloseCode.POLICY_VIOLATION,
                  CloseCode.MESSAGE_TOO_BIG}
VALID = [
    {"event": "start", "sequenceNumber": 1, "start": {
        "callId": "c", "streamId": "s", "mediaFormat": {"encoding": "audio/x-mulaw",
                                                        "sampleRate": 8000}}},
    {"event": "media", "sequenceNumber": 2, "streamId": "s", "media": {
        "track": "inbound", "timestamp": "1705312200000", "chunk": 1,
        "payload": base64.b64encode(b"\xff" * 160).decode()}},
    {"event": "dtmf", "sequenceNumber": 3, "streamId": "s", "dtmf": {"digit": "1"}},
    {"event": "playedStream", "sequenceNumber": 4, "streamId": "s", "name": "t:1"},
    {"event": "clearedAudio", "sequenceNumber": 5, "streamId": "s"},
]
JUNK: list[Any] = [None, True, -1, 2**70, 1.5, "", "x" * 300, "☃", [], {}, [1, "a"],
                   {"nested": {"deep": []}}, "not*base64!"]


def mutate(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """A random variation of a JSON value: fields dropped, replaced, retyped or added."""
    if isinstance(value, dict) and value and depth < 4:
        result = dict(value)
        key = rng.choice(list(result))
        action = rng.randrange(4)
        if action == 0:
            del result[key]
        elif action == 1:
            result[key] = rng.choice(JUNK)
        elif action == 2:
            result[key] = mutate(rng, result[key], depth + 1)
        else:
            result[rng.choice(["event", "extra", "streamId", "media"])] = rng.choice(JUNK)
        return result
    return rng.choice(JUNK) if rng.random() < 0.7 else value


def random_text(rng: random.Random) -> str:
    if rng.random() < 0.8:
        return json.dumps(mutate(rng, rng.choice(VALID)))
    return "".join(rng.choice('{}[]":,ab01\\ \u2603') for _ in range(rng.randrange(1, 40)))


def test_decoding_random_messages_fails_only_with_protocol_codes():
    rng = random.Random(SEED)
    for _ in range(5000):
        text = random_text(rng)
        try:
            decode_message(text)
        except ProtocolViolation as exc:
            assert exc.code in PROTOCOL_CODES, (text, exc)


async def test_random_messages_on_live_sockets_close_precisely(make_plivo_gateway, events, bus):
    gateway = await make_plivo_gateway(stream_start_timeout_s=5.0)
    good, _, call_id = await started_plivo_stream(gateway, events)
    received: list[bytes] = []

    async def on_in(msg):
        received.append(msg.data)

    sub = await bus.nc.subscribe(f"parley.audio.{call_id}.in", cb=on_in)
    rng = random.Random(SEED)

    async def one_socket(n: int) -> int | None:
        started = n % 2 == 0
        if started:
            stream, _, _ = await started_plivo_stream(gateway, events)
        else:
            _, bad_call_id, _ = await gateway.answer()
            stream = PlivoStreamClient(await gateway.ws(bad_call_id))
        for _ in range(5):
            await stream.ws.send_str(random_text(rng))
        # a final message that is always wrong, so every socket ends with a verdict
        await stream.ws.send_str('{"event": "teleport"}')
        code, _ = await closed(stream.ws)
        return code

    async def keep_talking():
        for n in range(40):
            await good.media(bytes([n]) * 160)
            await asyncio.sleep(0.01)

    results = await asyncio.gather(keep_talking(), *(one_socket(n) for n in range(24)))
    assert all(code in PROTOCOL_CODES for code in results[1:]), results[1:]
    assert gateway.metric("gateway_socket_closes_total", protocol="plivo_stream",
                          code=str(int(CloseCode.INTERNAL_ERROR))) == 0
    await wait_for(lambda: len(received) == 40)
    assert received == [bytes([n]) * 160 for n in range(40)]
    await sub.unsubscribe()
    await good.ws.close()


@pytest.mark.parametrize("path", ["/plivo/answer", "/plivo/ring", "/plivo/hangup",
                                  "/plivo/stream-status", "/plivo/transfer"])
async def test_random_signed_forms_never_get_a_5xx(make_plivo_gateway, path):
    gateway = await make_plivo_gateway()
    rng = random.Random(f"{SEED}{path}")
    fields = ["CallUUID", "RequestUUID", "From", "To", "Direction", "CallStatus", "Duration",
              "HangupSource", "Event", "StreamID"]
    values = ["", new_call_uuid(), PLIVO_NUMBER, "+1", "outbound", "inbound", "completed",
              "busy", "-5", "nan", "inf", "1e309", "☃" * 50, "Caller", "DroppedStream"]
    queries = ["", "?call_id=call_x", "?call_id=bad id", "?call_id=c&org_id=o&agent_id=a",
               "?to=%2B14155550123", "?call_id=%00"]
    for _ in range(25):
        form = {rng.choice(fields): rng.choice(values) for _ in range(rng.randrange(0, 8))}
        response = await gateway.post(path + rng.choice(queries), form)
        assert response.status < 500, (path, form, await response.text())
