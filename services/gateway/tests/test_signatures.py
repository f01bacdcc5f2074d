import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from twilio.request_validator import SIGNATURE_SETTINGS_HEADER, RequestValidator

from parley.common.configuration import AgentSettings, assign_number, create_agent, create_org
from parley.gateway.signature_audit import Refusal, RefusalFolder, SignatureAudit

from .conftest import (
    ACCOUNT,
    CALLER,
    CASCADING_NUMBER,
    ORG,
    PUBLIC,
    PUBLIC_WS,
    StreamClient,
    new_call_sid,
    sign,
)

UNKNOWN_NUMBER = "+14155550199"  # assigned to no org
OTHER_ORG, OTHER_NUMBER = "org_globex", "+14155550177"


def voice_params(call_sid: str) -> dict[str, str]:
    return {"CallSid": call_sid, "AccountSid": ACCOUNT, "From": CALLER, "To": CASCADING_NUMBER,
            "Direction": "inbound", "CallStatus": "ringing"}


def one_char_changed(text: str) -> str:
    replacement = "A" if text[5] != "A" else "B"
    return text[:5] + replacement + text[6:]


async def test_signature_from_the_sdk_is_accepted(gateway, events):
    params = voice_params(new_call_sid())
    response = await gateway.post("/twilio/voice", params,
                                  signature=sign(PUBLIC + "/twilio/voice", params))
    assert response.status == 200
    assert response.content_type == "application/xml"
    await events.wait("call.requested")
    assert gateway.metric("gateway_signature_rejections_total", carrier="twilio",
                          path="/twilio/voice") == 0


@pytest.mark.parametrize("tamper", ["signature", "param", "url", "missing"])
async def test_one_character_changed_is_rejected(gateway, events, tamper):
    params = voice_params(new_call_sid())
    signature = sign(PUBLIC + "/twilio/voice", params)
    if tamper == "signature":
        signature = one_char_changed(signature)
    elif tamper == "param":
        params["From"] = params["From"][:-1] + "8"
    elif tamper == "url":  # signed for another host: what a proxy mix-up looks like
        signature = sign(PUBLIC.replace("voice", "voicE") + "/twilio/voice", params)
    else:
        signature = ""
    response = await gateway.post("/twilio/voice", params, signature=signature)

    assert response.status == 403
    assert response.content_type == "application/problem+json"
    problem = await response.json()
    assert problem["status"] == 403 and problem["title"] == "Forbidden"
    assert problem["type"].endswith("/invalid-signature")
    assert "Signature" in problem["detail"]
    [rejected] = await events.wait("security.signature_rejected")
    assert rejected.org_id == ORG  # resolved from the called number
    assert rejected.path == "/twilio/voice" and rejected.carrier == "twilio"
    assert rejected.remote == "127.0.0.1" and rejected.reason
    assert not events.of("call.requested")  # never processed
    assert gateway.metric("gateway_signature_rejections_total", carrier="twilio",
                          path="/twilio/voice") == 1


async def test_rejection_from_an_unknown_number_is_audited_as_unknown(gateway, events):
    params = {**voice_params(new_call_sid()), "To": "+14155550199"}
    response = await gateway.post("/twilio/voice", params, signature="bogus")
    assert response.status == 403
    [rejected] = await events.wait("security.signature_rejected")
    assert rejected.org_id == "unknown"


@pytest.mark.parametrize("path", ["/twilio/status", "/twilio/amd", "/twilio/recording",
                                  "/twilio/voice/reconnect?call_id=x"])
async def test_every_webhook_checks_the_signature(gateway, events, path):
    params = {"CallSid": new_call_sid(), "CallStatus": "completed"}
    response = await gateway.post(path, params, signature=one_char_changed(
        sign(PUBLIC + path, params)))
    assert response.status == 403
    await events.wait("security.signature_rejected")


