"""Bodies of POST /v1/calls that are not JSON at all: a 400 problem, nothing dialled."""

import pytest

from . import test_api_calls as api_calls
from . import test_plivo_support as support
from .test_api_calls import place

# the shared fixtures, made visible to pytest in this module
make_plivo_gateway = support.make_plivo_gateway
plivo_number = support.plivo_number
twilio_api = api_calls.twilio_api
api = api_calls.api
keys = api_calls.keys


@pytest.mark.parametrize("data", [
    b'{"agent_id": "\xff"}',  # a string that is not UTF-8
    b'{"agent_id": "ag_1", "to": "+14155550123", "from": "+14155550100", '
    b'"context": {"\xc3": 1}}',  # a key cut in the middle of a character
], ids=["string", "key"])
async def test_a_body_that_is_not_utf8_is_a_400(api, twilio_api, keys, events, data):
    response = await place(api, keys["full"], data)
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    assert (await response.json())["type"].endswith("/malformed-json")
    assert not twilio_api.requests and not events.of("call.requested")


async def test_a_body_that_does_not_decompress_is_a_400(api, twilio_api, keys, events):
    response = await api.gateway.client.post("/v1/calls", data=b"not gzip at all", headers={
        "X-API-Key": keys["full"], "Content-Type": "application/json",
        "Content-Encoding": "gzip"})
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    assert (await response.json())["type"].endswith("/unreadable-body")
    assert not twilio_api.requests and not events.of("call.requested")
