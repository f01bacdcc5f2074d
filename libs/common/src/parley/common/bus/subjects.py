"""Subject names: the one place that knows how the bus is laid out (ARCHITECTURE §2)."""

from __future__ import annotations

from ..events import Event, is_token

EVENTS_PREFIX = "parley.ev"
AUDIO_PREFIX = "parley.audio"
COMMAND_PREFIX = "parley.cmd"
DEAD_LETTER_PREFIX = "parley.dlq"


class SubjectError(ValueError):
    """A value cannot be used as a subject token."""


def _token(value: str, what: str) -> str:
    if not is_token(value):
        raise SubjectError(f"{what} {value!r} is not a valid subject token ([A-Za-z0-9_-]+)")
    return value


def event_subject(event: Event) -> str:
    """``parley.ev.<org>.<aggregate>.<id>.<type>``.

    For example ``parley.ev.o1.call.c9.transcript.final``.
    """
    return (f"{EVENTS_PREFIX}.{_token(event.org_id, 'org_id')}.{event.aggregate}."
            f"{_token(event.aggregate_id, event.aggregate_field)}.{event.type}")


def call_events(call_id: str, org_id: str = "*", event_type: str = ">") -> str:
    """Filter for every event of one call (any org unless given), or its events of one type."""
    org = org_id if org_id == "*" else _token(org_id, "org_id")
    return f"{EVENTS_PREFIX}.{org}.call.{_token(call_id, 'call_id')}.{event_type}"


def events_of_type(event_type: str, org_id: str = "*") -> str:
    """Filter for one event type across aggregates, e.g. ``turn.user_ended``."""
    org = org_id if org_id == "*" else _token(org_id, "org_id")
    return f"{EVENTS_PREFIX}.{org}.*.*.{event_type}"


def org_events(org_id: str) -> str:
    """Filter for everything one tenant may see."""
    return f"{EVENTS_PREFIX}.{_token(org_id, 'org_id')}.>"


def audio_subject(call_id: str, direction: str) -> str:
    """``parley.audio.<call>.in`` (caller → us) or ``.out`` (agent → caller)."""
    if direction not in ("in", "out"):
        raise SubjectError(f"audio direction must be 'in' or 'out', not {direction!r}")
    return f"{AUDIO_PREFIX}.{_token(call_id, 'call_id')}.{direction}"


def command_subject(call_id: str, verb: str) -> str:
    """``parley.cmd.gateway.<call>.<verb>``: a request to the instance holding the socket."""
    return f"{COMMAND_PREFIX}.gateway.{_token(call_id, 'call_id')}.{_token(verb, 'verb')}"


def dead_letter_subject(consumer: str) -> str:
    """Where a consumer's undeliverable messages are kept, with the reason in headers."""
    return f"{DEAD_LETTER_PREFIX}.{_token(consumer, 'consumer')}"


def parse_event_subject(subject: str) -> tuple[str, str, str, str]:
    """Split an event subject into (org_id, aggregate, aggregate_id, type)."""
    parts = subject.split(".", 5)
    if len(parts) != 6 or f"{parts[0]}.{parts[1]}" != EVENTS_PREFIX:
        raise SubjectError(f"not an event subject: {subject!r}")
    return parts[2], parts[3], parts[4], parts[5]
