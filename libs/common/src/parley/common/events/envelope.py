"""The envelope every event carries, and the base classes per aggregate.

An event is a frozen, keyword-only msgspec Struct tagged by an explicit dotted string
(``tag="transcript.final"``), never by its class name: stored rows outlive renames. Schema
evolution follows msgspec's rules — new fields get defaults, field types never change, and a
type's ``v`` default is bumped when its meaning changes.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, ClassVar

import msgspec

# One subject token: NATS subjects split on "." and treat "*", ">" and whitespace specially.
# "(?!\n)" because "$" also matches before a final newline ("c1\n" would pass, and NATS refuses
# that subject); a lookahead rather than "\Z" keeps the pattern valid JSON Schema (ECMA 262).
TOKEN_PATTERN = r"^[A-Za-z0-9_\-]{1,128}(?!\n)$"
_TOKEN = re.compile(TOKEN_PATTERN)
Token = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN)]


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7): 48-bit ms timestamp, then randomness."""
    unix_ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (unix_ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= (rand >> 68) << 64  # 12 bits rand_a
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # 62 bits rand_b
    return uuid.UUID(int=value)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class _Decoding(threading.local):
    """Whether this thread is inside ``decode``, where a missing field must not be made up."""

    active = False


DECODING = _Decoding()
# What a missing id or at decodes to (never a made-up value): decode refuses the event.
MISSING_ID = uuid.UUID(int=0)
MISSING_AT = datetime.min.replace(tzinfo=UTC)


def _new_id() -> uuid.UUID:
    return MISSING_ID if DECODING.active else uuid7()


def _now() -> datetime:
    return MISSING_AT if DECODING.active else utcnow()


def is_token(value: str) -> bool:
    """True if value can stand as one NATS subject token (ids, org ids)."""
    return _TOKEN.fullmatch(value) is not None


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Envelope fields shared by every event.

    ``id`` is a UUIDv7 (also the JetStream ``Nats-Msg-Id``, so a republish is deduplicated),
    ``at`` a timezone-aware time, ``causation_id`` the id of the event or command that caused
    this one, ``v`` the schema version. A new event gets a fresh ``id`` and ``at`` by default,
    but on the wire both are required and ``at`` must carry its offset: a decode that made up an
    id would give the same bytes a different identity each time they are read.

    Events are not tracked by the cyclic garbage collector (``gc=False``, inherited by every
    event type): they are immutable data and never part of a reference cycle, and services keep
    thousands of them (the brain caches each live call's history), which every full collection
    would otherwise walk.
    """

    aggregate: ClassVar[str]
    aggregate_field: ClassVar[str]

    id: uuid.UUID = msgspec.field(default_factory=_new_id)
    org_id: Token
    at: Annotated[datetime, msgspec.Meta(tz=True)] = msgspec.field(default_factory=_now)
    causation_id: uuid.UUID | None = None
    v: int = 1

    @property
    def type(self) -> str:
        """The dotted event type, e.g. ``transcript.final``."""
        return type(self).__struct_config__.tag  # type: ignore[return-value]

    @property
    def aggregate_id(self) -> str:
        """Id of the aggregate (call, agent, org…) this event belongs to."""
        return str(getattr(self, self.aggregate_field))


class CallEvent(Event, frozen=True, kw_only=True):
    """An event in the life of one call."""

    aggregate: ClassVar[str] = "call"
    aggregate_field: ClassVar[str] = "call_id"
    call_id: Token


class AgentEvent(Event, frozen=True, kw_only=True):
    """A configuration change of an agent."""

    aggregate: ClassVar[str] = "agent"
    aggregate_field: ClassVar[str] = "agent_id"
    agent_id: Token


class OrgEvent(Event, frozen=True, kw_only=True):
    """An event about the organisation as a whole (keys, numbers, quotas, security)."""

    aggregate: ClassVar[str] = "org"
    aggregate_field: ClassVar[str] = "org_id"
