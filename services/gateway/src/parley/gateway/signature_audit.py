"""The audit of refused signatures, bounded: one event per source and reason per interval.

Anyone on the internet can send a forged webhook, and the event store keeps every event for
good, so auditing each refused request would let them fill it (and each audit looked the called
number up in Postgres). Every refusal is still answered 403 and counted
(``parley_gateway_signature_rejections_total{carrier,path}``); the audit instead publishes
``security.signature_rejected`` for the first refusal of a (carrier, route, remote address,
reason, called number) at once and folds the ones that follow within
``gateway_signature_audit_interval_s`` into one more event at the interval's end, whose
``count`` says how many it stands for. So a flood from one source is one event per interval
carrying its size, and one stray refusal is still audited the moment it happens.

The called number is in the key because it names the org whose audit log gets the event
(looked up once per event, not per refusal): refusals aimed at two orgs' numbers are never
folded into one count filed under either. It is only what the forged request claimed, so an
attacker can vary it; that merely makes more keys, which the bound below caps.

At most ``gateway_signature_audit_max_sources`` keys are tracked at once; refusals of any other
key while that many are (a flood from many addresses, to many numbers, or with made-up algorithm
names) fold into one key per carrier and route with no remote address, no number and
:data:`OVERFLOW_REASON`. Their org is :data:`UNKNOWN_ORG`, as for a number no org has: that
count mixes requests aimed at anyone, so no org's log may show it. Worst case this is about
``max_sources`` + the overflow keys' events per interval and instance, whatever the flood's
size. Pending counts are published at shutdown too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

from parley.common.bus import Bus
from parley.common.configuration import find_number
from parley.common.events import SecuritySignatureRejected, is_token
from parley.common.runtime import raise_if_cancelled

log = logging.getLogger(__name__)

UNKNOWN_ORG = "unknown"
# At shutdown, how long the last flush may take: with NATS away each folded source's publish
# waits out the publish timeout (5 s), one after another
FLUSH_AT_SHUTDOWN_S = 2.0
OVERFLOW_REASON = "refused from more sources than the audit tracks at once (see the metric)"


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refused request, as much of it as the audit keeps."""

    carrier: str
    route: str  # the route's canonical path: a bounded set
    path: str
    remote: str
    reason: str
    number: str = ""  # the called number it claimed (an unverified hint of the org)

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """What refusals are folded by (the number: never one org's refusals under another)."""
        return (self.carrier, self.route, self.remote, self.reason, self.number)


@dataclass(slots=True)
class _Window:
    opened: datetime
    folded: int = 0
    first_folded: Refusal | None = None


class RefusalFolder:
    """Which refusals to audit now and which to fold (pure: the caller passes the time)."""

    def __init__(self, *, interval_s: float, max_sources: int) -> None:
        self.interval_s = interval_s
        self.max_sources = max_sources
        self._windows: dict[tuple[str, str, str, str, str], _Window] = {}

    def admit(self, refusal: Refusal, now: datetime) -> Refusal | None:
        """The refusal to audit now (with count 1), or None when it was folded."""
        if refusal.key not in self._windows and len(self._windows) >= self.max_sources:
            # No number either: this count mixes every org's, so it is filed under none.
            refusal = Refusal(refusal.carrier, refusal.route, refusal.path, "", OVERFLOW_REASON)
        window = self._windows.get(refusal.key)
        if window is None:
            self._windows[refusal.key] = _Window(opened=now)
            return refusal
        window.folded += 1
        if window.first_folded is None:
            window.first_folded = refusal
        return None

    def due(self, now: datetime, *, everything: bool = False) -> list[tuple[Refusal, int]]:
        """The folded refusals whose interval has ended (or all, at shutdown), with counts.

        A key that folded refusals starts a new interval, so a flood that goes on is one event
        per interval; a key that folded none is forgotten.
        """
        summaries: list[tuple[Refusal, int]] = []
        for key, window in list(self._windows.items()):
            if now < window.opened:
                # The wall clock stepped back (NTP, a VM restored): the interval starts again
                # now, rather than ending only once the clock is back past its opening.
                window.opened = now
            if not everything and (now - window.opened).total_seconds() < self.interval_s:
                continue
            if window.first_folded is None:
                del self._windows[key]
                continue
            summaries.append((window.first_folded, window.folded))
            self._windows[key] = _Window(opened=now)
        return summaries

    def refold(self, summaries: list[tuple[Refusal, int]], now: datetime) -> None:
        """Fold back summaries :meth:`due` returned that could not be published."""
        for refusal, count in summaries:
            window = self._windows.setdefault(refusal.key, _Window(opened=now))
            window.folded += count
            window.first_folded = refusal  # the earlier one


