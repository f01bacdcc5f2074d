"""Each call's outbox on this instance: what its sockets report, and the call's end after it.

What a carrier socket reports (its start, mark echoes, keys, the relay's turns) goes out
through an outbox: an event NATS did not acknowledge (an outage) is published again under its
id, for about a minute. The call's end, published straight away, was stored before events the
outbox was still publishing again, and readers of the stream (projections, folds, integrators)
saw a call's events after its end; refused outright during the outage, it failed the socket
(or the carrier's status callback) and the call never ended in the store. So a call's sockets
on this instance share one outbox, and its end (whichever socket, webhook or check decides it)
goes through it after everything the call has pending, retried like the rest: other calls wait
on nothing of it. An end given up unpublished gives its claim back, so the orphan check
(:mod:`.orphans`) ends the call later rather than never; one whose give-back did not finish
(Postgres slow at shutdown: cancelled after :data:`UNCLAIM_AT_SHUTDOWN_S`), or whose gateway
died between the claim and the publish, is published by the check's settling of claimed ends.

At shutdown what is pending gets :data:`DRAIN_AT_SHUTDOWN_S` to go out (a deploy during a NATS
blip lost it otherwise); what does not is given up, logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from psycopg_pool import AsyncConnectionPool

from parley.common.bus import Bus, Outbox
from parley.common.events import CallEnded, CallFailed, Event
from parley.common.metrics import Metrics

END_STORED = "end:stored"  # the milestone of an end found, or published, in the event store

log = logging.getLogger(__name__)

# Attempts at an event whose first publish went unacknowledged, each up to the bus's publish
# timeout (5 s): a NATS outage of about a minute loses nothing the carrier reported.
PUBLISH_ATTEMPTS = 10
# At shutdown, how long pending events may still take to go out: retried for about a minute
# through an outage, they must not outlast an orchestrator's kill grace (30 s), after the 10 s
# the server gives requests in flight and the 5 s calls whose socket died get to be settled.
DRAIN_AT_SHUTDOWN_S = 10.0
UNCLAIM_AT_SHUTDOWN_S = 2.0  # ends given up at shutdown giving their claim back (Postgres)


class CallOutboxes:
    """The outbox of each call with events pending on this instance."""

    def __init__(self, bus: Bus, pool: AsyncConnectionPool[Any], metrics: Metrics) -> None:
        self.bus, self.pool = bus, pool
        self._outboxes: dict[str, Outbox] = {}
        self._ends: set[asyncio.Task[None]] = set()
        self._dropped = metrics.counter(
            "gateway_call_events_dropped",
            "Call events given up unpublished when the gateway stopped (NATS away)")

    def of(self, call_id: str) -> Outbox:
        """The call's outbox (the same for every socket of the call while it has events)."""
        outbox = self._outboxes.get(call_id)
        if outbox is None:
            outbox = self._outboxes[call_id] = Outbox(self.bus, name=f"call {call_id}",
                                                      attempts=PUBLISH_ATTEMPTS)
        return outbox

    def end(self, event: CallEnded | CallFailed, *extra: Event) -> None:
        """Publish ``extra`` then ``event`` after the call's pending events (its end claimed)."""
        # queued now, not by the task: a shutdown's drain must find it. The end on its own
        # (after the extra events all the same): whether it was stored decides its claim.
        outbox = self.of(event.call_id)
        if extra:
            outbox.put_after_pending(*extra)
        published = outbox.put_after_pending(event)
        task = asyncio.create_task(self._end(event, published), name=f"end:{event.call_id}")
        self._ends.add(task)
        task.add_done_callback(self._ends.discard)

    def sweep(self) -> None:
        """Forget the outboxes with nothing pending (a call's next event gets a new one)."""
        for call_id in [call_id for call_id, outbox in self._outboxes.items()
                        if not outbox.pending]:
            del self._outboxes[call_id]

    async def drain(self, timeout_s: float = DRAIN_AT_SHUTDOWN_S) -> int:
        """At shutdown: let pending events go out for up to ``timeout_s``; give up the rest.

        At once if the bus is closed for good. Returns how many events were given up.
        """
        outboxes = list(self._outboxes.values())
        dropped = sum(await asyncio.gather(*(outbox.drain(timeout_s) for outbox in outboxes)))
        if self._ends:  # ends given up give their claim back
            _, stuck = await asyncio.wait(set(self._ends), timeout=UNCLAIM_AT_SHUTDOWN_S)
            for task in stuck:
                task.cancel()
        self.sweep()
        if dropped:
            self._dropped.inc(dropped)
            log.error("stopping with %d call events not published (NATS unreachable; "
                      "waited up to %g s)", dropped, timeout_s)
        return dropped

    async def _end(self, event: CallEnded | CallFailed, published: asyncio.Task[bool]) -> None:
        """Once the end is published or given up: a lost end gives its claim back.

        A stored end is marked so (the ``end:stored`` milestone): the orphan check's settling
        of ends claimed but never stored need not look for it in the event store, a JetStream
        lookup per call ended otherwise.
        """
        await asyncio.wait({published})
        confirmed = not published.cancelled() and published.result()
        self.sweep()
        if confirmed:
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(
                        "INSERT INTO carrier_call_milestones (call_id, milestone) "
                        "VALUES (%s, %s) ON CONFLICT DO NOTHING", (event.call_id, END_STORED))
            except Exception as exc:  # the settling round looks it up instead
                log.warning("call %s: could not mark its end stored: %s", event.call_id, exc)
            return
        log.error("call %s: %s not published; the call is left to the orphan check",
                  event.call_id, event.type)
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "UPDATE carrier_calls SET ended_at = NULL, end_reason = '' "
                    "WHERE call_id = %s AND ended_at = %s", (event.call_id, event.at))
        except Exception:
            log.exception("call %s: could not give its end's claim back", event.call_id)
