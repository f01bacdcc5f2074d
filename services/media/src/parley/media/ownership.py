"""Which media instance owns which call: leases in the ``call_leases`` KV bucket.

An instance claims a call (``create``: only one can) when the work-queue consumer hands it
``call.stream_started``, and renews the lease every ``renew_s`` with a compare-and-set on the
revision it last wrote, so an instance that lost its lease learns it on the next renewal and
stops. The lease value says where a successor should resume: the turn number and the frame
(sequence number and the time it was sent) where the caller's open turn began.

Every instance watches the bucket. A lease not renewed for ``timeout_s`` belongs to an instance
that died or hung; the first instance whose compare-and-set on that revision succeeds takes the
call over. A lease whose owner is empty was handed back by an instance shutting down and is taken
at once. The bucket's own TTL (5 s by default) removes leases nobody took.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from parley.common.bus import Bus
from parley.common.bus.streams import LEASES_BUCKET

log = logging.getLogger(__name__)


class LeaseState(msgspec.Struct, kw_only=True):
    """A lease's value: the owner and where a successor resumes the call."""

    owner: str
    org_id: str
    agent_id: str = ""
    turn_no: int = 0  # user turns completed
    # Where inbound audio resumes: the frame with this sequence number (0: the start of the
    # call), its audio time, and when the gateway sent it (epoch s) — a successor reads the
    # AUDIO stream from a little before then, skipping frames before ``resume_seq``.
    resume_seq: int = 0
    resume_ms: int = 0
    resume_at: float = 0.0


class LeaseLost(Exception):
    """Another instance holds the lease now (or it expired): stop working on the call."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LeaseState)

TakeOver = Callable[[str, LeaseState, int], Awaitable[None]]


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
        self._taking: set[str] = set()

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
        is the previous owner's, the revision ours).
        """
        kv = await self.kv()
        self._watcher = watcher = await kv.watchall()
        self._tasks.append(asyncio.create_task(self._follow(watcher), name="lease-watch"))
        self._tasks.append(asyncio.create_task(self._scan(take_over), name="lease-scan"))

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
        while True:
            await asyncio.sleep(self.scan_s)
            now = time.monotonic()
            for call_id, (revision, state, seen) in list(self._seen.items()):
                if state.owner == self.instance or call_id in self._taking:
                    continue
                if state.owner and now - seen < self.timeout_s:
                    continue
                self._taking.add(call_id)
                try:
                    won = await self._try_take(call_id, state, revision)
                    if won is not None:
                        log.warning("taking over call %s from %s (lease silent %.1fs)",
                                    call_id, state.owner or "a departing instance", now - seen)
                        await take_over(call_id, state, won)
                except Exception:
                    log.exception("take-over of %s failed", call_id)
                finally:
                    self._taking.discard(call_id)

    async def _try_take(self, call_id: str, state: LeaseState, revision: int) -> int | None:
        kv = await self.kv()
        mine = msgspec.structs.replace(state, owner=self.instance)
        try:
            return await kv.update(call_id, _encoder.encode(mine), last=revision)
        except KeyWrongLastSequenceError:
            return None
        except Exception as exc:
            if "wrong last sequence" in str(exc):
                return None
            raise
