"""An EVENTS stream deleted and created again numbers its messages from 1 again."""

import uuid
from dataclasses import replace

from parley.common import events as ev
from parley.common.bus import EVENTS_STREAM, Bus
from parley.common.bus.streams import StreamSettings, stream_configs
from parley.common.metrics import Metrics

from .conftest import wait_for
from .test_recorder import _at, rows, running_recorder


def said(text: str) -> ev.TranscriptFinal:
    return ev.TranscriptFinal(org_id="o1", call_id="c1", text=text)


async def recreate_stream(bus: Bus) -> None:
    await bus.js.delete_stream(EVENTS_STREAM)
    await bus.ensure_streams()


async def publish_all(bus: Bus, texts: str, count: int) -> list[ev.TranscriptFinal]:
    """Publish ``count`` events said "<texts> 0", "<texts> 1"…; return them."""
    events = [said(f"{texts} {i}") for i in range(count)]
    for event in events:
        await bus.publish(event)
    return events


async def record(bus: Bus, database_url: str, upto: int) -> None:
    """Run a recorder until it has recorded up to position ``upto``."""
    async with running_recorder(bus, database_url):
        await wait_for(lambda: _at(database_url, upto))


def stored_ids(database_url: str) -> list[uuid.UUID]:
    return [row[0] for row in rows(database_url, "SELECT event_id FROM events ORDER BY position")]


def accounted_positions(database_url: str) -> list[int]:
    return [row[0] for row in rows(database_url, "SELECT position FROM events UNION ALL "
                                                 "SELECT position FROM dead_letters ORDER BY 1")]


async def test_a_stream_recreated_while_recording_is_recorded_from_its_first_message(
        bus: Bus, database_url: str) -> None:
    before = await publish_all(bus, "before", 5)
    after = [said(f"after {i}") for i in range(3)]
    metrics = Metrics("recorder")
    async with running_recorder(bus, database_url, metrics=metrics):
        await wait_for(lambda: _at(database_url, 5))
        await recreate_stream(bus)
        # The first old event again (a republish, a restore): the store keeps it once.
        for event in [before[0], *after]:
            await bus.publish(event)
        await wait_for(lambda: _at(database_url, 9))
    assert stored_ids(database_url) == [e.id for e in before + after]
    assert accounted_positions(database_url) == list(range(1, 10))
    assert rows(database_url, "SELECT position, reason FROM dead_letters") == [
        (6, f"duplicate: event {before[0].id} already at position 1")]
    assert metrics.registry.get_sample_value("parley_recorder_streams_recreated_total") == 1


async def test_a_stream_recreated_while_the_recorder_was_down_is_noticed_by_its_identity(
        bus: Bus, database_url: str) -> None:
    before = await publish_all(bus, "before", 3)
    await record(bus, database_url, 3)
    await recreate_stream(bus)
    # More than were recorded: the new stream's last sequence is past the checkpoint.
    after = await publish_all(bus, "after", 5)
    await record(bus, database_url, 8)
    assert stored_ids(database_url) == [e.id for e in before + after]
    assert accounted_positions(database_url) == list(range(1, 9))


async def test_a_stream_recreated_before_its_identity_was_kept_is_noticed_by_its_sequences(
        bus: Bus, database_url: str) -> None:
    """A recorder of a version that kept no stream identity recorded up to position 4."""
    before = await publish_all(bus, "before", 4)
    await record(bus, database_url, 4)
    rows(database_url, "DELETE FROM recorder_streams RETURNING 1")
    await recreate_stream(bus)
    after = await publish_all(bus, "after", 2)
    await record(bus, database_url, 6)
    assert stored_ids(database_url) == [e.id for e in before + after]


async def test_a_stream_recreated_numbered_on_from_the_checkpoint_keeps_its_sequences(
        bus: Bus, database_url: str) -> None:
    """What docs/architecture.md tells an operator to do: ``first_seq`` one past the checkpoint."""
    before = await publish_all(bus, "before", 3)
    async with running_recorder(bus, database_url):
        await wait_for(lambda: _at(database_url, 3))
        [config] = [c for c in stream_configs(StreamSettings()) if c.name == EVENTS_STREAM]
        await bus.js.delete_stream(EVENTS_STREAM)
        await bus.js.add_stream(replace(config, first_seq=4))
        after = [said(f"after {i}") for i in range(2)]
        acks = [await bus.publish(event) for event in after]
        await wait_for(lambda: _at(database_url, 5))
    assert [ack.seq for ack in acks] == [4, 5]
    assert rows(database_url, "SELECT position, event_id FROM events ORDER BY 1") == \
        [(i, e.id) for i, e in enumerate(before + after, 1)]
    assert rows(database_url, "SELECT since_position, sequence_offset FROM recorder_streams "
                              "ORDER BY 1") == [(0, 0), (3, 0)]