async def test_query_string_is_part_of_the_signed_url(gateway, events):
    params = {"CallSid": new_call_sid(), "CallStatus": "ringing"}
    path = "/twilio/status?call_id=call_1&org_id=org_acme&agent_id=ag_cascading"
    signed_without_query = sign(PUBLIC + "/twilio/status", params)
    response = await gateway.post(path, params, signature=signed_without_query)
    assert response.status == 403
    response = await gateway.post(path, params)  # signed over the full URL
    assert response.status == 204


@pytest.mark.parametrize("path", ["/twilio/stream", "/twilio/relay"])
async def test_websocket_upgrade_is_signed_over_the_wss_url(gateway, events, path):
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.ws(path, signature=one_char_changed(sign(PUBLIC_WS + path)))
    assert refused.value.status == 403
    [rejected] = await events.wait("security.signature_rejected")
    assert rejected.org_id == "unknown" and rejected.path == path

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.ws(path, signature=sign(PUBLIC + path))  # https:// instead of wss://
    assert refused.value.status == 403

    ws = await gateway.ws(path)  # correctly signed: upgraded
    await StreamClient(ws).connected()
    await ws.close()


async def test_without_an_auth_token_everything_is_refused(make_gateway, events):
    gateway = await make_gateway(twilio_auth_token="")
    params = voice_params(new_call_sid())
    response = await gateway.post("/twilio/voice", params)
    assert response.status == 403
    assert (await response.json())["detail"] == "no Twilio auth token configured"


SHARED_KEY_SECRET = "shared-key-secret-0123456789"


def shared_key_settings(algorithm: str) -> dict[str, str]:
    """The header Twilio adds when a Webhook Rule's Setting signs with a SharedKey."""
    return {SIGNATURE_SETTINGS_HEADER: f"key=KS{'0' * 32},algorithm={algorithm}"}


@pytest.mark.parametrize("algorithm", ["HMAC_SHA256", "HMAC_SHA1"])
async def test_a_webhook_signed_with_a_shared_key_is_checked_with_its_secret(
        make_gateway, events, algorithm):
    gateway = await make_gateway(twilio_webhook_shared_key_secret=SHARED_KEY_SECRET)
    params = voice_params(new_call_sid())
    signature = RequestValidator(SHARED_KEY_SECRET).compute_signature(
        PUBLIC + "/twilio/voice", params, algorithm)
    response = await gateway.post("/twilio/voice", params, signature=signature,
                                  headers=shared_key_settings(algorithm))
    assert response.status == 200
    await events.wait("call.requested")
    # the header names the key that signed: the Auth Token's signature does not pass with it
    params = voice_params(new_call_sid())
    response = await gateway.post("/twilio/voice", params,
                                  headers=shared_key_settings(algorithm))
    assert response.status == 403
    assert (await response.json())["detail"] == "invalid X-Twilio-Signature"
    # an upgrade is signed the same way
    ws = await gateway.client.ws_connect("/twilio/stream", headers={
        "X-Twilio-Signature": RequestValidator(SHARED_KEY_SECRET).compute_signature(
            PUBLIC_WS + "/twilio/stream", {}, algorithm), **shared_key_settings(algorithm)})
    await ws.close()


async def test_a_shared_key_signature_without_its_secret_is_refused_saying_why(gateway, events):
    params = voice_params(new_call_sid())
    signature = RequestValidator(SHARED_KEY_SECRET).compute_signature(
        PUBLIC + "/twilio/voice", params, "HMAC_SHA256")
    response = await gateway.post("/twilio/voice", params, signature=signature,
                                  headers=shared_key_settings("HMAC_SHA256"))
    assert response.status == 403
    assert "twilio_webhook_shared_key_secret" in (await response.json())["detail"]
    [rejected] = await events.wait("security.signature_rejected")
    assert "shared key" in rejected.reason
    assert not events.of("call.requested")


async def test_an_unsupported_signature_algorithm_is_refused(make_gateway, events):
    gateway = await make_gateway(twilio_webhook_shared_key_secret=SHARED_KEY_SECRET)
    response = await gateway.post("/twilio/voice", voice_params(new_call_sid()),
                                  signature="x", headers=shared_key_settings("HMAC_MD5"))
    assert response.status == 403
    assert (await response.json())["detail"] == "unsupported signature algorithm 'HMAC_MD5'"


