import asyncio
import os
import subprocess
import sys

import pytest


async def wait_for(predicate, timeout=15.0, interval=0.02):
    """Poll an (async or sync) predicate until it is truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


@pytest.fixture
def recorder_process(nats_url, database_url, tmp_path):
    """Start ``python -m parley.recorder`` as a real process; stopped at teardown."""
    started = []

    def start(**env_overrides: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PARLEY_NATS_URL=nats_url, PARLEY_DATABASE_URL=database_url,
                   PARLEY_LOG_LEVEL="INFO", **env_overrides)
        log = open(tmp_path / f"recorder-{len(started)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "parley.recorder"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        started.append((proc, log))
        return proc

    yield start
    for proc, log in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
