"""Commands to the instance holding a call's socket: ``parley.cmd.gateway.<call>.<verb>``.

Core NATS request/reply. The request body is a JSON object (empty for ``clear``):

=========  ===========================================  =====================================
verb       body                                         effect
=========  ===========================================  =====================================
clear      ``{}``                                       flush audio queued at the carrier
mark       ``{"name": "<turn_id>:<seq>"}``              place a mark after the queued audio
hangup     ``{"reason": "agent_hangup"}`` (optional)    end the call (call.ended, that reason)
dtmf       ``{"digits": "12#"}``                        play DTMF tones to the caller
transfer   ``{"to": "+15551234567", "mode": "cold"}``   hand the call to another number
ping       ``{}``                                       none: says an instance holds the call
=========  ===========================================  =====================================

The reply is ``{"ok": true}`` or ``{"ok": false, "error": "..."}``; a request for a call no
instance holds gets no reply (the requester's timeout / no-responders error says so). A
``clear`` or ``mark`` is ok only once written to the carrier's socket: one that finds the
socket closed (the call ending) fails, since no mark echo will come.

Order. A call's commands run in two lanes, each in the order its commands arrive. ``clear``
and ``mark`` only write to the carrier socket and are what a barge-in waits on; ``hangup``,
``dtmf`` and ``transfer`` may wait seconds on the carrier's REST API. So the socket lane never
waits behind the carrier lane: a caller who barges in while a transfer is being accepted stops
hearing the agent at once. Within the socket lane order matters (a mark asked after a clear must
mark the audio after it, not be flushed with what came before); within the carrier lane too
(two hang-ups, a transfer and a hang-up must not race at the carrier). Across the lanes nothing
needs it: a clear or mark beside a hang-up or redirect touches only audio the call may never
play, and a mark placed by an audio frame's header goes with that frame, not through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Literal, Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from parley.common.bus import command_subject

log = logging.getLogger(__name__)

VERBS = ("clear", "mark", "hangup", "dtmf", "transfer", "ping")
CARRIER_VERBS = frozenset({"hangup", "dtmf", "transfer"})  # the lane that may wait on REST
# call.ended's reason; "idle": the tools service's end_call for a caller silent too long
EndReason = Literal["agent_hangup", "completed", "max_duration", "machine", "error", "idle"]


class CommandError(Exception):
    """A command this call cannot carry out; the message goes back in the reply."""


class CommandBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Every field any verb takes; each verb reads its own."""

    name: str = ""
    reason: EndReason = "agent_hangup"
    digits: str = ""
    to: str = ""
    mode: Literal["cold", "warm"] = "cold"


class Reply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The answer to a command."""

    ok: bool
    error: str = ""


class CommandTarget(Protocol):
    """What a live call session must do for each verb."""

    async def clear(self) -> None:
        """Flush queued agent audio."""

    async def mark(self, name: str) -> None:
        """Place a mark after queued audio."""

    async def hangup(self, reason: EndReason) -> None:
        """End the call."""

    async def send_digits(self, digits: str) -> None:
        """Play DTMF to the caller."""

    async def transfer(self, to: str, mode: Literal["cold", "warm"]) -> None:
        """Hand the call to another number."""


_decoder = msgspec.json.Decoder(CommandBody)
_encoder = msgspec.json.Encoder()
_DIGITS = frozenset("0123456789*#wW")
# A transfer target: "+" and ASCII digits only (str.isdigit() takes other scripts' digits too).
E164_NUMBER = re.compile(r"\+[1-9][0-9]{6,14}")


class CommandServer:
    """Answers one call's commands in two lanes (see the module's docstring) until stopped."""

    def __init__(self, nc: NATS, call_id: str, target: CommandTarget) -> None:
        self.nc, self.call_id, self.target = nc, call_id, target
        self._subscription: Subscription | None = None
        self._carrier_commands: asyncio.Queue[Msg] = asyncio.Queue()
        self._carrier_lane: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe to the call's commands."""
        subject = command_subject(self.call_id, "clear").rsplit(".", 1)[0] + ".*"
        self._subscription = await self.nc.subscribe(subject, cb=self._on_request)
        self._carrier_lane = asyncio.create_task(self._serve_carrier_lane(),
                                                 name=f"commands:{self.call_id}")

    async def drain(self) -> None:
        """Take no more commands and finish those received (the caller bounds the wait)."""
        if self._subscription is not None:
            await self._subscription.drain()
        await self._carrier_commands.join()
        await self.stop()

    async def stop(self) -> None:
        """Take no more commands; cancel any still running."""
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        if self._carrier_lane is not None:
            self._carrier_lane.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._carrier_lane

    async def _on_request(self, msg: Msg) -> None:
        # The subscription's callback runs one message at a time: it is the socket lane.
        if msg.subject.rsplit(".", 1)[1] in CARRIER_VERBS:
            self._carrier_commands.put_nowait(msg)
        else:
            await self._answer(msg)

    async def _serve_carrier_lane(self) -> None:
        while True:
            msg = await self._carrier_commands.get()
            try:
                await self._answer(msg)
            except Exception:
                log.exception("call %s: could not reply to %s", self.call_id, msg.subject)
            finally:
                self._carrier_commands.task_done()

    async def _answer(self, msg: Msg) -> None:
        verb = msg.subject.rsplit(".", 1)[1]
        try:
            await dispatch(self.target, verb, msg.data)
            reply = Reply(ok=True)
        except (CommandError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            reply = Reply(ok=False, error=str(exc))
        except Exception as exc:
            log.exception("command %s failed for call %s", verb, self.call_id)
            reply = Reply(ok=False, error=f"{type(exc).__name__}: {exc}")
        if msg.reply:
            await msg.respond(_encoder.encode(reply))


async def serve_commands(nc: NATS, call_id: str, target: CommandTarget) -> CommandServer:
    """Answer the call's commands until the server is drained or stopped."""
    server = CommandServer(nc, call_id, target)
    await server.start()
    return server


async def dispatch(target: CommandTarget, verb: str, data: bytes) -> None:
    """Validate one command and carry it out."""
    body = _decoder.decode(data) if data.strip() else CommandBody()
    match verb:
        case "clear":
            await target.clear()
        case "mark":
            if not body.name:
                raise CommandError("mark needs a name")
            await target.mark(body.name)
        case "hangup":
            await target.hangup(body.reason)
        case "dtmf":
            if not body.digits or not set(body.digits) <= _DIGITS:
                raise CommandError(f"dtmf digits must be 0-9 * # w, not {body.digits!r}")
            await target.send_digits(body.digits)
        case "transfer":
            if not E164_NUMBER.fullmatch(body.to):
                raise CommandError(f"transfer needs an E.164 number, not {body.to!r}")
            if body.mode != "cold":  # (the event and the command keep the field for it)
                raise CommandError("warm transfer is not supported; transfer cold")
            await target.transfer(body.to, body.mode)
        case "ping":
            pass
        case _:
            raise CommandError(f"unknown verb {verb!r}; expected one of {', '.join(VERBS)}")