async def test_errors_are_problem_documents(gateway):
    response = await gateway.client.get("/no/such/path")
    assert response.status == 404
    assert response.content_type == "application/problem+json"
    assert (await response.json())["status"] == 404
    response = await gateway.client.get("/twilio/voice")
    assert response.status == 405
    assert (await response.json())["title"] == "Method Not Allowed"


BAD_FORMS = [
    ("application/x-www-form-urlencoded; charset=no-such-charset", b"CallSid=CA1"),
    ("application/x-www-form-urlencoded", b"CallSid=\xff\xfe"),  # not UTF-8
    ("multipart/form-data", b"CallSid=CA1"),  # no boundary
    ("multipart/form-data; boundary=xx", b"not multipart at all"),
]


@pytest.mark.parametrize("content_type, data", BAD_FORMS)
@pytest.mark.parametrize("path", ["/twilio/voice", "/twilio/status", "/plivo/answer",
                                  "/plivo/hangup"])
async def test_a_form_that_cannot_be_read_is_a_400_problem(gateway, path, content_type, data):
    # Anyone can send these, signed or not: the form is read before its signature is checked.
    response = await gateway.client.post(path, data=data, headers={
        "Content-Type": content_type, "X-Twilio-Signature": "x"})
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    assert (await response.json())["type"].endswith("/invalid-webhook")


# -- a flood of forged requests: a 403 for each, a bounded audit that says how many ----------


class FrozenClock:
    """The gateway's clock, moved only by the test."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def forged(gateway, count: int, **changes: str) -> None:
    for _ in range(count):
        params = {**voice_params(new_call_sid()), **changes}
        response = await gateway.post("/twilio/voice", params, signature="forged")
        assert response.status == 403
        assert (await response.json())["type"].endswith("/invalid-signature")


async def test_a_flood_is_refused_each_time_and_audited_once_with_its_count(make_gateway,
                                                                           events):
    gateway = await make_gateway()
    await forged(gateway, 40)

    [first] = await events.wait("security.signature_rejected")
    assert (first.count, first.org_id, first.remote) == (1, ORG, "127.0.0.1")
    assert first.reason == "invalid X-Twilio-Signature"
    await asyncio.sleep(0.2)
    assert len(events.of("security.signature_rejected")) == 1  # the rest are folded
    assert gateway.metric("gateway_signature_rejections_total", carrier="twilio",
                          path="/twilio/voice") == 40  # the flood shows in the metric

    # what was folded is published when the gateway stops, not lost
    await gateway.client.close()
    [_, folded] = await events.wait("security.signature_rejected", count=2)
    assert (folded.count, folded.org_id, folded.path, folded.reason) == (
        39, ORG, "/twilio/voice", first.reason)
    assert not events.of("call.requested")


async def test_a_flood_that_goes_on_is_one_audit_event_per_interval(make_gateway, events):
    clock = FrozenClock()
    gateway = await make_gateway(clock=clock, gateway_signature_audit_interval_s=60)
    await forged(gateway, 10)
    await events.wait("security.signature_rejected")
    await forged(gateway, 5, To=UNKNOWN_NUMBER)  # the same source and reason, another number
    [_, other] = await events.wait("security.signature_rejected", count=2)
    assert (other.count, other.org_id) == (1, "unknown")  # a key of its own: audited at once

    clock.advance(30)
    await asyncio.sleep(1.2)  # the audit looks at its intervals every second
    assert len(events.of("security.signature_rejected")) == 2
    clock.advance(30)
    summaries = (await events.wait("security.signature_rejected", count=4))[2:]
    assert sorted((e.count, e.org_id) for e in summaries) == [(4, "unknown"), (9, ORG)]

    await forged(gateway, 6, To=UNKNOWN_NUMBER)  # still going: folded into the next interval
    await asyncio.sleep(1.2)
    assert len(events.of("security.signature_rejected")) == 4
    clock.advance(60)
    [*_, last] = await events.wait("security.signature_rejected", count=5)
    assert (last.count, last.org_id) == (6, "unknown")
    assert sum(e.count for e in events.of("security.signature_rejected")) == 21

    clock.advance(120)  # quiet again: the next refusal is audited at once
    await asyncio.sleep(1.2)
    await forged(gateway, 1)
    [*_, again] = await events.wait("security.signature_rejected", count=6)
    assert (again.count, again.org_id) == (1, ORG)


async def test_folded_refusals_are_counted_under_the_org_they_were_aimed_at(make_gateway,
                                                                           events, db):
    """One source forging webhooks to two orgs' numbers within an interval was folded into one
    summary (the called number was not part of the fold key), filed under the org of the first
    folded request with the count of all of them: one tenant's audit log counted refusals aimed
    at the other's numbers, and the other's showed nothing of them. The called number is now
    part of the key, so each org's audit counts only what was aimed at its own numbers."""
    await create_org(db, OTHER_ORG, "Globex")
    await create_agent(db, OTHER_ORG, "Globex agent", AgentSettings(), agent_id="ag_globex")
    await assign_number(db, OTHER_ORG, OTHER_NUMBER, "ag_globex")
    clock = FrozenClock()
    gateway = await make_gateway(clock=clock, gateway_signature_audit_interval_s=60)

    await forged(gateway, 1)  # to Acme's number: audited at once under Acme
    await events.wait("security.signature_rejected")
    await forged(gateway, 3, To=OTHER_NUMBER)  # the same source, to Globex's number
    await forged(gateway, 5)  # and more to Acme's: folded
    clock.advance(61)
    # Four: each org's first at once, then each org's folded rest (waiting for three raced the
    # two folded summaries, published together, and failed a CI run).
    audited = await events.wait("security.signature_rejected", count=4)

    per_org: dict[str, list[int]] = {}
    for event in audited:
        per_org.setdefault(event.org_id, []).append(event.count)
    assert per_org == {ORG: [1, 5], OTHER_ORG: [1, 2]}


