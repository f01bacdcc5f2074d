"""POST /v1/calls while NATS is down: a 503 that says nothing was dialled, not a 500.

These tests run their own nats-server (killed and started again) instead of the session's.
"""

from . import test_api_calls as api_calls
from . import test_nats_outage as outage
from . import test_plivo_support as support
from .conftest import wait_for
from .test_api_calls import body, place

# the shared fixtures, made visible to pytest in this module (the bus on this test's server;
# nats_server_of_test is the package conftest's)
bus = outage.bus
make_plivo_gateway = support.make_plivo_gateway
plivo_number = support.plivo_number
twilio_api = api_calls.twilio_api
api = api_calls.api
keys = api_calls.keys


async def test_a_call_placed_while_nats_is_down_is_a_503_safe_to_retry(
        nats_server_of_test, bus, api, twilio_api, keys):
    """call.requested could not be published, so the carrier was never asked: NotDialled went
    unanswered and the client got a 500, which says nothing of whether the callee is ringing."""
    server = await outage.cut_off(nats_server_of_test, bus)
    try:
        response = await place(api, keys["full"], body())
    finally:
        server.start()  # the retry, once NATS is back, places the call
    assert response.status == 503, await response.text()
    assert response.content_type == "application/problem+json"
    problem = await response.json()
    assert problem["type"].endswith("/bus-unavailable")
    assert "not dialled" in problem["detail"] and "safe to retry" in problem["detail"]
    assert int(response.headers["Retry-After"]) >= 1
    assert not twilio_api.requests
    assert api.gateway.metric("gateway_api_calls_placed_total", outcome="not_dialled") == 1
    await wait_for(lambda: bus.nc.is_connected)
    response = await place(api, keys["full"], body())
    assert response.status == 201, await response.text()
    assert len(twilio_api.requests) == 1


async def test_a_call_not_dialled_takes_nothing_from_the_orgs_rate_limit(
        nats_server_of_test, bus, make_plivo_gateway, twilio_api, keys):
    """The org's last call of its burst, not dialled for the outage: its retry was a 429, the
    bucket charged for a call nobody placed."""
    api = await make_plivo_gateway(twilio_account_sid=api_calls.ACCOUNT,
                                   twilio_api_base_url=twilio_api.url,
                                   gateway_call_rate_per_s=0.001, gateway_call_burst=1)
    server = await outage.cut_off(nats_server_of_test, bus)
    try:
        response = await place(api, keys["full"], body())
    finally:
        server.start()
    assert response.status == 503, await response.text()
    await wait_for(lambda: bus.nc.is_connected)
    response = await place(api, keys["full"], body())
    assert response.status == 201, await response.text()
    assert (await place(api, keys["full"], body())).status == 429  # the burst, spent now


async def test_a_call_not_dialled_gives_its_idempotency_key_back(
        nats_server_of_test, bus, api, twilio_api, keys):
    """The 503 says the call was not dialled and is safe to retry: a retry with the same
    Idempotency-Key once NATS is back places the call, rather than getting the 503 again."""
    headers = {"X-API-Key": keys["full"], "Idempotency-Key": "k-outage"}
    server = await outage.cut_off(nats_server_of_test, bus)
    try:
        response = await api.gateway.client.post("/v1/calls", json=body(), headers=headers)
    finally:
        server.start()
    assert response.status == 503, await response.text()
    await wait_for(lambda: bus.nc.is_connected)
    response = await api.gateway.client.post("/v1/calls", json=body(), headers=headers)
    assert response.status == 201, await response.text()
    assert "Idempotent-Replayed" not in response.headers
    again = await api.gateway.client.post("/v1/calls", json=body(), headers=headers)
    assert (again.status, await again.json()) == (201, await response.json())
    assert len(twilio_api.requests) == 1
