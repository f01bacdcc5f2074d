"""Faults around the recorder: NATS API errors and Postgres connections that go quiet."""

import asyncio
import dataclasses
import os
import socket
from urllib.parse import urlsplit

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from parley.common import events as ev
from parley.common.bus import EVENTS_STREAM, Bus
from parley.recorder.worker import _connect

from .conftest import TcpProxy, wait_for
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


class BlackholeProxy(TcpProxy):
    """While ``silent``, swallows what either side sends.

    What a recorder sees of a Postgres behind a network blackhole or hung: its bytes are
    taken, nothing comes back, nothing is closed.
    """

    silent = False

    def keep(self, data: bytes, *, to_client: bool) -> bool:
        return not self.silent


async def test_a_leader_whose_postgres_goes_silent_lets_go_within_seconds(
        bus: Bus, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    url = urlsplit(database_url)
    proxy = BlackholeProxy(url.port or 5432)
    proxied_url = url._replace(netloc=f"{url.username}@127.0.0.1:{await proxy.start()}").geturl()
    try:
        await bus.publish(ev.CallRinging(org_id="o1", call_id="c1"))
        async with running_recorder(bus, proxied_url) as recorder:
            await wait_for(lambda: _at(database_url, 1))
            proxy.silent = True
            # Lets go within 20 s, not minutes: 2 s without an answer, then psycopg's own
            # 5 s cancel request and 5 s wait for the query to end.
            await wait_for(lambda: not recorder.leader, timeout=20)
            # Connecting again to the silent server gives up rather than waiting for ever.
            await wait_for(lambda: "connection timeout expired" in caplog.text, timeout=15)
            proxy.silent = False
            await bus.publish(ev.CallAnswered(org_id="o1", call_id="c1"))
            await wait_for(lambda: _at(database_url, 2), timeout=30)
    finally:
        await proxy.close()
    assert rows(database_url, "SELECT position FROM events ORDER BY 1") == [(1,), (2,)]


async def test_connections_ask_both_ends_to_notice_a_dead_peer(database_url: str) -> None:
    async with _connect(database_url) as conn:
        client = conn.info.get_parameters()
        assert (client["connect_timeout"], client["keepalives_idle"],
                client["tcp_user_timeout"]) == ("5", "5", "10000")
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 10_000
        server = await (await conn.execute(
            "SELECT current_setting('tcp_keepalives_idle'), "
            "current_setting('tcp_keepalives_count'), current_setting('tcp_user_timeout')"
        )).fetchone()
        assert server == ("5", "3", "10000")
