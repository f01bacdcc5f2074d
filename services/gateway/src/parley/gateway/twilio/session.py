"""What every Twilio call socket shares (Media Streams and ConversationRelay alike).

A session is one WebSocket, run inside its own request task: it reads messages until the
socket closes, turning protocol violations into a precise close code and any bug into 1011 —
never affecting another call. Once the carrier says which call it is, the session checks it
against ``carrier_calls``, takes ownership of the call on this instance, answers the call's
commands, enforces the agent's maximum duration and emits call.stream_started.

A socket that dies without closing (:mod:`.liveness`) is closed as if the carrier had dropped
it, so the carrier's reconnect URL can bring the call back to a new one; since a dead path may
mean the carrier never learns of it, the call is hung up if it has not come back in
``gateway_carrier_reconnect_wait_s`` (at once if the gateway stops first: then nothing would).
A socket stopped for a redirect that brings the call back to a new stream (DTMF) waits for
that stream in the same way (:mod:`.next_stream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any, ClassVar, Literal

from aiohttp import WSMsgType, web
from nats.aio.subscription import Subscription

from parley.common.bus import Outbox
from parley.common.configuration import Agent, get_agent
from parley.common.events import CallEnded, CallStreamStarted, CallTransferred, Event, is_token
from parley.common.logging import log_context

from ..calls import (
    CarrierCall,
    claim_milestone,
    count_milestones,
    find_by_call_id,
    publish_end,
    seconds_since,
)
from ..carrier_messages import UnknownMessage, event_label
from ..close_codes import CloseCode, ProtocolViolation, close_reason
from ..commands import CommandError, CommandServer, EndReason, serve_commands
from ..config import GatewayConfig
from ..keys import BUS, CALL_OUTBOXES, CALLS, CLOCK, CONFIG, METRICS, POOL, TWILIO_REST
from ..replays import STREAM_TOKEN, count_refusal, use_stream_token
from . import twiml
from .liveness import Liveness
from .next_stream import end_unless_next_stream

log = logging.getLogger(__name__)
TEXT = WSMsgType.TEXT

# A command still running when the socket ends gets this long to finish (the REST clients time
# out after 10 s): a transfer whose redirect stopped this very stream publishes its end after.
COMMAND_GRACE_S = 15.0


def carrier_socket(config: GatewayConfig) -> web.WebSocketResponse:
    """The WebSocketResponse for a carrier socket; pings and pongs are the session's to handle."""
    return web.WebSocketResponse(max_msg_size=config.max_frame_bytes, autoping=False)


