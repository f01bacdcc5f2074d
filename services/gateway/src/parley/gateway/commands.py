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
=========  ===========================================  =====================================

The reply is ``{"ok": true}`` or ``{"ok": false, "error": "..."}``; a request for a call no
instance holds gets no reply (the requester's timeout / no-responders error says so).
"""

from __future__ import annotations

import logging
import re
from typing import Literal, Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from parley.common.bus import command_subject

log = logging.getLogger(__name__)

VERBS = ("clear", "mark", "hangup", "dtmf", "transfer")
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


async def serve_commands(nc: NATS, call_id: str, target: CommandTarget) -> Subscription:
    """Answer the call's commands until the subscription is dropped; never raises per message."""
    subject = command_subject(call_id, "clear").rsplit(".", 1)[0] + ".*"

    async def on_request(msg: Msg) -> None:
        verb = msg.subject.rsplit(".", 1)[1]
        try:
            await dispatch(target, verb, msg.data)
            reply = Reply(ok=True)
        except (CommandError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            reply = Reply(ok=False, error=str(exc))
        except Exception as exc:
            log.exception("command %s failed for call %s", verb, call_id)
            reply = Reply(ok=False, error=f"{type(exc).__name__}: {exc}")
        if msg.reply:
            await msg.respond(_encoder.encode(reply))

    return await nc.subscribe(subject, cb=on_request)


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
        case _:
            raise CommandError(f"unknown verb {verb!r}; expected one of {', '.join(VERBS)}")