async def test_refusals_from_more_sources_than_tracked_are_folded_together(make_gateway,
                                                                          events):
    gateway = await make_gateway(gateway_signature_audit_max_sources=1,
                                 twilio_webhook_shared_key_secret=SHARED_KEY_SECRET)
    await forged(gateway, 3)  # tracked: one event now, two folded
    for algorithm in ("HMAC_MD5", "HMAC_X", "HMAC_Y", "HMAC_Z"):  # a reason each, made up
        response = await gateway.post("/twilio/voice", voice_params(new_call_sid()),
                                      signature="x", headers=shared_key_settings(algorithm))
        assert response.status == 403
        assert algorithm in (await response.json())["detail"]

    first, overflow = await events.wait("security.signature_rejected", count=2)
    assert (first.reason, first.count, first.org_id) == ("invalid X-Twilio-Signature", 1, ORG)
    assert "more sources than the audit tracks" in overflow.reason
    assert (overflow.remote, overflow.count) == ("", 1)
    # the overflow folds requests aimed at any org's numbers: it is filed under none of them
    assert overflow.org_id == "unknown"
    await asyncio.sleep(0.2)
    assert len(events.of("security.signature_rejected")) == 2

    await gateway.client.close()
    audited = await events.wait("security.signature_rejected", count=4)
    assert sorted(e.count for e in audited[2:]) == [2, 3]
    assert sum(e.count for e in audited) == 7


def test_a_wall_clock_stepped_back_does_not_hold_folded_refusals_back():
    """An interval ends once the wall clock is ``interval_s`` past its opening. When the clock
    stepped back (an NTP correction, a VM restored), the opening was in the future, and the
    folded refusals waited until the clock was back past it (an hour's step: an hour without
    their audit). The interval now starts again at the step, and ends one interval later."""
    clock = FrozenClock()
    folder = RefusalFolder(interval_s=60, max_sources=10)
    assert folder.admit(refusal_from("203.0.113.9"), clock()) is not None
    assert folder.admit(refusal_from("203.0.113.9"), clock()) is None  # folded
    clock.advance(-3600)  # NTP steps the clock back an hour
    assert folder.due(clock()) == []
    clock.advance(61)
    assert [(refusal.remote, count) for refusal, count in folder.due(clock())] == [
        ("203.0.113.9", 1)]


