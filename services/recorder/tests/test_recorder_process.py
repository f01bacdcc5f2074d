"""The recorder as a real process: crashes, restarts, ops endpoints."""

import asyncio
import random
import signal

import aiohttp

from parley.common import events as ev
from parley.common.bus import Bus
from parley.devkit.infra import free_port

from .conftest import wait_for
from .test_recorder import _at, call_script, rows


async def publish_calls(bus: Bus, first: int, count: int) -> int:
    published = 0
    for i in range(first, first + count):
        for event in call_script(f"c{i}"):
            await bus.publish(event)
            published += 1
    return published


def assert_exactly_once(database_url: str, total: int) -> None:
    positions = [p for (p,) in rows(database_url, "SELECT position FROM events ORDER BY 1")]
    assert positions == list(range(1, total + 1)), "positions must be exactly 1..N"
    assert rows(database_url, "SELECT count(DISTINCT event_id) FROM events") == [(total,)]
    assert rows(database_url, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert rows(database_url, "SELECT position FROM checkpoints WHERE name = 'recorder'") == \
        [(total,)]


async def test_sigkill_between_insert_and_commit_loses_and_duplicates_nothing(
        bus: Bus, database_url: str, recorder_process) -> None:
    total = await publish_calls(bus, 0, 50)
    crashing = recorder_process(PARLEY_RECORDER_BATCH_SIZE="100",
                                PARLEY_RECORDER_CRASH_POINT="after_insert",
                                PARLEY_RECORDER_CRASH_AFTER_BATCHES="2")
    assert await asyncio.to_thread(crashing.wait, 30) == -signal.SIGKILL
    first_batch = rows(database_url, "SELECT count(*) FROM events")[0][0]
    assert first_batch == 100  # batch 2 was inserted but never committed
    recorder_process(PARLEY_RECORDER_BATCH_SIZE="100")
    await wait_for(lambda: _at(database_url, total), timeout=30)
    assert_exactly_once(database_url, total)


async def test_sigkill_after_commit_before_moving_on_is_exactly_once(
        bus: Bus, database_url: str, recorder_process) -> None:
    total = await publish_calls(bus, 0, 30)
    crashing = recorder_process(PARLEY_RECORDER_BATCH_SIZE="64",
                                PARLEY_RECORDER_CRASH_POINT="after_commit",
                                PARLEY_RECORDER_CRASH_AFTER_BATCHES="1")
    assert await asyncio.to_thread(crashing.wait, 30) == -signal.SIGKILL
    assert rows(database_url, "SELECT count(*) FROM events") == [(64,)]
    recorder_process(PARLEY_RECORDER_BATCH_SIZE="64")
    await wait_for(lambda: _at(database_url, total), timeout=30)
    assert_exactly_once(database_url, total)


async def test_random_sigkills_under_load_are_exactly_once(
        bus: Bus, database_url: str, recorder_process) -> None:
    rng = random.Random(7)
    total = 0
    for round_number in range(4):
        proc = recorder_process(PARLEY_RECORDER_BATCH_SIZE="50")
        publisher = asyncio.create_task(publish_calls(bus, round_number * 40, 40))
        await asyncio.sleep(rng.uniform(0.3, 0.8))
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        total += await publisher
    recorder_process()
    await wait_for(lambda: _at(database_url, total), timeout=30)
    assert_exactly_once(database_url, total)


async def test_ops_endpoints(bus: Bus, database_url: str, recorder_process) -> None:
    port = free_port()
    recorder_process(PARLEY_OPS_PORT=str(port))
    await bus.publish(ev.CallRinging(org_id="o1", call_id="c1"))
    await wait_for(lambda: _at(database_url, 1), timeout=30)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        async with http.get("/healthz") as resp:
            assert resp.status == 200 and (await resp.json())["service"] == "recorder"
        async with http.get("/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["ready"] is True
        async with http.get("/metrics") as resp:
            text = await resp.text()
            assert "parley_recorder_events_total 1.0" in text


async def test_a_standby_is_ready_and_says_it_does_not_lead(
        bus: Bus, database_url: str, recorder_process) -> None:
    # A rolling update starts the new recorder beside the old and waits for it to be ready: a
    # standby was never ready (only the leader was), so the rollout waited for ever.
    ports = free_port(), free_port()
    recorder_process(PARLEY_OPS_PORT=str(ports[0]))
    await bus.publish(ev.CallRinging(org_id="o1", call_id="c1"))
    await wait_for(lambda: _at(database_url, 1), timeout=30)
    standby = recorder_process(PARLEY_OPS_PORT=str(ports[1]))

    async def ops(port: int) -> tuple[int, str]:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.get("/readyz") as resp:
                status = resp.status
            async with http.get("/metrics") as resp:
                return status, await resp.text()

    async def standing_by() -> bool:
        try:
            status, metrics = await ops(ports[1])
        except aiohttp.ClientError:
            return False
        return status == 200 and "parley_recorder_leader 0.0" in metrics

    deadline = asyncio.get_running_loop().time() + 30
    while not await standing_by():
        assert asyncio.get_running_loop().time() < deadline, await ops(ports[1])
        await asyncio.sleep(0.2)
    status, metrics = await ops(ports[0])
    assert status == 200 and "parley_recorder_leader 1.0" in metrics
    assert standby.poll() is None


async def test_bad_configuration_fails_at_start_naming_the_variable(
        recorder_process, tmp_path) -> None:
    proc = recorder_process(PARLEY_RECORDER_BATCH_SIZE="lots")
    assert await asyncio.to_thread(proc.wait, 30) != 0
    output = (tmp_path / "recorder-0.log").read_text()
    assert "PARLEY_RECORDER_BATCH_SIZE" in output
