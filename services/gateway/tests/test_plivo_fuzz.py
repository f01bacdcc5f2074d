"""Hypothesis throws random JSON, text and bytes at the Plivo stream socket and random forms at
the Plivo callbacks.

Properties: a message is accepted or closes the socket with a precise protocol code (never
1011), callbacks never answer 5xx (unsigned ones always 403), and a good call running
alongside the junk keeps working. One gateway serves all examples of a test.
"""

import asyncio
import base64
import json
from urllib.parse import quote

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parley.common.bus.audio import decode_frame
from parley.gateway.close_codes import CloseCode, ProtocolViolation
from parley.gateway.plivo.protocol import decode_message

from . import test_plivo_support as support
from .conftest import ORG, PUBLIC, closed, wait_for
from .test_plivo_support import (
    PLIVO_NUMBER,
    PlivoStreamClient,
    new_call_uuid,
    started_plivo_stream,
)

make_plivo_gateway = support.make_plivo_gateway
plivo_gateway = support.plivo_gateway
plivo_number = support.plivo_number

FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
PROTOCOL_CODES = {CloseCode.UNSUPPORTED_DATA, CloseCode.INVALID_MESSAGE,
                  CloseCode.INVALID_PAYLOAD, CloseCode.OUT_OF_ORDER, CloseCode.NOT_STARTED,
                  CloseCode.DUPLICATE_START, CloseCode.POLICY_VIOLATION,
                  CloseCode.MESSAGE_TOO_BIG, CloseCode.START_TIMEOUT}
ALLOWED_CLOSES = {None, CloseCode.NORMAL, *PROTOCOL_CODES}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8)
payloads = st.binary(max_size=320).map(lambda b: base64.b64encode(b).decode())
stream_messages = st.one_of(
    st.fixed_dictionaries({"event": st.sampled_from(
        ["start", "media", "dtmf", "playedStream", "clearedAudio", "stop", "nope"])}, optional={
        "sequenceNumber": st.integers(-2, 1000) | st.integers().map(str) | json_values,
        "streamId": st.sampled_from(["$SID", "other"]) | st.text(max_size=6),
        "start": st.fixed_dictionaries({"streamId": st.just("$SID"), "callId": st.sampled_from(
            ["$UUID"]) | st.text(max_size=8)}, optional={"mediaFormat": st.fixed_dictionaries(
                {"encoding": st.sampled_from(["audio/x-mulaw", "audio/x-l16"]),
                 "sampleRate": st.sampled_from([8000, 16000]) | json_values})}) | json_values,
        "media": st.fixed_dictionaries({"payload": payloads | st.text(max_size=20)}, optional={
            "track": st.sampled_from(["inbound", "outbound"]), "timestamp": json_values,
            "chunk": json_values}) | json_values,
        "dtmf": st.fixed_dictionaries({"digit": st.text(max_size=3)}) | json_values,
        "name": st.text(max_size=20) | json_values,
    }).map(json.dumps),
    st.text(max_size=100),
    st.binary(max_size=100),
)
FIELDS = ["CallUUID", "RequestUUID", "From", "To", "Direction", "CallStatus", "Duration",
          "HangupSource", "Event", "StreamID"]
forms = st.dictionaries(st.sampled_from(FIELDS) | st.text(min_size=1, max_size=8),
                        st.sampled_from(["$UUID", PLIVO_NUMBER, "outbound", "inbound",
                                         "completed", "busy", "no-answer", "Caller",
                                         "DroppedStream", "$UUID\x00", "-1", "1e400", "nan"])
                        | st.text(max_size=30),
                        max_size=8)
paths = st.sampled_from(["/plivo/answer", "/plivo/ring", "/plivo/hangup", "/plivo/stream-status",
                         "/plivo/transfer"]).flatmap(
    lambda path: (st.sampled_from(["", "?call_id=$CALLID", f"?call_id=call_x&org_id={ORG}"
                                   "&agent_id=ag_cascading", "?call_id=%00",
                                   "?to=%2B14155550123", "?to=%00"])
                  | st.text(max_size=12).map(lambda q: "?call_id=" + quote(q, safe=""))
                  ).map(lambda query: path + query))


