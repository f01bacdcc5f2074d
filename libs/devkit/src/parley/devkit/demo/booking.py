"""The demo clinic's booking endpoint: what the ``book_appointment`` tool calls.

A tiny aiohttp app served inside ``parley demo`` on a free loopback port. It books whatever it
is asked for and answers with a confirmation the agent reads back (the local responder speaks a
result's ``message``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BOOKINGS_PATH = "/appointments"


@dataclass
class Bookings:
    """The appointments booked while the endpoint ran."""

    made: list[dict[str, Any]] = field(default_factory=list)


BOOKINGS = web.AppKey("bookings", Bookings)


def create_booking_app() -> web.Application:
    """The app: ``POST /appointments`` with ``{"day", "time"?, "name"?}``."""
    app = web.Application()
    app[BOOKINGS] = Bookings()
    app.router.add_post(BOOKINGS_PATH, _book)
    return app


async def _book(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"ok": False, "error": "expected a JSON object"}, status=400)
    if not isinstance(body, dict) or not str(body.get("day", "")).strip():
        return web.json_response({"ok": False, "error": "day is required"}, status=422)
    day = str(body["day"]).strip()
    time = str(body.get("time", "")).strip()
    request.app[BOOKINGS].made.append(body)
    when = (f"{day} at {time}" if time else day).rstrip(".")
    return web.json_response({"ok": True, "day": day, "time": time,
                              "message": f"You're booked for {when}. See you then!"})


class BookingEndpoint:
    """The booking app served on ``127.0.0.1:<port>`` until :meth:`stop`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.app = create_booking_app()
        self._runner = web.AppRunner(self.app, access_log=None)

    @property
    def url(self) -> str:
        """Where the tool posts."""
        return f"http://127.0.0.1:{self.port}{BOOKINGS_PATH}"

    @property
    def bookings(self) -> list[dict[str, Any]]:
        """What was booked so far."""
        return self.app[BOOKINGS].made

    async def start(self) -> None:
        """Listen."""
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Stop listening and free the app."""
        await self._runner.cleanup()
