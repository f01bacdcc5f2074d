"""What a turn's LLM rounds were billed: counted from the reply stream, recorded as events.

A round's stream says what each response is billed as it begins (:class:`UsageReported`, from
providers that report it then) and as it ends (:class:`Done`); a response cut short by a
barge-in or a failure has only the first. :class:`RoundUsage` keeps one entry per response (a
fallback or a retry makes several); the worker records them as ``usage.recorded``, one event
per provider and kind, for integrators to bill from and for the fold to sum into the turn's
``turn.completed`` (a turn's rounds may run on different instances). A speculative reply that
no turn adopted is recorded the same way, marked ``speculative`` (billed, but none of the
turn's rounds).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from parley.brain.llm.base import Done, Usage, UsageReported
from parley.common.events import UsageRecorded

# usage.recorded kind → the Usage field it counts
LLM_KINDS = {"llm_input_tokens": "input_tokens", "llm_cache_read_tokens": "cache_read_tokens",
             "llm_cache_write_tokens": "cache_write_tokens",
             "llm_output_tokens": "output_tokens"}


def add_usage(a: Usage, b: Usage) -> Usage:
    """The tokens of both."""
    return Usage(**{name: getattr(a, name) + getattr(b, name) for name in LLM_KINDS.values()})


class RoundUsage:
    """The responses one run of a round was billed for, as its stream reported them."""

    def __init__(self, run: int) -> None:
        self.run = run  # the delivery of the unit of work that asks the model (1 the first time)
        self._responses: list[tuple[str, Usage]] = []  # (provider, billed) per response
        self._begun = False  # the latest response reported its start and has not ended

    def add(self, item: UsageReported | Done) -> None:
        """Count a response that began, or one that ended (with its whole usage)."""
        latest = self._responses[-1] if self._responses else None
        if isinstance(item, Done) and self._begun and latest and latest[0] == item.provider:
            self._responses[-1] = (item.provider, item.usage)  # instead of what it began with
        else:
            self._responses.append((item.provider, item.usage))
        self._begun = isinstance(item, UsageReported)

    @property
    def provider(self) -> str:
        """The provider of the latest response ("" before any)."""
        return self._responses[-1][0] if self._responses else ""

    def total(self) -> Usage:
        """Every response's tokens."""
        total = Usage()
        for _, usage in self._responses:
            total = add_usage(total, usage)
        return total

    def by_provider(self) -> dict[str, Usage]:
        """The tokens per provider."""
        totals: dict[str, Usage] = {}
        for provider, usage in self._responses:
            totals[provider] = add_usage(totals.get(provider, Usage()), usage)
        return totals


def usage_recorded(billed: RoundUsage, *, org_id: str, call_id: str, turn_id: str,
                   id_of: Callable[[str, str], uuid.UUID], causation_id: uuid.UUID | None = None,
                   speculative: bool = False) -> list[UsageRecorded]:
    """``billed`` as ``usage.recorded`` events, one per provider and kind that is not zero.

    ``id_of(provider, kind)`` names each: the same record published again is a duplicate.
    """
    return [UsageRecorded(
        id=id_of(provider, kind), org_id=org_id, call_id=call_id, turn_id=turn_id,
        kind=kind, quantity=float(getattr(usage, name)),  # type: ignore[arg-type]
        unit="tokens", provider=provider, speculative=speculative, causation_id=causation_id)
        for provider, usage in billed.by_provider().items()
        for kind, name in LLM_KINDS.items() if getattr(usage, name)]
