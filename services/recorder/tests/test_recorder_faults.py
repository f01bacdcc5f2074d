"""Faults around the recorder: NATS API errors and Postgres connections that go quiet."""

import asyncio
import dataclasses

from nats.js.api import AckPolicy, ConsumerConfig

from parley.common import events as ev
from parley.common.bus import EVENTS_STREAM, Bus

from .conftest import wait_for
from .test_recorder import _at, rows, running_recorder


async def test_a_nats_api_error_is_retried_not_fatal(bus: Bus, database_url: str) -> None:
    # The stream's consumer limit is reached, so creating the recorder's consumer gets a 400
    # (an API error that is neither 404 nor 503) until a consumer goes away.
    info = await bus.js.stream_info(EVENTS_STREAM)
    await bus.js.update_stream(dataclasses.replace(info.config, max_consumers=1))
    await bus.js.add_consumer(EVENTS_STREAM, ConsumerConfig(
        name="blocker", ack_policy=AckPolicy.NONE, mem_storage=True))
    await bus.publish(ev.CallRinging(org_id="o1", call_id="c1"))
    async with running_recorder(bus, database_url) as recorder:
        await wait_for(lambda: recorder.leader)
        await asyncio.sleep(1.0)  # at least one refused attempt
        assert recorder.leader
        await bus.js.delete_consumer(EVENTS_STREAM, "blocker")
        await wait_for(lambda: _at(database_url, 1))
    assert rows(database_url, "SELECT position FROM events") == [(1,)]
