"""``Idempotency-Key`` retries during a NATS outage: what only the database decides is still
decided, at once.

These tests run their own nats-server (killed to make the outage) instead of the session's.
"""

import time

import pytest

from parley.common.bus import Bus
from parley.common.bus.client import connect
from parley.gateway.api import idempotency

from . import test_api_calls as calls_support
from . import test_api_idempotency as idempotency_support
from . import test_plivo_support as support
from .test_api_calls import body
from .test_api_idempotency import claimed_by_a_request_that_died, place, twilio_reports_status
from .test_nats_outage import cut_off

# the calls API tests' fixtures (the idempotency tests' gateway, on this test's bus below)
make_plivo_gateway = support.make_plivo_gateway
plivo_number = support.plivo_number
twilio_api = calls_support.twilio_api
keys = calls_support.keys
clock = idempotency_support.clock
api = idempotency_support.api


@pytest.fixture
async def bus(nats_server_of_test):
    """The gateway's bus, on this test's server (its JetStream requests time out after 5 s,
    the gateway's default)."""
    connected = Bus(await connect(nats_server_of_test.url, name="gateway"),
                    owns_connection=True)
    try:
        await connected.ensure_streams()
        yield connected
    finally:
        await connected.close()


@pytest.mark.parametrize("lease_out", [False, True])
async def test_a_retry_of_a_request_in_flight_is_answered_from_the_store_while_nats_is_away(
        nats_server_of_test, bus, api, twilio_api, keys, clock, lease_out: bool):
    # The first request marked its key dialling and Twilio placed its call (its status webhook
    # recorded it); the request's process died before its answer was stored. NATS is down when
    # the integrator retries. The retry needs nothing from NATS: a 409 while the key's lease
    # runs, then the 201 carrier_calls decides. Since c439b56 each such retry first asked the
    # event store whether the call had failed not dialled, which, NATS away, hung for the
    # JetStream timeout and raised: a 500 for a call placed, after 5 s.
    payload = body()
    dead = await claimed_by_a_request_that_died(api, payload, "k-outage", "call_" + "f" * 32)
    await idempotency.mark_dialling(api.gateway.app, dead)
    await twilio_reports_status(api, dead.call_id, "initiated")
    if lease_out:
        clock.advance(idempotency.IN_FLIGHT_LEASE.total_seconds() + 1)
    await cut_off(nats_server_of_test, bus)
    started = time.monotonic()
    retry = await place(api, keys["full"], payload, "k-outage")
    took = time.monotonic() - started
    if lease_out:
        assert retry.status == 201, await retry.text()
        assert (await retry.json())["call_id"] == dead.call_id
        assert retry.headers["Idempotent-Replayed"] == "true"
    else:
        assert retry.status == 409, await retry.text()
        assert (await retry.json())["type"].endswith("/idempotency-key-in-use")
    assert took < 1.0
    assert twilio_api.requests == []  # never dialled again
