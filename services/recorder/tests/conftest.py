import asyncio
import contextlib
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


class TcpProxy:
    """A TCP proxy to a local port, for faults a real server cannot be made to show on cue.

    Every chunk either side sends is passed on if :meth:`keep` says so (all, here); a side
    that closes closes the other.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._writers: list[asyncio.StreamWriter] = []

    def keep(self, data: bytes, *, to_client: bool) -> bool:
        """Whether to pass ``data`` on (``to_client``: it comes from the server)."""
        return True

    async def start(self) -> int:
        """Listen; returns the port to connect to."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1",
                                                                     self.target_port)
        self._writers += [client_writer, server_writer]

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       to_client: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    if self.keep(data, to_client=to_client):
                        writer.write(data)
                        await writer.drain()
            writer.close()

        await asyncio.gather(pipe(client_reader, server_writer, False),
                             pipe(server_reader, client_writer, True))
