"""Tool execution events, emitted by the tools service."""

from __future__ import annotations

from typing import Any

import msgspec

from .envelope import CallEvent


class ToolApprovalRequested(CallEvent, frozen=True, kw_only=True,
                            tag="tool.approval_requested"):
    """A sensitive tool waits for a human to approve it."""

    tool_call_id: str
    name: str
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)
    expires_in_s: float = 60.0


class ToolApproved(CallEvent, frozen=True, kw_only=True, tag="tool.approved"):
    """A human approved a sensitive tool call."""

    tool_call_id: str
    approved_by: str


class ToolDenied(CallEvent, frozen=True, kw_only=True, tag="tool.denied"):
    """A sensitive tool call was denied, by a human or by the approval timeout."""

    tool_call_id: str
    denied_by: str
    reason: str = ""


class ToolCompleted(CallEvent, frozen=True, kw_only=True, tag="tool.completed"):
    """A tool ran; its (possibly truncated) result goes back to the model."""

    tool_call_id: str
    name: str
    result: Any = None
    truncated: bool = False
    latency_ms: float = 0.0


class ToolFailed(CallEvent, frozen=True, kw_only=True, tag="tool.failed"):
    """A tool could not run; the error goes back to the model."""

    tool_call_id: str
    name: str
    error: str
    retryable: bool = False