# -- the audit's flushing task at shutdown ---------------------------------------------------


class AckingBus:
    """The real bus, whose publishes then wait for a second ack with ``asyncio.wait_for`` (as
    nats-py's JetStream publish waits for its own) while ``hold`` is set: the test resolves (or
    not) that ack, to land a cancellation exactly where the race is."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.hold = False
        self.pending: asyncio.Future[None] | None = None
        self.published: list[Any] = []
        self.waiting = asyncio.Event()

    async def publish(self, event: Any) -> None:
        await self.bus.publish(event)  # stored in JetStream for real
        self.published.append(event)
        if not self.hold:
            return
        self.pending = asyncio.get_running_loop().create_future()
        self.waiting.set()
        await asyncio.wait_for(self.pending, 5.0)


def bus_audit(bus: AckingBus, clock: FrozenClock) -> SignatureAudit:
    """An audit over ``bus`` (refusals without a number: no org lookup, so no pool)."""
    return SignatureAudit(bus=bus, pool=None,  # type: ignore[arg-type]
                          folder=RefusalFolder(interval_s=0.05, max_sources=10), clock=clock)


def refusal_from(remote: str) -> Refusal:
    return Refusal(carrier="twilio", route="/twilio/voice", path="/twilio/voice", remote=remote,
                   reason="invalid X-Twilio-Signature")


async def test_the_audit_task_stops_when_a_publish_swallowed_its_cancellation(bus):
    """The gateway's shutdown cancels the audit's flushing task and waits for it. On Python
    3.11 ``asyncio.wait_for`` (which nats-py's publish ack and flush use) returns the result
    instead of raising when the cancellation lands in the iteration its future resolves: the
    CancelledError was swallowed, the task slept and flushed on for good, and the shutdown
    hung. The task now stops at a cancellation requested of it, swallowed or not."""
    held, clock = AckingBus(bus), FrozenClock()
    audit = bus_audit(held, clock)
    await audit.refused(refusal_from("203.0.113.9"))  # audited at once
    await audit.refused(refusal_from("203.0.113.9"))  # folded
    clock.advance(60)
    held.hold = True
    task = asyncio.create_task(audit.run(), name="signature-audit")
    await held.waiting.wait()  # publishing the folded count
    assert held.pending is not None
    held.pending.set_result(None)  # the ack arrives ...
    task.cancel()  # ... as the gateway shuts down
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(task), 3.0)  # TimeoutError: it ran on
    assert task.done()
    assert [e.count for e in held.published] == [1, 1]


async def test_a_flush_cut_short_at_shutdown_leaves_the_rest_to_the_last_flush(bus):
    """A flush that is cancelled while publishing one folded count (the gateway shutting down)
    had taken every due count out of the audit: the ones after it were lost, and the last
    flush at shutdown found nothing. They are now folded back in, and that flush publishes
    them."""
    held, clock = AckingBus(bus), FrozenClock()
    audit = bus_audit(held, clock)
    for remote in ("203.0.113.9", "203.0.113.10"):
        for _ in range(3):  # one audited at once, two folded
            await audit.refused(refusal_from(remote))
    clock.advance(60)
    held.hold = True
    task = asyncio.create_task(audit.run(), name="signature-audit")
    await held.waiting.wait()  # publishing the first folded count; its ack never comes
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    held.hold = False
    await audit.flush(everything=True)  # as the gateway's shutdown does next
    assert [(e.remote, e.count) for e in held.published] == [
        ("203.0.113.9", 1), ("203.0.113.10", 1), ("203.0.113.9", 2), ("203.0.113.10", 2)]
