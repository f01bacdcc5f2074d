"""What running a tool produced, before it becomes tool.completed or tool.failed."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from parley.common.events import ToolCompleted, ToolFailed, ToolRequested


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
        """The event that reports this outcome for ``request``."""
        common: dict[str, Any] = {"org_id": request.org_id, "call_id": request.call_id,
                                  "causation_id": request.id,
                                  "tool_call_id": request.tool_call_id, "name": request.name}
        if event_id is not None:
            common["id"] = event_id
        if self.ok:
            return ToolCompleted(**common, result=self.result, truncated=self.truncated,
                                 latency_ms=round(latency_ms, 3))
        return ToolFailed(**common, error=self.error, retryable=self.retryable)


class ToolError(Exception):
    """Raised inside a tool for a failure the model should hear about."""

    def __init__(self, error: str, *, retryable: bool = False) -> None:
        super().__init__(error)
        self.error = error
        self.retryable = retryable

    def outcome(self) -> ToolOutcome:
        """The outcome that reports this error."""
        return ToolOutcome.failure(self.error, retryable=self.retryable)
