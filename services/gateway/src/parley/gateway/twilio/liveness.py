"""Noticing a carrier socket that died without closing.

A partition, a NAT timeout or a crashed proxy can leave a carrier's WebSocket open on our side
with nothing ever arriving and no close: the call stays "live" (and billed) until its
max_duration_s, and media's idle handling, which runs on the audio clock, never fires.

Two checks, per socket:

- **Ping/pong** (every protocol). Once nothing at all has been heard for ``ping_s`` we send a
  WebSocket ping; RFC 6455 §5.5.2 obliges the peer to answer with a pong, and anything heard
  within ``ping_s / 2`` proves it alive. Evidence the carriers answer: Twilio's own Media Streams
  sample (twilio-samples/speech-assistant-openai-realtime-api-python) runs under uvicorn's
  defaults, which ping every 20 s and drop a socket without a pong within 20 s, and its calls
  last minutes; ConversationRelay samples run the same way, and that socket is quiet for the
  whole of every utterance. No vendor documents it for Plivo, which is why this is the check a
  quiet socket gets (a pong costs it nothing) while the one below needs the protocol's promise.
- **Silence** (media streams only). Plivo documents that it "sends media messages continuously
  throughout the call"; Twilio Media Streams carry a 20 ms ``media`` message on PSTN calls
  all along, though its docs do not promise it and one integrator reports calls without
  silent chunks (Phonic-Co/phonic-node#32) — hence a limit (30 s by default) well past the
  ping check's 15 s, for a peer that still answers pings but no longer streams. ConversationRelay
  sends nothing between utterances, so it never gets this check.

The gateway's pings are sent by this watchdog, not aiohttp's ``heartbeat=``: that one re-arms a
timer on every frame received (50 a second per media socket), this one stores a timestamp.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..close_codes import CloseCode


class Liveness:
    """When a carrier was last heard from, and a watchdog that says when it is gone."""

    def __init__(self, ws: web.WebSocketResponse, *, ping_s: float, silence_s: float) -> None:
        self._ws = ws
        self.ping_s, self.silence_s = ping_s, silence_s
        self._time = asyncio.get_running_loop().time
        self.heard_at = self.said_at = self._time()  # any frame / a protocol message
        # Frames heard, counted: what proves a pong came. Not heard_at: uvloop's clock counts
        # milliseconds and stands still within a loop iteration, so a pong from a nearby peer
        # is stamped with its ping's very time.
        self.frames = 0

    @property
    def enabled(self) -> bool:
        """Whether either check is on."""
        return bool(self.ping_s or self.silence_s)

    def heard(self, *, said: bool) -> None:
        """A frame arrived (``said``: a protocol message, not a ping or pong)."""
        now = self._time()
        self.frames += 1
        self.heard_at = now
        if said:
            self.said_at = now

    async def watch(self) -> tuple[CloseCode, str] | None:
        """Return (close code, reason) once the carrier is taken for dead.

        None if the socket closed under us (a ping could not be sent): nothing to do then.
        """
        while True:
            now = self._time()
            if self.silence_s and now - self.said_at >= self.silence_s:
                return CloseCode.CARRIER_SILENT, (f"carrier socket silent for "
                                                  f"{round(now - self.said_at, 1):g} s")
            if self.ping_s and now - self.heard_at >= self.ping_s:
                frames = self.frames
                try:
                    await self._ws.ping()
                except (ConnectionError, RuntimeError):
                    return None
                await asyncio.sleep(self.ping_s / 2)
                if self.frames == frames:
                    silent = self._time() - self.heard_at
                    return CloseCode.NO_PONG, (f"no pong within {self.ping_s / 2:g} s; carrier "
                                               f"socket silent for {round(silent, 1):g} s")
                continue
            due = [deadline for deadline, on in ((self.said_at + self.silence_s, self.silence_s),
                                                 (self.heard_at + self.ping_s, self.ping_s)) if on]
            if not due:
                return None
            await asyncio.sleep(max(0.0, min(due) - now))
