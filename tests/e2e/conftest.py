"""Every service involved as its own process: gateway and recorder, real NATS and Postgres."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psycopg
import pytest
from aiohttp import web

from parley.common.configuration import (
    AgentSettings,
    assign_number,
    create_agent,
    create_api_key,
    create_org,
)
from parley.devkit.infra import free_port
from parley.devkit.telephony.emulated_call import Callee
from parley.devkit.telephony.twilio_emulator import EMULATOR, create_emulator_app

ACCOUNT_SID = "AC" + "7" * 32
AUTH_TOKEN = "e2e0e2e0e2e0e2e0e2e0e2e0e2e0e2e0"
ORG = "dental"
AGENT_NUMBER = "+14155550100"
CALLER = "+14155550123"
CALLEE_HUMAN = "+14155550177"
CALLEE_MACHINE = "+14155550188"
LOG_TAIL_LINES = 80
_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember a failed test body, so the teardown below can show the services' logs."""
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report


@dataclass
class Platform:
    gateway_url: str
    emulator_url: str
    database_url: str
    api_key: str
    emulator: web.Application
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen[bytes]]

    def spawn(self, service: str, name: str = "", **extra: str) -> subprocess.Popen[bytes]:
        """Start another service process (``python -m parley.<service>``) with extra env."""
        log = self.logs / f"{name or service}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", f"parley.{service}"],
                                    env={**self.env, **extra}, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc


async def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(f"process exited: {log.read_text()[-3000:]}")
            try:
                async with session.get(url + "/healthz-probe"):
                    return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never came up")


@pytest.fixture
def processes(request: pytest.FixtureRequest,
              tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.terminate()
    for proc in started:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if request.node.stash.get(_FAILED, False):  # what each service said, in the report
        for log in sorted(tmp_path.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            print(f"----- {log.name} (last {len(lines)} lines) -----", *lines, sep="\n")


@pytest.fixture
async def platform(nats_url: str, database_url: str, tmp_path: Path,
                   processes: list[subprocess.Popen[bytes]]) -> AsyncIterator[Platform]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await create_org(conn, ORG, "Bright Smile Dental")
        await create_agent(conn, ORG, "Reception", AgentSettings(machine_policy="hangup"),
                           agent_id="reception")
        await assign_number(conn, ORG, AGENT_NUMBER, "reception")
        _, api_key = await create_api_key(conn, ORG, name="e2e")

    gateway_port, emulator_port = free_port(), free_port()
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    emulator_app = create_emulator_app(
        gateway_url=gateway_url, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID,
        emulator_url=emulator_url,
        callees={CALLEE_HUMAN: Callee(answered_by="human"),
                 CALLEE_MACHINE: Callee(answered_by="machine_end_beep")})
    runner = web.AppRunner(emulator_app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", emulator_port).start()

    env = dict(os.environ, PARLEY_NATS_URL=nats_url, PARLEY_DATABASE_URL=database_url,
               PARLEY_LOG_LEVEL="INFO")
    services = {
        "recorder": {},
        "gateway": {"PARLEY_HTTP_PORT": str(gateway_port), "PARLEY_PUBLIC_BASE_URL": gateway_url,
                    "PARLEY_TWILIO_ACCOUNT_SID": ACCOUNT_SID,
                    "PARLEY_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                    "PARLEY_TWILIO_API_BASE_URL": emulator_url},
    }
    for name, extra in services.items():
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            processes.append(subprocess.Popen([sys.executable, "-m", f"parley.{name}"],
                                              env={**env, **extra}, stdout=out,
                                              stderr=subprocess.STDOUT))
    await _wait_http(gateway_url, processes[-1], tmp_path / "gateway.log")
    try:
        yield Platform(gateway_url, emulator_url, database_url, api_key, emulator_app, env,
                       tmp_path, processes)
    finally:
        await runner.cleanup()


async def stored_call(database_url: str, call_id: str, *, until: str, timeout: float = 20.0,
                      require_end: bool = True) -> tuple[list[str], dict[str, object]]:
    """The call's event types from Postgres (once ``until`` is there) and its calls row."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        while True:
            cursor = await conn.execute(
                "SELECT type FROM events WHERE aggregate_id = %s ORDER BY position", (call_id,))
            types = [row[0] for row in await cursor.fetchall()]
            cursor = await conn.execute("SELECT * FROM calls WHERE call_id = %s", (call_id,))
            row = await cursor.fetchone()
            if until in types and (not require_end or (
                    row is not None and row[8] in ("ended", "failed"))):
                names = [d.name for d in cursor.description or []]
                return types, dict(zip(names, row or (), strict=False))
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"call {call_id} incomplete in Postgres: {types}")
            await asyncio.sleep(0.1)


def emulator_state(platform: Platform):  # noqa: ANN201 - the devkit's emulator state
    return platform.emulator[EMULATOR]
