"""Servers that speak vendors' real wire protocols, so tests and load runs use the real SDKs.

- :mod:`.deepgram`: Deepgram live transcription (``/v1/listen``) with scripted transcripts.
- :mod:`.cartesia`: Cartesia TTS WebSocket (``/tts/websocket``) with deterministic tone audio.

Each emulator is a class with ``async start() -> base_url`` / ``async stop()`` bound to
127.0.0.1 on an ephemeral port, fault switches for tests, and a command line
(``python -m parley.devkit.emulators.deepgram --port 0``) that prints its URL and serves until
interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Callable, Sequence

from aiohttp import WSCloseCode, web

from parley.common import runtime
from parley.common.service import settle


class EmulatorServer:
    """Start/stop plumbing shared by the emulators: one aiohttp app on 127.0.0.1.

    Subclasses build their routes in :meth:`create_app` and register every open WebSocket in
    :attr:`sockets` so that :meth:`stop` can close them with GOING_AWAY.
    """

    def __init__(self) -> None:
        self.base_url = ""
        self.sockets: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None

    def create_app(self) -> web.Application:
        """The emulator's aiohttp application."""
        raise NotImplementedError

    async def start(self, *, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: any free port); return the base URL (``http://…``)."""
        app = self.create_app()
        app.on_shutdown.append(self._close_sockets)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.base_url = f"http://{host}:{bound}"
        return self.base_url

    async def stop(self) -> None:
        """Close every socket (GOING_AWAY) and stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _close_sockets(self, _app: web.Application) -> None:
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"shutdown")
                               for ws in list(self.sockets)), return_exceptions=True)


async def serve_until_stopped(emulator: EmulatorServer, *, port: int) -> None:
    """Run ``emulator`` on ``port``, print its URL, and serve until SIGINT/SIGTERM."""
    url = await emulator.start(port=port)
    settle()  # as the services do: start-up's objects are out of every full collection's walk
    print(url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await emulator.stop()


def run_cli(factory: Callable[[argparse.Namespace], EmulatorServer], description: str,
            argv: Sequence[str] | None = None,
            add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Command-line entry point: ``--port`` (0 = any free port) plus emulator options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    runtime.run(serve_until_stopped(factory(args), port=args.port))
