"""The gateway's stop during a NATS outage ends within an orchestrator's kill grace (30 s).

These tests run their own nats-server, and the gateway's bus has the production settings (a
5 s publish timeout, nats-py's 2 MiB buffer): how long a publish waits for a server that is
away is what the stop's bounded waits are made of.
"""

import asyncio

import pytest

from parley.common.bus import Bus
from parley.common.bus.client import connect

from .conftest import started_stream
from .test_nats_outage import cut_off
from .test_signatures import forged


@pytest.fixture
async def bus(nats_server_of_test):
    connected = Bus(await connect(nats_server_of_test.url, name="gateway"),
                    owns_connection=True)
    try:
        await connected.ensure_streams()
        yield connected
    finally:
        await connected.close()


async def test_a_stop_during_an_outage_with_audit_events_folded_ends_within_the_kill_grace(
        nats_server_of_test, bus, gateway, events):
    """SIGTERM during a NATS outage, a call's mark echo still being published again and
    refused signatures from a few sources folded: the outboxes' drain took its 10 s, and then
    the audit's last flush waited out the publish timeout (5 s) for each folded source, one
    after the other: 30 s for four, and the orchestrator's SIGKILL came before the stop ended
    (the pool and the bus never closed, nothing logged of what was lost). The stop's waits now
    share one budget, within the kill grace."""
    stream, _, _ = await started_stream(gateway, events)
    for source in range(4):  # the first of each published at once, the second folded
        await forged(gateway, 2, To=f"+1415555012{source}")
    await events.wait("security.signature_rejected", count=4)
    await cut_off(nats_server_of_test, bus)
    await stream.mark("t1:3")  # waits in the call's outbox for the server
    await asyncio.sleep(0.5)

    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(gateway.client.close(), 60)  # the app's shutdown and cleanup
    # 30 s of kill grace, less what closing the pool and the bus and exiting take
    assert loop.time() - started < 25.0
    assert gateway.metric("gateway_call_events_dropped_total") == 1
