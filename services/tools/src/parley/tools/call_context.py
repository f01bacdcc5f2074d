"""Which agent a call belongs to, and the customer's number, for the tools it requests.

``tool.requested`` names the call, not the agent. The gateway's ``carrier_calls`` row is
written before the call starts, so it is looked up first; the recorder's ``calls`` projection
next; and last the call's own events on the bus (``call.requested`` /
``call.stream_started``), folded. Answers are cached per call (a bounded map).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgspec
from psycopg import AsyncConnection

from parley.common.bus import Bus
from parley.common.events import CallRequested, CallStreamStarted


class CallContext(msgspec.Struct, frozen=True, kw_only=True):
    """What the tools service knows about a live call."""

    org_id: str
    call_id: str
    agent_id: str = ""
    customer_number: str = ""


def fold_call_context(org_id: str, call_id: str, events: list[Any]) -> CallContext:
    """A call's context from its events (pure)."""
    agent_id = customer = ""
    for event in events:
        match event:
            case CallRequested():
                agent_id = event.agent_id or agent_id
                customer = (event.from_number if event.direction == "inbound"
                            else event.to_number)
            case CallStreamStarted() if event.agent_id:
                agent_id = event.agent_id
    return CallContext(org_id=org_id, call_id=call_id, agent_id=agent_id,
                       customer_number=customer)


class CallDirectory:
    """Finds (and remembers) the context of the calls tools are requested on."""

    def __init__(self, bus: Bus, *, capacity: int = 10_000) -> None:
        self.bus = bus
        self.capacity = capacity
        self._cache: OrderedDict[str, CallContext] = OrderedDict()

    async def lookup(self, conn: AsyncConnection[Any], org_id: str, call_id: str) -> CallContext:
        """The call's context; ``agent_id`` is empty when nothing knows the call."""
        key = f"{org_id}/{call_id}"
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        context = await self._from_tables(conn, org_id, call_id)
        if context is None:
            events = await self.bus.replay_call(call_id, org_id=org_id)
            context = fold_call_context(org_id, call_id, events)
        if context.agent_id:
            self._cache[key] = context
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return context

    async def _from_tables(self, conn: AsyncConnection[Any], org_id: str,
                           call_id: str) -> CallContext | None:
        for table in ("carrier_calls", "calls"):
            cursor = await conn.execute(
                f"SELECT agent_id, direction, from_number, to_number FROM {table} "
                "WHERE call_id = %s AND org_id = %s", (call_id, org_id))
            row = await cursor.fetchone()
            if row is not None and row[0]:
                customer = row[2] if row[1] == "inbound" else row[3]
                return CallContext(org_id=org_id, call_id=call_id, agent_id=row[0],
                                   customer_number=customer)
        return None
