"""Which media instance owns which call: leases in the ``call_leases`` KV bucket.

An instance claims a call (``create``: only one can) when the work-queue consumer hands it
``call.stream_started``, and renews the lease every ``renew_s`` with a compare-and-set on the
revision it last wrote, so an instance that lost its lease learns it on the next renewal and
stops. The lease value says where a successor should resume: the turn number and the frame
(sequence number and the time it was sent) where the caller's open turn began.

One task renews every lease the instance holds: each tick (a tenth of ``renew_s``) it publishes
the renewals that are due straight onto the bucket's subjects, together, and reads their
acknowledgements on one inbox subscription. Through ``KeyValue.update`` each renewal was a
request of its own (a future, a timeout, a JSON acknowledgement parsed into a dataclass):
~150 µs of CPU, 4 % of a core for 250 calls. Batched, they cost ~36 µs each and reach the
server in a few writes a tick. A renewal unanswered for ``renew_s`` is sent again; if it is
refused, the first may have landed after all (its answer late: a busy loop or server), so the
bucket is read before the call is given up: the lease is still ours if its owner is.

Every instance watches the bucket. A lease not renewed for ``timeout_s`` belongs to an instance
that died or hung; the first instance whose compare-and-set on that revision succeeds takes the
call over. A lease whose owner is empty was handed back by an instance shutting down and is taken
at once. The bucket's own TTL (4 h by default: longer than any outage of every media instance)
removes leases nobody took; an instance that starts sees the others' in its watch and takes up
the silent ones, those of calls that ended meanwhile included (it lets them go).

A session's :class:`~parley.media.fencing.Fence` learns from each confirmed renewal until when
the lease is surely its own (the renewal's send time plus ``timeout_s``), and that it is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from parley.common.bus import Bus
from parley.common.bus.streams import LEASES_BUCKET
from parley.media.fencing import Fence

log = logging.getLogger(__name__)


def instance_name(configured: str = "") -> str:
    """The lease-owner name of this process: ``configured`` (else host, pid), unique per start.

    An instance takes over no lease in its own name (it holds those), so a restarted process
    that kept its name — a container restarted in its pod (same hostname, pid 1), or a fixed
    ``PARLEY_INSTANCE_ID`` — never took back the calls it had left, and with no other media
    instance they stayed silent until the callers hung up. A suffix drawn at start keeps the
    configured name readable in logs and lease values.
    """
    base = configured or f"media-{socket.gethostname()}-{os.getpid()}"
    return f"{base}.{secrets.token_hex(3)}"


class LeaseUsage(msgspec.Struct, kw_only=True):
    """A session's usage so far, and the claim its usage ids are derived from.

    The STT seconds and TTS characters sent to each provider; the claim is the session's
    instance and lease revision.
    """

    instance: str
    claim: int
    stt_seconds: dict[str, float] = msgspec.field(default_factory=dict)
    tts_chars: dict[str, int] = msgspec.field(default_factory=dict)


class LeaseState(msgspec.Struct, kw_only=True):
    """A lease's value: the owner and where a successor resumes the call."""

    owner: str
    org_id: str
    agent_id: str = ""
    turn_no: int = 0  # user turns completed at the resume frame
    # Where inbound audio resumes: the frame with this sequence number (0: the start of the
    # call), its audio time, and when the gateway sent it (epoch s) — a successor reads the
    # AUDIO stream from a little before then, skipping frames before ``resume_seq``.
    resume_seq: int = 0
    resume_ms: int = 0
    resume_at: float = 0.0
    # At that frame: the ordinal of the next event of each kind numbered within turn
    # ``turn_no`` (speech.started, speech.stopped, transcript.final), so that the events the
    # successor detects again get the ids they had.
    ordinals: dict[str, int] = msgspec.field(default_factory=dict)
    # The owner's usage as of this renewal, unrecorded: a successor records it, under the ids
    # the owner's own record has (None: nothing unrecorded, or a lease of an older version).
    usage: LeaseUsage | None = None
    # The providers that refused the call for good (a permanent error: a sunset model, audio
    # they cannot decode), by kind: a successor does not ask them again either. (Not known to
    # it, each was opened or asked again after a take-over and refused again.)
    refused: dict[str, list[str]] = msgspec.field(default_factory=dict)


