"""What a carrier's failure shows the org that placed the call: never the platform's account."""

import socket

from . import test_api_calls as api_calls
from . import test_plivo_support as support
from .test_api_calls import body, place
from .test_plivo_support import PLIVO_AUTH_ID, PLIVO_NUMBER

# the shared fixtures, made visible to pytest in this module
make_plivo_gateway = support.make_plivo_gateway
plivo_number = support.plivo_number
keys = api_calls.keys


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_plivo_unreachable_does_not_show_the_platforms_auth_id(make_plivo_gateway, keys,
                                                                      events):
    # requests names the URL it could not reach, and Plivo's URLs hold the account's Auth ID
    # (/v1/Account/<auth id>/Call/): every org's API caller, and its call.failed, saw it.
    gateway = await make_plivo_gateway(plivo_api_base_url=f"http://127.0.0.1:{closed_port()}")
    response = await place(gateway, keys["full"], body(**{"from": PLIVO_NUMBER}))
    assert response.status == 502
    problem = await response.json()
    assert problem["type"].endswith("/carrier-error")
    assert "ConnectionError" in problem["detail"]
    [failed] = await events.wait("call.failed", problem["call_id"])
    assert PLIVO_AUTH_ID not in problem["detail"] and PLIVO_AUTH_ID not in failed.reason
    assert "127.0.0.1" not in problem["detail"] and "127.0.0.1" not in failed.reason
