"""What running a tool produced, before it becomes tool.completed or tool.failed."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from parley.common.events import ToolCompleted, ToolFailed, ToolRequested, encode

# An event NATS refuses (its max_payload is 1 MiB by default) would report nothing at all, and
# a result that large is of no use to the model anyway: a result is cut to fit this budget.
MAX_EVENT_BYTES = 512 * 1024


class ToolOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """A result for the model, or an error it can read (and whether trying again may help)."""

    ok: bool
    result: Any = None
    truncated: bool = False
    error: str = ""
    retryable: bool = False

    @classmethod
    def success(cls, result: Any, *, truncated: bool = False) -> ToolOutcome:
        """The tool ran and returned ``result``."""
        return cls(ok=True, result=result, truncated=truncated)

    @classmethod
    def failure(cls, error: str, *, retryable: bool = False) -> ToolOutcome:
        """The tool did not run, or ran and failed."""
        return cls(ok=False, error=error, retryable=retryable)

    def event(self, request: ToolRequested, *, latency_ms: float = 0.0,
              event_id: uuid.UUID | None = None) -> ToolCompleted | ToolFailed:
        """The event that reports this outcome for ``request``.

        A result whose event would exceed :data:`MAX_EVENT_BYTES` is replaced by the beginning
        of its JSON text (``partial_result``) and a note, with ``truncated`` set. A NUL
        character (which the event store's jsonb cannot hold) becomes U+FFFD.
        """
        common: dict[str, Any] = {"org_id": request.org_id, "call_id": request.call_id,
                                  "causation_id": request.id,
                                  "tool_call_id": request.tool_call_id, "name": request.name}
        if event_id is not None:
            common["id"] = event_id
        if self.ok:
            completed = ToolCompleted(**common, result=without_nul(self.result),
                                      truncated=self.truncated, latency_ms=round(latency_ms, 3))
            return _fit(completed, MAX_EVENT_BYTES)
        return ToolFailed(**common, error=without_nul(self.error), retryable=self.retryable)


def map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """A JSON-like value with ``change`` applied to every string in it (keys included)."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [map_strings(item, change) for item in value]
    if isinstance(value, dict):
        return {map_strings(key, change): map_strings(item, change)
                for key, item in value.items()}
    return value


def without_nul(value: Any) -> Any:
    """``value`` with every NUL character replaced by U+FFFD (Postgres refuses NUL)."""
    return map_strings(value, lambda text: text.replace("\x00", "\ufffd"))


def _fit(event: ToolCompleted, budget: int) -> ToolCompleted:
    """``event``, or the same with its result cut so that the encoded event fits ``budget``."""
    size = len(encode(event))
    if size <= budget:
        return event
    text = msgspec.json.encode(event.result).decode()
    note = (f"The result was too large to pass on ({size} bytes) and was cut off; ask for "
            "less (filters, fewer fields) if you need the rest.")
    keep = min(len(text), budget)
    while True:  # escaping makes the encoded size unknowable up front: shrink until it fits
        cut = msgspec.structs.replace(event, result={"partial_result": text[:keep], "note": note},
                                      truncated=True)
        size = len(encode(cut))
        if size <= budget or keep == 0:
            return cut
        keep = min(keep - 1, int(keep * budget / size * 0.95))


class ToolError(Exception):
    """Raised inside a tool for a failure the model should hear about."""

    def __init__(self, error: str, *, retryable: bool = False) -> None:
        super().__init__(error)
        self.error = error
        self.retryable = retryable

    def outcome(self) -> ToolOutcome:
        """The outcome that reports this error."""
        return ToolOutcome.failure(self.error, retryable=self.retryable)
