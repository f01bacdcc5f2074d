"""Usage and quota events, emitted by billing and the services that meter."""

from __future__ import annotations

from typing import Literal

from .envelope import CallEvent, OrgEvent


class UsageRecorded(CallEvent, frozen=True, kw_only=True, tag="usage.recorded"):
    """Metered usage of a call, e.g. STT seconds or LLM tokens."""

    kind: Literal["call_minutes", "stt_seconds", "tts_characters", "llm_input_tokens",
                  "llm_output_tokens", "tool_calls", "recording_seconds"]
    quantity: float
    unit: str
    provider: str = ""
    cost_usd: float = 0.0


class QuotaExceeded(OrgEvent, frozen=True, kw_only=True, tag="quota.exceeded"):
    """An organisation went over a plan limit."""

    kind: str
    limit: float
    used: float