@settings(max_examples=500, deadline=None, database=None)
@given(text=stream_messages.filter(lambda m: isinstance(m, str)))
def test_decoding_fails_only_with_protocol_codes(text):
    try:
        decode_message(text)
    except ProtocolViolation as exc:
        assert exc.code in PROTOCOL_CODES


async def _drain(ws, timeout: float = 0.3) -> int | None:
    """Read until the server closes (its code) or goes quiet (None: still open)."""
    try:
        code, _ = await closed(ws, timeout)
    except TimeoutError:
        return None
    return code


@FUZZ
@given(messages=st.lists(stream_messages, min_size=1, max_size=6), with_start=st.booleans())
async def test_fuzz_plivo_stream(plivo_gateway, events, messages, with_start):
    call_uuid, call_id, _ = await plivo_gateway.answer()
    stream = PlivoStreamClient(await plivo_gateway.ws(call_id))
    if with_start:
        await stream.start(call_uuid)
    for message in messages:
        if stream.ws.closed:
            break
        if isinstance(message, bytes):
            await stream.ws.send_bytes(message)
        else:
            await stream.ws.send_str(message.replace("$SID", stream.stream_id)
                                     .replace("$UUID", call_uuid))
    code = await _drain(stream.ws)
    await stream.ws.close()
    assert code in ALLOWED_CLOSES
    assert plivo_gateway.metric("gateway_socket_closes_total", protocol="plivo_stream",
                                code=str(int(CloseCode.INTERNAL_ERROR))) == 0


@FUZZ
@given(path=paths, form=forms, signed=st.booleans())
async def test_fuzz_plivo_callbacks(plivo_gateway, path, form, signed):
    call_uuid, call_id, _ = await plivo_gateway.answer()
    real_path = path.replace("$CALLID", call_id)
    real_form = {key: value.replace("$UUID", call_uuid) for key, value in form.items()}
    headers = {} if not signed else None
    if signed:
        try:
            headers = support.signed_headers("POST", PUBLIC + real_path, real_form)
        except UnicodeEncodeError:  # the SDK cannot sign a query with non-ASCII escapes
            signed, headers = False, {"X-Plivo-Signature-V3": "x",
                                      "X-Plivo-Signature-V3-Nonce": "1"}
    response = await plivo_gateway.post(real_path, real_form, headers=headers)
    assert response.status < 500, await response.text()
    if not signed:
        assert response.status == 403


async def test_junk_on_other_sockets_leaves_a_good_call_working(plivo_gateway, events, bus):
    good, _, call_id = await started_plivo_stream(plivo_gateway, events)
    received: list[bytes] = []

    async def on_in(msg):
        received.append(decode_frame(msg.data)[3])

    sub = await bus.nc.subscribe(f"parley.audio.{call_id}.in", cb=on_in)

    async def junk(n: int) -> int | None:
        _, bad_call_id, _ = await plivo_gateway.answer()
        stream = PlivoStreamClient(await plivo_gateway.ws(bad_call_id))
        await stream.ws.send_str(msgspec.json.encode(
            {"event": "start", "sequenceNumber": 1, "start": {
                "callId": new_call_uuid(), "streamId": "s"}}).decode() if n % 2 else "{" * n)
        return await _drain(stream.ws, 2.0)

    async def keep_talking():
        for n in range(40):
            await good.media(bytes([n]) * 160)
            await asyncio.sleep(0.01)

    results = await asyncio.gather(keep_talking(), *(junk(n) for n in range(1, 25)))
    assert set(results[1:]) == {CloseCode.UNSUPPORTED_DATA, CloseCode.POLICY_VIOLATION}
    await wait_for(lambda: len(received) == 40)
    assert received == [bytes([n]) * 160 for n in range(40)]
    await sub.unsubscribe()
    await good.ws.close()
