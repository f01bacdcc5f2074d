from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from parley.common.metrics import Metrics
from parley.common.ops import OpsServer, ReadyCheck, create_ops_app


class Readiness:
    def __init__(self) -> None:
        self.ready = False

    def __call__(self) -> bool:
        return self.ready


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def metrics() -> Metrics:
    return Metrics("gateway")


@pytest.fixture
async def servers() -> AsyncIterator[list[OpsServer]]:
    started: list[OpsServer] = []
    yield started
    for server in started:
        await server.stop()


async def serve(servers: list[OpsServer], metrics: Metrics, ready: ReadyCheck) -> str:
    server = OpsServer(create_ops_app(service="gateway", registry=metrics.registry, ready=ready))
    servers.append(server)
    port = await server.start("127.0.0.1", 0)
    assert port > 0 and server.port == port
    return f"http://127.0.0.1:{port}"


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json()


async def test_healthz(
    http: aiohttp.ClientSession, metrics: Metrics, servers: list[OpsServer]
) -> None:
    base = await serve(servers, metrics, lambda: False)
    assert await get(http, f"{base}/healthz") == (200, {"status": "ok", "service": "gateway"})


async def test_readyz_follows_a_sync_check(
    http: aiohttp.ClientSession, metrics: Metrics, servers: list[OpsServer]
) -> None:
    readiness = Readiness()
    base = await serve(servers, metrics, readiness)
    assert await get(http, f"{base}/readyz") == (503, {"ready": False})
    readiness.ready = True
    assert await get(http, f"{base}/readyz") == (200, {"ready": True})


async def test_readyz_awaits_an_async_check(
    http: aiohttp.ClientSession, metrics: Metrics, servers: list[OpsServer]
) -> None:
    async def connected() -> bool:
        return True

    base = await serve(servers, metrics, connected)
    assert await get(http, f"{base}/readyz") == (200, {"ready": True})


async def test_readyz_is_not_ready_when_the_check_raises(
    http: aiohttp.ClientSession,
    metrics: Metrics,
    servers: list[OpsServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> bool:
        raise ConnectionError("nats down")

    base = await serve(servers, metrics, broken)
    assert await get(http, f"{base}/readyz") == (503, {"ready": False})
    assert "readiness check failed" in caplog.text


async def test_metrics_serves_the_service_registry(
    http: aiohttp.ClientSession, metrics: Metrics, servers: list[OpsServer]
) -> None:
    metrics.counter("calls", "Calls handled").inc(2)
    base = await serve(servers, metrics, lambda: True)
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        assert "parley_calls_total 2.0" in await response.text()


async def test_start_on_a_fixed_port_and_stop_releases_it(metrics: Metrics) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_ops_app(service="gateway", registry=metrics.registry, ready=lambda: True)
    server = OpsServer(app)
    assert await server.start("127.0.0.1", port) == port
    with pytest.raises(RuntimeError, match="already started"):
        await server.start("127.0.0.1", 0)
    await server.stop()
    await server.stop()
    assert server.port is None
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


async def test_start_failure_leaves_server_stopped(metrics: Metrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = OpsServer(
            create_ops_app(service="gateway", registry=metrics.registry, ready=lambda: True)
        )
        with pytest.raises(OSError):
            await server.start("127.0.0.1", port)
    assert server.port is None
