import asyncio
import json
import os
import socket
import subprocess
import sys

import aiohttp

from .conftest import request_tool, start_call, wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_python_m_parley_tools_serves_requests(bus, nats_url, database_url, orgs, events,
                                                     api_key, tmp_path):
    ops_port, http_port = free_port(), free_port()
    env = dict(os.environ, PARLEY_NATS_URL=nats_url, PARLEY_DATABASE_URL=database_url,
               PARLEY_OPS_PORT=str(ops_port), PARLEY_TOOLS_HTTP_PORT=str(http_port),
               PARLEY_TOOLS_CONCURRENCY="2")
    hangups = []

    async def on_hangup(msg):
        hangups.append(msg.subject)
        await msg.respond(json.dumps({"ok": True}).encode())

    await bus.nc.subscribe("parley.cmd.gateway.*.hangup", cb=on_hangup)
    with open(tmp_path / "tools.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "parley.tools"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            async with aiohttp.ClientSession() as http:
                async def ready():
                    try:
                        async with http.get(f"http://127.0.0.1:{ops_port}/readyz") as response:
                            return response.status == 200
                    except aiohttp.ClientError:
                        return False

                await wait_for(ready, timeout=30)
                call_id = await start_call(bus)
                request = await request_tool(bus, call_id, "end_call")
                assert (await events.outcome(request.tool_call_id)).type == "tool.completed"
                assert hangups == [f"parley.cmd.gateway.{call_id}.hangup"]

                url = f"http://127.0.0.1:{http_port}/v1/tool-calls/nope/approve"
                async with http.post(url, headers={"X-API-Key": api_key}) as response:
                    assert response.status == 404
        finally:
            proc.terminate()
            code = await asyncio.to_thread(proc.wait, 15)
    assert code == 0, (tmp_path / "tools.log").read_text()