class TwilioSession:
    """One Twilio WebSocket; subclasses speak the protocol (``on_text``, ``end_locally``)."""

    protocol: ClassVar[str] = "twilio"
    route: ClassVar[str] = ""  # the socket's path (a metric label)
    # A start must carry the one-time token of the call's <Connect> (replays.py): Twilio signs
    # the upgrade over a URL that is the same for every call. (Plivo signs each upgrade with a
    # nonce of its own, over a URL naming the call.)
    needs_stream_token: ClassVar[bool] = True
    pipeline: ClassVar[Literal["cascading", "managed"]] = "cascading"
    # The carrier streams audio all call long: a socket silent for gateway_carrier_silence_s
    # is dead even if it answers pings (liveness.py says why ConversationRelay is not).
    streams_audio: ClassVar[bool] = False

    def __init__(self, app: web.Application, ws: web.WebSocketResponse) -> None:
        self.app, self.ws = app, ws
        self.config, self.bus, self.pool = app[CONFIG], app[BUS], app[POOL]
        self.metrics, self.clock, self.rest = app[METRICS], app[CLOCK], app[TWILIO_REST]
        self.call_id = ""
        self.stream_id = ""  # the carrier's id of this socket's stream, once attached
        self.call: CarrierCall | None = None
        self.agent: Agent | None = None
        self.finished = False  # the call is over for this socket; stop reading
        self.redirecting = False  # we are replacing the TwiML: the stream's stop is not a hang-up
        # Twilio took TwiML that plays this long, then connects the call to a new stream (DTMF):
        # this socket's end waits for that stream (next_stream.py)
        self.next_stream_after_s: float | None = None
        self.dead = ""  # why the socket was taken for dead (liveness.py), if it was
        self.liveness = Liveness(ws, ping_s=self.config.gateway_carrier_ping_s,
                                 silence_s=self.config.gateway_carrier_silence_s
                                 if self.streams_audio else 0.0)
        self._reconnects = 0  # the call's reconnects when this socket attached
        self._closer: asyncio.Task[Any] | None = None  # the watchdog closing a dead socket
        self._subscriptions: list[Subscription] = []
        self._commands: CommandServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closes = self.metrics.counter(
            "gateway_socket_closes", "Carrier sockets closed by the gateway, by code",
            ["protocol", "code"])
        self._frames_dropped = self.metrics.counter(
            "gateway_frames_dropped", "Caller audio frames NATS could not take (an outage)",
            ["protocol"])
        self._dropped_audio = False  # said once per socket
        self._unknown_messages = self.metrics.counter(
            "gateway_unknown_messages", "Carrier socket messages of an event we do not know, "
            "ignored (a label past the first 16 event names is \"other\")",
            ["protocol", "event"])
        self._unknown_said = False  # logged once per socket

    @property
    def outbox(self) -> Outbox:
        """The call's outbox, which what the socket reports goes out through.

        The read loop waits on no ack, and an event unacknowledged (a NATS outage) is
        published again under its id: awaited, an 8 s outage timed a mark echo's publish out
        and failed the socket, and the call never ended in the store. The call's end goes out
        after it all (call_outboxes.py).
        """
        return self.app[CALL_OUTBOXES].of(self.call_id)

    @property
    def started(self) -> bool:
        """True once the call is attached (start / setup accepted)."""
        return self.call is not None

    # -- the socket -------------------------------------------------------------------------

    async def run(self) -> None:
        """Read until the socket closes; contain every error to this socket."""
        registry = self.app[CALLS]
        registry.sockets.add(self.ws)
        live = self.metrics.gauge("gateway_live_sockets", "Open carrier sockets", ["protocol"])
        live.labels(self.protocol).inc()
        loop = asyncio.get_running_loop()
        start_deadline = loop.time() + self.config.stream_start_timeout_s
        # Looked up once: a media socket's loop turns 50 times a second
        receive, heard, on_text, text = self.ws.receive, self.liveness.heard, self.on_text, TEXT
        try:
            while not self.finished:
                timeout = None if self.started else max(0.0, start_deadline - loop.time())
                try:
                    msg = await receive(timeout=timeout)
                except TimeoutError:
                    raise ProtocolViolation(CloseCode.START_TIMEOUT, "no start within "
                                            f"{self.config.stream_start_timeout_s:g}s") from None
                said = msg.type is text
                heard(said=said)
                if said:
                    await on_text(msg.data)
                elif msg.type is WSMsgType.PING:
                    with contextlib.suppress(ConnectionError):
                        await self.ws.pong(msg.data)
                elif msg.type is WSMsgType.PONG:
                    pass  # heard: that is all a pong is for
                elif msg.type is WSMsgType.BINARY:
                    raise ProtocolViolation(CloseCode.UNSUPPORTED_DATA,
                                            "binary frames are not part of the protocol")
                else:  # CLOSE/CLOSING/CLOSED, or ERROR (aiohttp already closed, e.g. 1009)
                    if msg.type is WSMsgType.ERROR:
                        self._count_close(getattr(msg.data, "code", CloseCode.INTERNAL_ERROR))
                    break
        except ProtocolViolation as exc:
            log.warning("%s socket (call %s): closing %d %s", self.protocol,
                        self.call_id or "-", exc.code, exc.reason)
            await self.close(exc.code, exc.reason)
        except Exception:
            log.exception("%s socket (call %s) failed", self.protocol, self.call_id or "-")
            await self.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            await self._teardown()
            registry.sockets.discard(self.ws)
            live.labels(self.protocol).dec()
        # A task of the app's, not of this handler: the server cancels or forgets handlers at
        # shutdown, and the call must still be decided (the shutdown awaits it).
        if self.next_stream_after_s is not None:
            await asyncio.shield(self.app[CALLS].settle(
                end_unless_next_stream(self, self.next_stream_after_s),
                f"{self.protocol}:next-stream-wait"))
        elif self.dead:
            await asyncio.shield(self.app[CALLS].settle(
                self._end_unless_carrier_returns(), f"{self.protocol}:reconnect-wait"))

    async def on_text(self, data: str) -> None:
        """Handle one text message (the protocol)."""
        raise NotImplementedError

    async def clear(self) -> None:
        """Flush agent audio queued at the carrier (command ``clear``)."""
        raise NotImplementedError

    async def mark(self, name: str) -> None:
        """Place a mark after queued audio (command ``mark``)."""
        raise NotImplementedError

    async def send_digits(self, digits: str) -> None:
        """Play DTMF to the caller (command ``dtmf``)."""
        raise NotImplementedError

    async def close(self, code: int, reason: str, *, drain: bool = True) -> None:
        """Close the socket with a code and reason (counted once per socket).

        ``drain=False`` for a dead peer, whose full send buffer would never drain.
        """
        if self.ws.closed:
            return
        self._count_close(code)
        self.finished = True
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, message=close_reason(reason), drain=drain)

    def _count_close(self, code: int) -> None:
        self._closes.labels(self.protocol, str(int(code))).inc()

    async def send(self, data: bytes) -> bool:
        """Send a JSON text message; False if the socket is already gone."""
        if self.ws.closed:
            return False
        try:  # send_str(data.decode()) but for the round trip: the same frame
            await self.ws.send_frame(data, TEXT)
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def send_or_refuse(self, verb: str, data: bytes) -> None:
        """Send a command's message to the carrier; CommandError if it could not be sent.

        A ``clear`` or ``mark`` answered ok though nothing was sent left media waiting for a
        mark echo that never comes.
        """
        if not await self.send(data):
            raise CommandError(f"{verb} not sent: the call's socket is closed")

    # -- attaching the call -----------------------------------------------------------------

    async def attach(self, call_sid: str, params: dict[str, str], stream_id: str) -> None:
        """Check the carrier's ids against ``carrier_calls``; own the call; announce it."""
        call_id = params.get("call_id", "")
        if not is_token(call_id):
            raise ProtocolViolation(CloseCode.POLICY_VIOLATION, "missing or invalid call_id")
        async with self.pool.connection() as conn:
            call = await find_by_call_id(conn, call_id)
            agent = None if call is None else await get_agent(conn, call.agent_id,
                                                              org_id=call.org_id)
            self._reconnects = await count_milestones(conn, call_id, "reconnect:")
        if (call is None or call.carrier_call_id != call_sid
                or params.get("org_id", call.org_id) != call.org_id
                or params.get("agent_id", call.agent_id) != call.agent_id):
            raise ProtocolViolation(CloseCode.POLICY_VIOLATION, "unknown call")
        if call.ended:
            raise ProtocolViolation(CloseCode.POLICY_VIOLATION, "call already ended")
        if agent is None:
            raise ProtocolViolation(CloseCode.POLICY_VIOLATION, "agent no longer exists")
        # The upgrade's signature is the same for every socket (Twilio signs the URL alone):
        # the one-time token of the call's <Connect> says this is the stream Twilio was told
        # to open, not a captured upgrade replayed; using it up is one UPDATE, across instances
        refused = ""
        if self.needs_stream_token:
            async with self.pool.connection() as conn:
                refused = await use_stream_token(conn, self.app, call.call_id,
                                                 params.get(STREAM_TOKEN, ""), stream_id)
        if refused:
            count_refusal(self.app, "twilio", self.route, "stream_token")
            log.warning("%s socket for call %s (stream %s) refused: %s", self.protocol,
                        call.call_id, stream_id[:40], refused)
            raise ProtocolViolation(CloseCode.STREAM_TOKEN_REFUSED, refused)
        self.call_id, self.call, self.agent = call.call_id, call, agent
        self.stream_id = stream_id
        async with self.pool.connection() as conn:  # the orphan check's sign of a new stream
            await claim_milestone(conn, call.call_id, f"stream:{stream_id}")
        previous = self.app[CALLS].claim(self)
        if previous is not None:
            await previous.replace()
        self._commands = await serve_commands(self.bus.nc, call.call_id, self)
        await self.subscribe()
        self._spawn(self._expire(), "max-duration")
        if self.liveness.enabled:
            self._spawn(self._watch_liveness(), "liveness")
        if self.rest is not None and agent.settings.record and call.direction == "inbound":
            self._spawn(self._record(), "record")
        await self.publish(CallStreamStarted(
            org_id=call.org_id, call_id=call.call_id, stream_id=stream_id,
            gateway_instance=self.config.gateway_instance, pipeline=self.pipeline,
            agent_id=call.agent_id))
        log.info("%s socket attached to call %s (stream %s)", self.protocol, call.call_id,
                 stream_id)

    async def subscribe(self) -> None:
        """Subscribe to what the socket relays outwards (audio or agent text)."""

    def audio_refused(self) -> None:
        """A caller frame the NATS client refused: cut off from the server too long; dropped.

        Cut off, the client buffers what is published (2 MiB: about 200 call-seconds of audio,
        8 s with 25 calls), then refuses it: the refused frame failed the socket, and so every
        call on the gateway. What the caller says meanwhile is lost, as it would be to media.
        """
        self._frames_dropped.labels(self.protocol).inc()
        if not self._dropped_audio:
            self._dropped_audio = True
            log.warning("call %s: NATS unreachable; caller audio dropped until it is back",
                        self.call_id)

    def ignore(self, message: UnknownMessage) -> None:
        """A message of an event the protocol does not define (yet): counted, not acted on.

        The carrier sent it (the socket's upgrade was signed), most likely an event it added
        since we wrote the protocol; closing the socket on it would drop the call.
        """
        self._unknown_messages.labels(self.protocol, event_label(self.metrics,
                                                                 message.event)).inc()
        if not self._unknown_said:
            self._unknown_said = True
            log.warning("%s socket (call %s): ignoring a message of unknown event %r (later "
                        "ones on this socket are only counted)", self.protocol,
                        self.call_id or "-", message.event[:40])

    def add_subscription(self, subscription: Subscription) -> None:
        """Track a subscription so teardown drops it."""
        self._subscriptions.append(subscription)

    async def publish(self, event: Event) -> None:
        """Publish one of this call's events (through the outbox), in the call's log context."""
        with log_context(call_id=self.call_id):
            await self.outbox.put(event)

    async def replace(self) -> None:
        """A newer socket took this call over on this instance."""
        await self.close(CloseCode.POLICY_VIOLATION, "replaced by a newer stream")

    # -- ending the call --------------------------------------------------------------------

    async def end_call(self, reason: str, *extra: Event, duration_s: float | None = None) -> bool:
        """Emit call.ended once (with ``extra`` events first); True if this session ended it.

        ``duration_s``: the carrier's figure, when it has one; else counted up to now.
        """
        call = self.call
        if call is None:
            return False
        if duration_s is None:
            duration_s = seconds_since(call.answered_at or call.created_at, self.clock())
        return await publish_end(self.pool, self.app[CALL_OUTBOXES], CallEnded(
            org_id=call.org_id, call_id=call.call_id, reason=reason,  # type: ignore[arg-type]
            duration_s=duration_s), *extra)

    async def hangup(self, reason: EndReason) -> None:
        """End the call: call.ended, then at the carrier.

        The carrier hang-up comes even if call.ended could not be claimed (Postgres away; the
        error still propagates; with NATS away it is claimed and published when NATS takes
        it): a call left up is billed and its caller hears nothing, while its end is still
        reported by the stream's stop or the status callback that follows.
        """
        if self.call is None:
            raise CommandError("no call attached yet")
        try:
            await self.end_call(reason)
        finally:
            await self.hang_up_at_carrier(reason)

    async def hang_up_at_carrier(self, reason: str) -> None:
        """Twilio's REST API hangs the call up; without it (or if it fails), this socket."""
        call = self.call
        assert call is not None
        if self.rest is not None:
            try:
                await self.rest.hangup(call.carrier_call_id)
                return
            except Exception:
                log.exception("call %s: REST hang-up failed; closing the socket", self.call_id)
        await self.end_locally(reason)

    async def end_locally(self, reason: str) -> None:
        """End the call without the REST API (Twilio then asks the action URL, which hangs up)."""
        await self.close(CloseCode.NORMAL, reason)

    async def transfer(self, to: str, mode: Literal["cold", "warm"]) -> None:
        """Cold transfer: redirect the call to ``<Dial>`` through the REST API.

        call.transferred and call.ended (reason ``transferred``) are published once Twilio
        has accepted the redirect, never before.
        """
        call = self.call
        if call is None:
            raise CommandError("no call attached yet")
        if self.rest is None:
            raise CommandError("transfer needs the Twilio REST client (no account configured)")
        await self.refuse_if_ended()
        await self.redirect(twiml.dial_twiml(to))
        # Only now is the caller on their way to the new number: a failed redirect leaves the
        # call live with the agent (and the command's error says why), so nothing is published.
        await self.end_transferred(to, mode)

    async def end_transferred(self, to: str, mode: Literal["cold", "warm"]) -> None:
        """The carrier took the transfer: call.transferred, then call.ended (``transferred``).

        A ``transferred:<to>`` milestone first: if the end is never published (NATS away for
        longer than the outbox tries; its claim is then given back), the orphan check, finding
        the call held by no instance, ends it as transferred instead of hanging up a caller now
        talking to the person they were transferred to.
        """
        call = self.call
        assert call is not None
        async with self.pool.connection() as conn:
            await claim_milestone(conn, call.call_id, f"transferred:{to}")
        transferred = CallTransferred(org_id=call.org_id, call_id=call.call_id, to_number=to,
                                      mode=mode)
        if not await self.end_call("transferred", transferred):
            raise CommandError("call already ended")

    async def refuse_if_ended(self) -> None:
        """Raise CommandError if the call has already ended (e.g. transferred before)."""
        async with self.pool.connection() as conn:
            call = await find_by_call_id(conn, self.call_id)
        if call is None or call.ended:
            raise CommandError("call already ended")

    async def redirect(self, new_twiml: str) -> None:
        """Replace the TwiML the call executes; the stream's ``stop`` then ends nothing.

        If Twilio refuses or times out, the call is still ours: the flag is reset so that the
        caller's later hang-up ends the call, and the error propagates to the command.
        """
        call = self.call
        if call is None or self.rest is None:
            raise CommandError("redirecting needs an attached call and the Twilio REST client")
        self.redirecting = True
        try:
            await self.rest.redirect(call.carrier_call_id, new_twiml)
        except BaseException:
            self.redirecting = False
            raise

    async def _record(self) -> None:
        """Start recording an inbound call once (outbound calls are recorded from creation)."""
        call = self.call
        assert call is not None and self.rest is not None
        try:
            async with self.pool.connection() as conn:
                if not await claim_milestone(conn, call.call_id, "recording_started"):
                    return
            urls = twiml.outbound_callback_urls(self.config, call_id=call.call_id,
                                                org_id=call.org_id, agent_id=call.agent_id)
            await self.rest.start_recording(call.carrier_call_id,
                                            urls["recording_status_callback"])
        except Exception:
            log.exception("call %s: could not start the recording", call.call_id)

    async def _expire(self) -> None:
        call, agent = self.call, self.agent
        assert call is not None and agent is not None
        started = call.answered_at or call.created_at or self.clock()
        deadline = started + timedelta(seconds=agent.settings.max_duration_s)
        await asyncio.sleep(max(0.0, (deadline - self.clock()).total_seconds()))
        log.info("call %s reached its maximum duration (%ds)", call.call_id,
                 agent.settings.max_duration_s)
        try:
            await self.hangup("max_duration")
        except Exception:
            log.exception("call %s: max-duration hang-up failed", call.call_id)

    # -- a socket that died without closing -------------------------------------------------

    async def _watch_liveness(self) -> None:
        verdict = await self.liveness.watch()
        if verdict is None or self.finished:
            return
        code, self.dead = verdict
        # Not cancelled by the teardown its own close sets off: a close cut short leaves the
        # socket's transport open and the session's teardown waiting on it.
        self._tasks.discard(closer := asyncio.current_task())
        self._closer = closer
        log.warning("%s socket (call %s) taken for dead: %s; closing it", self.protocol,
                    self.call_id, self.dead)
        await self.close(code, self.dead, drain=False)

    async def _end_unless_carrier_returns(self) -> None:
        """After a dead socket: the call goes on if the carrier reconnected it, else hang up.

        A carrier whose own end is still open (a stuck proxy between us) never asks the
        reconnect URL, and the caller would hear nothing until max_duration_s; this socket's
        max-duration timer went with it. A gateway that stops waits no longer: once it is
        gone, nothing would hang the call up.
        """
        call = self.call
        if call is None or self.redirecting:
            return
        wait = self.config.gateway_carrier_reconnect_wait_s
        stopping = self.app[CALLS].stopping
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), wait)
        async with self.pool.connection() as conn:
            now = await find_by_call_id(conn, call.call_id)
            reconnects = await count_milestones(conn, call.call_id, "reconnect:")
        if now is None or now.ended or reconnects > self._reconnects:
            log.info("call %s: %s after its socket died (%s)", call.call_id,
                     "reconnected" if reconnects > self._reconnects else "ended", self.dead)
            return
        if stopping.is_set():
            log.warning("call %s: the gateway is stopping and the carrier has not come back "
                        "since the call's socket died (%s); hanging up now", call.call_id,
                        self.dead)
        else:
            log.warning("call %s: the carrier did not come back within %gs of its socket "
                        "dying (%s); hanging up", call.call_id, wait, self.dead)
        try:
            await self.hangup("error")
        except Exception:
            log.exception("call %s: hang-up after a dead socket failed", call.call_id)

    # -- housekeeping -----------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        """Run ``coro`` as one of the socket's tasks: the teardown cancels and awaits it."""
        task: asyncio.Task[None] = asyncio.create_task(coro, name=f"{self.protocol}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _teardown(self) -> None:
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        try:
            await self._finish_commands()
        finally:
            for subscription in self._subscriptions:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
            self._subscriptions.clear()
            self.app[CALLS].release(self)
            self.app[CALL_OUTBOXES].sweep()

    async def _finish_commands(self) -> None:
        """Stop taking commands, letting those received finish (stopping cancels them)."""
        commands, self._commands = self._commands, None
        if commands is None:
            return
        try:
            async with asyncio.timeout(COMMAND_GRACE_S):
                await commands.drain()
        except Exception as exc:
            log.warning("call %s: commands in flight not finished with the socket (%s); "
                        "cancelling them", self.call_id, type(exc).__name__)
        finally:
            await commands.stop()
