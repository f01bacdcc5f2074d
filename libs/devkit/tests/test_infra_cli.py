"""`parley infra up|down|status`, run as the real command against the real servers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import nats
import psycopg
import pytest

from parley.devkit.infra import free_port, pid_alive, port_open
from parley.devkit.local_infra import DATABASE_URL_VAR, NATS_URL_VAR, read_env_file

COMMAND_TIMEOUT = 90


def parley(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `parley` CLI in a fresh interpreter, as a user would."""
    base_env = {k: v for k, v in os.environ.items() if k not in (NATS_URL_VAR, DATABASE_URL_VAR)}
    return subprocess.run([sys.executable, "-m", "parley.devkit.cli", *args],
                          env={**base_env, **(env or {})}, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Outside pytest's private temp tree: another pytest session re-tightens that tree to 0700,
    # which would lock the unprivileged postgres user out of its data directory mid-test.
    base = Path(tempfile.mkdtemp(prefix="parley-infra-test-"))
    root = base / ".parley"
    yield root
    if (root / "infra.json").exists():
        parley("infra", "down", "--dir", str(root))
    shutil.rmtree(base, ignore_errors=True)


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


async def nats_round_trip(url: str) -> bytes:
    client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        subscription = await client.subscribe("parley.test.ping")
        await client.publish("parley.test.ping", b"pong")
        message = await subscription.next_msg(timeout=5)
        return message.data
    finally:
        await client.close()


def test_up_status_down_lifecycle(state_dir: Path) -> None:
    up = parley("infra", "up", "--dir", str(state_dir))
    assert up.returncode == 0, up.stderr
    urls = read_env_file(state_dir)
    assert set(urls) == {NATS_URL_VAR, DATABASE_URL_VAR}
    assert up.stdout == f"{NATS_URL_VAR}={urls[NATS_URL_VAR]}\n" \
                        f"{DATABASE_URL_VAR}={urls[DATABASE_URL_VAR]}\n"

    # The CLI has exited; the servers it left behind answer real clients.
    assert asyncio.run(nats_round_trip(urls[NATS_URL_VAR])) == b"pong"
    with psycopg.connect(urls[DATABASE_URL_VAR], connect_timeout=5) as connection:
        assert connection.execute("SELECT current_database()").fetchone() == ("parley",)

    status = parley("infra", "status", "--dir", str(state_dir))
    assert status.returncode == 0, status.stdout + status.stderr
    assert urls[NATS_URL_VAR] in status.stdout and urls[DATABASE_URL_VAR] in status.stdout

    # Idempotent, even when the URLs come from a sourced .parley/env.
    pids = {name: record["pid"] for name, record in
            json.loads((state_dir / "infra.json").read_text()).items()}
    again = parley("infra", "up", "--dir", str(state_dir), env=urls)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already running") == 2
    assert read_env_file(state_dir) == urls

    down = parley("infra", "down", "--dir", str(state_dir))
    assert down.returncode == 0, down.stderr
    assert not any(pid_alive(pid) for pid in pids.values())
    assert not port_open(port_of(urls[NATS_URL_VAR]))
    assert not port_open(port_of(urls[DATABASE_URL_VAR]))
    after_down = parley("infra", "status", "--dir", str(state_dir))
    assert after_down.returncode == 1
    assert after_down.stdout.count(" down ") == 2

    # Restarted on the ports it used before, so the URLs stay the same.
    restarted = parley("infra", "up", "--dir", str(state_dir))
    assert restarted.returncode == 0, restarted.stderr
    assert read_env_file(state_dir) == urls


def test_external_servers_are_used_not_started(state_dir: Path) -> None:
    external = {NATS_URL_VAR: f"nats://127.0.0.1:{free_port()}",
                DATABASE_URL_VAR: f"postgresql://postgres@127.0.0.1:{free_port()}/parley"}
    up = parley("infra", "up", "--dir", str(state_dir), env=external)
    assert up.returncode == 0, up.stderr
    assert up.stderr.count("not started, using") == 2
    assert read_env_file(state_dir) == external
    assert not (state_dir / "nats").exists() and not (state_dir / "postgres").exists()

    # Nothing listens on those ports, and status says so.
    status = parley("infra", "status", "--dir", str(state_dir), env=external)
    assert status.returncode == 1
    assert status.stdout.count("(external)") == 2


def test_requested_port_in_use_is_refused(state_dir: Path) -> None:
    taken = subprocess.Popen([sys.executable, "-c", "import socket, time; s = socket.socket();"
                              " s.bind(('127.0.0.1', 0)); s.listen(); print(s.getsockname()[1],"
                              " flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert taken.stdout is not None
        port = taken.stdout.readline().strip()
        up = parley("infra", "up", "--dir", str(state_dir), "--nats-port", port)
        assert up.returncode == 1
        assert f"port {port} is already in use" in up.stderr
    finally:
        taken.kill()
        taken.wait()
        if taken.stdout is not None:
            taken.stdout.close()