class SignatureAudit:
    """Publishes the folder's events on the bus; one per gateway app."""

    def __init__(self, *, bus: Bus, pool: AsyncConnectionPool[Any], folder: RefusalFolder,
                 clock: Callable[[], datetime]) -> None:
        self.bus, self.pool, self.folder, self.clock = bus, pool, folder, clock

    async def refused(self, refusal: Refusal) -> None:
        """Audit a refused request now, or fold it (never raises: the 403 matters more)."""
        audited = self.folder.admit(refusal, self.clock())
        if audited is None:
            log.debug("refused %s from %s: %s (folded into the audit)", refusal.path,
                      refusal.remote, refusal.reason)
            return
        await self._publish(audited, 1, await self._org_of(audited.number))

    async def run(self) -> None:
        """Publish folded counts as their intervals end, until cancelled."""
        period = min(self.folder.interval_s, 1.0)
        while True:
            raise_if_cancelled()  # (a publish may have swallowed the shutdown's cancel)
            await asyncio.sleep(period)
            await self.flush()

    async def flush(self, *, everything: bool = False) -> None:
        """Publish the folded counts that are due (all of them with ``everything``).

        A flush cut short (cancelled at shutdown) folds what it had not published yet back in,
        for the last flush to publish.
        """
        pending = self.folder.due(self.clock(), everything=everything)
        try:
            while pending:
                refusal, count = pending[0]
                org_id = await self._org_of(refusal.number)
                del pending[0]  # from here on it is on its way (or logged as failed)
                await self._publish(refusal, count, org_id)
        finally:
            self.folder.refold(pending, self.clock())

    async def flush_at_shutdown(self, timeout_s: float) -> None:
        """Publish every folded count, for up to ``timeout_s``; what is left is logged lost."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.flush(everything=True)
        except TimeoutError:
            lost = self.folder.due(self.clock(), everything=True)
            log.error("stopping with %d refused-signature audit events not published (%d "
                      "refusals; NATS unreachable within %g s)", len(lost),
                      sum(count for _, count in lost), timeout_s)

    async def _publish(self, refusal: Refusal, count: int, org_id: str) -> None:
        log.warning("refused %s %s from %s: %s (org %s)%s", refusal.carrier, refusal.path,
                    refusal.remote, refusal.reason, org_id,
                    f"; {count} such refusals folded into one audit event" if count > 1
                    else "")
        try:
            await self.bus.publish(SecuritySignatureRejected(
                org_id=org_id, path=refusal.path, carrier=refusal.carrier,
                remote=refusal.remote, reason=refusal.reason, count=count))
        except Exception:
            log.exception("could not publish security.signature_rejected")

    async def _org_of(self, number: str) -> str:
        """The org of the called number when it resolves (an unverified hint, for the audit)."""
        if not number:
            return UNKNOWN_ORG
        try:
            async with self.pool.connection() as conn:
                found = await find_number(conn, number)
        except Exception:
            log.exception("number lookup failed while auditing a refused request")
            return UNKNOWN_ORG
        return found.org_id if found is not None and is_token(found.org_id) else UNKNOWN_ORG

