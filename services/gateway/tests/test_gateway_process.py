import asyncio
import os
import signal
import socket
import subprocess
import sys

import aiohttp
import psycopg

from parley.common.configuration import create_org

from .conftest import CALLER, CASCADING_NUMBER, PUBLIC, PUBLIC_WS, TOKEN, new_call_sid, sign
from .conftest import closed as closed_with


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_gateway(env: dict[str, str], log_path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "parley.gateway"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)


async def test_python_m_parley_gateway_serves_relays_the_outbox_and_goes_away(
        nats_url, database_url, configured, events, tmp_path):
    port = free_port()
    env = dict(os.environ, PARLEY_NATS_URL=nats_url, PARLEY_DATABASE_URL=database_url,
               PARLEY_PUBLIC_BASE_URL=PUBLIC, PARLEY_TWILIO_AUTH_TOKEN=TOKEN,
               PARLEY_HTTP_PORT=str(port), PARLEY_INSTANCE_ID="gw-proc")
    proc = start_gateway(env, tmp_path / "gateway.log")
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(base + "/nothing-here") as response:
                        assert response.status == 404
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            # configuration written through the outbox reaches the bus
            async with await psycopg.AsyncConnection.connect(database_url,
                                                             autocommit=True) as conn:
                await create_org(conn, "org_later", "Later")
            await events.wait("org.created", timeout=10)

            form = {"CallSid": new_call_sid(), "From": CALLER, "To": CASCADING_NUMBER}
            async with session.post(base + "/twilio/voice", data=form, headers={
                    "X-Twilio-Signature": sign(PUBLIC + "/twilio/voice", form)}) as response:
                assert response.status == 200
                assert "<Stream" in await response.text()

            ws = await session.ws_connect(base + "/twilio/stream", headers={
                "X-Twilio-Signature": sign(PUBLIC_WS + "/twilio/stream")})
            await asyncio.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert await closed_with(ws, timeout=10) == (1001, "server shutting down")
            await ws.close()
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