class LeaseLost(Exception):
    """Another instance holds the lease now (or it expired): stop working on the call."""


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish: the sequence it stored, or why not."""

    seq: int = 0
    error: _ApiError | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LeaseState)
_ack_decoder = msgspec.json.Decoder(_PubAck)
_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's error codes for a failed compare-and-set
_BUCKET_SUBJECTS = f"$KV.{LEASES_BUCKET}."
_EXPECTED_REVISION = Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value  # the compare in the CAS

TakeOver = Callable[[str, LeaseState, int], Awaitable[None]]


@dataclass
class _Held:
    """A lease this instance holds and renews."""

    revision: int
    state: Callable[[], LeaseState]  # the value to write at each renewal
    on_lost: Callable[[], None]
    due: float  # loop time of the next renewal
    in_flight: asyncio.Future[None] | None = None  # a renewal awaiting its acknowledgement
    token: str = ""  # its reply subject's last token
    sent: float = 0.0
    checking: bool = False  # a refused renewal is being checked against the bucket
    # time.monotonic() when the renewal in flight was sent, and when the last one the bucket
    # confirmed was (the claim or take-over: when the hold began)
    sent_at: float = 0.0
    confirmed_at: float = 0.0
    fence: Fence | None = None  # the session's, told of each confirmation and of the loss


class Leases:
    """Claims, renews and hands back leases; watches for leases to take over."""

    def __init__(self, bus: Bus, instance: str, *, renew_s: float = 1.0,
                 timeout_s: float = 1.5, scan_s: float = 0.1) -> None:
        self.bus = bus
        self.instance = instance
        self.renew_s = renew_s
        self.timeout_s = timeout_s
        self.scan_s = scan_s
        self._kv: KeyValue | None = None
        self._seen: dict[str, tuple[int, LeaseState, float]] = {}  # key → (rev, value, when)
        self._tasks: list[asyncio.Task[None]] = []
        self._watcher: KeyValue.KeyWatcher | None = None
        self._follower: asyncio.Task[None] | None = None
        self._taking: set[str] = set()
        self._held: dict[str, _Held] = {}
        self._acks: dict[str, str] = {}  # reply token → call id, renewals in flight
        self._tokens = itertools.count()
        self._inbox = ""
        self._ack_sub: Subscription | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()

    async def kv(self) -> KeyValue:
        """The lease bucket."""
        if self._kv is None:
            self._kv = await self.bus.js.key_value(LEASES_BUCKET)
        return self._kv

    async def claim(self, call_id: str, state: LeaseState) -> int | None:
        """Create the lease; the revision, or None if someone holds it already."""
        kv = await self.kv()
        try:
            return await kv.create(call_id, _encoder.encode(state))
        except (KeyWrongLastSequenceError, Exception) as exc:
            if isinstance(exc, KeyWrongLastSequenceError) or "wrong last sequence" in str(exc):
                return None
            raise

    async def renew(self, call_id: str, state: LeaseState, revision: int) -> int:
        """Rewrite the lease if we still hold ``revision``; raises :class:`LeaseLost`."""
        kv = await self.kv()
        try:
            return await kv.update(call_id, _encoder.encode(state), last=revision)
        except KeyWrongLastSequenceError as exc:
            raise LeaseLost(call_id) from exc
        except Exception as exc:
            if "wrong last sequence" in str(exc):
                raise LeaseLost(call_id) from exc
            raise

    # -- the leases this instance holds ------------------------------------------------------

    async def hold(self, call_id: str, revision: int, state: Callable[[], LeaseState],
                   on_lost: Callable[[], None], *, fence: Fence | None = None) -> None:
        """Keep renewing ``call_id``'s lease (from ``revision``) until :meth:`let_go`.

        ``state()`` gives the value each renewal writes; ``on_lost()`` runs once if a renewal
        finds that another instance has the lease (the hold ends then). A lease is held from the
        moment it is won — a session takes longer to start (settings, a recogniser to open) than
        a silent lease is left alone — so for a lease held already, only ``state`` and
        ``on_lost`` change: its renewals go on from the revision they reached. ``fence`` is
        told until when the lease is surely ours, at once and at each confirmed renewal, and is
        dropped if the lease is lost.
        """
        if self._renewer is None:
            nc = self.bus.nc
            self._inbox = nc.new_inbox()
            self._ack_sub = await nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
            self._renewer = asyncio.create_task(self._renew_due(), name="lease-renewer")
        held = self._held.get(call_id)
        if held is not None:
            held.state, held.on_lost = state, on_lost
        else:
            loop = asyncio.get_running_loop()
            held = self._held[call_id] = _Held(revision, state, on_lost,
                                               due=loop.time() + self.renew_s,
                                               confirmed_at=time.monotonic())
        if fence is not None:
            held.fence = fence
            fence.confirm(held.confirmed_at + self.timeout_s)

    def renew_soon(self, call_id: str) -> None:
        """Write ``call_id``'s lease at the renewer's next tick, not at its next renewal.

        For a change a successor must not miss (a provider refused the call for good): left to
        the next renewal, an owner dying within that period handed over a lease without it. The
        write is a renewal like any other — the same compare-and-set on the revision held, by
        the one renewer — so fencing is as it was; a renewal in flight is answered first (it was
        encoded before the change), then this one is sent. Nothing if the lease is not held.
        """
        held = self._held.get(call_id)
        if held is not None:
            held.due = min(held.due, asyncio.get_running_loop().time())

    async def let_go(self, call_id: str, *, wait_s: float = 1.0) -> int | None:
        """Stop renewing ``call_id``; its latest revision (None: not held, or lost).

        A renewal still in flight is waited for (up to ``wait_s``), so the revision returned is
        the one the bucket has and a release's compare-and-set can succeed.
        """
        held = self._held.pop(call_id, None)
        if held is None:
            return None
        if held.in_flight is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(held.in_flight), wait_s)
            self._acks.pop(held.token, None)
        return held.revision

    async def close(self) -> None:
        """Stop renewing (after the sessions have let go of their leases)."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        for task in list(self._checks):
            task.cancel()
        if self._ack_sub is not None:
            with contextlib.suppress(Exception):
                await self._ack_sub.unsubscribe()
            self._ack_sub = None

    async def _renew_due(self) -> None:
        loop = asyncio.get_running_loop()
        nc = self.bus.nc
        tick_s = self.renew_s / 10
        while True:
            await asyncio.sleep(tick_s)
            now = loop.time()
            for call_id, held in list(self._held.items()):
                if held.due > now:
                    continue
                if held.in_flight is not None:
                    if held.checking or now - held.sent < self.renew_s:
                        continue  # unanswered yet: give it up to a renewal period
                    log.warning("call %s: lease renewal unanswered for %.1fs; renewing again",
                                call_id, now - held.sent)
                    self._acks.pop(held.token, None)
                    self._settle(held)
                token = str(next(self._tokens))
                sent_at = time.monotonic()
                try:
                    await nc.publish(_BUCKET_SUBJECTS + call_id, _encoder.encode(held.state()),
                                     reply=f"{self._inbox}.{token}",
                                     headers={_EXPECTED_REVISION: str(held.revision)})
                except Exception:
                    log.exception("call %s: lease renewal failed", call_id)
                    continue
                self._acks[token] = call_id
                held.in_flight, held.token = loop.create_future(), token
                held.sent, held.due, held.sent_at = now, now + self.renew_s, sent_at

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject.rpartition(".")[2]
        call_id = self._acks.pop(token, None)
        held = self._held.get(call_id) if call_id is not None else None
        if held is None or held.in_flight is None or held.token != token:
            return  # let go of meanwhile, or a late answer to a renewal sent again
        try:
            ack = _ack_decoder.decode(msg.data)
        except msgspec.DecodeError:  # e.g. "no responders": JetStream is not there
            log.error("call %s: lease renewal not acknowledged: %r %r", call_id,
                      bytes(msg.data[:80]), msg.headers)
            self._settle(held)
            return
        if ack.error is None:
            held.revision, held.confirmed_at = ack.seq, held.sent_at
            if held.fence is not None:
                held.fence.confirm(held.sent_at + self.timeout_s)
        elif ack.error.err_code in _WRONG_LAST_SEQUENCE:
            assert call_id is not None
            held.checking = True
            self._checks.add(asyncio.create_task(self._check(call_id, held),
                                                 name=f"lease-check-{call_id}"))
            return
        else:
            log.error("call %s: lease renewal refused: %s", call_id, ack.error.description)
        self._settle(held)

    async def _check(self, call_id: str, held: _Held) -> None:
        """After a refused renewal: is the lease lost, or did our own earlier renewal land.

        A renewal sent again after its first went unanswered (a busy loop or server) fails
        when the first did land. The bucket says which: the lease is still ours if its owner is.
        """
        try:
            entry = await (await self.kv()).get(call_id)
            state = _decoder.decode(entry.value or b"")
            ours = state.owner == self.instance
        except (NotFoundError, msgspec.DecodeError) as exc:  # gone (expired, deleted)
            log.debug("call %s: lease check: %r", call_id, exc)
            ours, entry = False, None
        except Exception as exc:  # no answer (a slow server): unknown, so still held; the
            # next renewal fails the same way and asks again
            log.warning("call %s: lease check failed: %r; asking again", call_id, exc)
            self._settle(held)
            return
        finally:
            held.checking = False
            self._checks.discard(asyncio.current_task())  # type: ignore[arg-type]
        if ours and entry is not None:
            held.revision = entry.revision or held.revision
            self._settle(held)
            return
        self._settle(held)
        if self._held.get(call_id) is held:
            del self._held[call_id]
            if held.fence is not None:
                held.fence.drop()
            held.on_lost()

    @staticmethod
    def _settle(held: _Held) -> None:
        if held.in_flight is not None and not held.in_flight.done():
            held.in_flight.set_result(None)
        held.in_flight = None

    # -- giving up, watching, taking over ----------------------------------------------------

    async def release(self, call_id: str, revision: int, *, hand_over: LeaseState | None = None
                      ) -> None:
        """Give the call up: delete the lease (call over) or hand it over (owner emptied)."""
        kv = await self.kv()
        with contextlib.suppress(KeyWrongLastSequenceError, NotFoundError, Exception):
            if hand_over is not None:
                hand_over.owner = ""
                await kv.update(call_id, _encoder.encode(hand_over), last=revision)
            else:
                await kv.delete(call_id, last=revision)

    async def watch(self, take_over: TakeOver) -> None:
        """Start following the bucket and taking over calls whose owner went silent.

        ``take_over(call_id, state, revision)`` runs for each call this instance wins (the state
        is the previous owner's, the revision ours); the lease is held (renewed with that state)
        from the moment it is won, until the call's session holds it or ``take_over`` lets go.
        If ``take_over`` raises, the lease is handed back (owner emptied) for any instance to
        take at once.
        """
        await self._watch_all()
        self._tasks.append(asyncio.create_task(self._scan(take_over), name="lease-scan"))

    async def _watch_all(self) -> None:
        """Follow the bucket afresh: its current leases first, then every change."""
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._follower is not None:
            self._follower.cancel()
        self._seen.clear()
        self._watcher = watcher = await (await self.kv()).watchall()
        self._follower = asyncio.create_task(self._follow(watcher), name="lease-watch")
        self._tasks.append(self._follower)

    async def stop(self) -> None:
        """Stop watching."""
        if self._watcher is not None:  # ends the follower's iteration (and unsubscribes)
            with contextlib.suppress(Exception):
                await self._watcher.stop()
            self._watcher = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._follower = None

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        # Iterated, not ``updates(timeout=…)``: that wraps the queue in ``wait_for``, which on
        # Python 3.11 swallows a cancel that lands as an update arrives (stop() then waited
        # forever: lease renewals arrive every second per call), and its timeout ended the
        # watch for good on an instance with no calls for that long.
        async for entry in watcher:
            if entry is None:  # end of the initial values
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self._seen.pop(entry.key, None)
                continue
            try:
                state = _decoder.decode(entry.value)
            except msgspec.DecodeError:
                log.error("undecodable lease for %s; ignoring it", entry.key)
                continue
            self._seen[entry.key] = (entry.revision or 0, state, time.monotonic())

    async def _scan(self, take_over: TakeOver) -> None:
        nc = self.bus.nc
        reconnects = warned = nc.stats["reconnects"]
        while True:
            await asyncio.sleep(self.scan_s)
            now = time.monotonic()
            if not nc.is_connected:
                continue
            if nc.stats["reconnects"] != reconnects:
                # The watch is an ordered consumer, kept in the server's memory: a restarted
                # server has forgotten it, and it saw no change until nats-py asked for it
                # again, ~20 s later (an owner that died meanwhile was taken over by no one
                # until then). Watched anew, every lease's silence counts from now: cut off
                # from NATS, this instance saw no renewal, and that silence was ours, not the
                # owners' (the first instance back from a 2 s NATS restart took the calls of
                # one still serving them).
                try:
                    await self._watch_all()
                except Exception as exc:  # JetStream still recovering: try again next scan
                    if warned != nc.stats["reconnects"]:
                        warned = nc.stats["reconnects"]
                        log.warning("lease watch not restarted after a reconnect yet: %r", exc)
                    continue
                reconnects = nc.stats["reconnects"]
                continue
            for call_id, (revision, state, seen) in list(self._seen.items()):
                if state.owner == self.instance or call_id in self._taking:
                    continue
                if state.owner and now - seen < self.timeout_s:
                    continue
                self._taking.add(call_id)
                mine = msgspec.structs.replace(state, owner=self.instance)
                won: int | None = None
                try:
                    won = await self._try_take(call_id, mine, revision)
                    if won is not None:
                        log.warning("taking over call %s from %s (lease silent %.1fs)",
                                    call_id, state.owner or "a departing instance", now - seen)
                        # Renewed from now on: starting the call's session takes a while.
                        if call_id not in self._held:
                            await self.hold(call_id, won, lambda mine=mine: mine,
                                            lambda call_id=call_id: log.warning(
                                                "call %s: lost before its session started",
                                                call_id))
                        await take_over(call_id, state, won)
                except Exception:
                    log.exception("take-over of %s failed", call_id)
                    if won is not None:  # won but nobody serves it: any instance may take it
                        await self._hand_back(call_id, mine)
                finally:
                    self._taking.discard(call_id)

    async def _hand_back(self, call_id: str, state: LeaseState) -> None:
        revision = await self.let_go(call_id)
        if revision is not None:
            await self.release(call_id, revision, hand_over=msgspec.structs.replace(state))

    async def _try_take(self, call_id: str, mine: LeaseState, revision: int) -> int | None:
        kv = await self.kv()
        try:
            return await kv.update(call_id, _encoder.encode(mine), last=revision)
        except KeyWrongLastSequenceError:
            return None
        except Exception as exc:
            if "wrong last sequence" in str(exc):
                return None
            raise
