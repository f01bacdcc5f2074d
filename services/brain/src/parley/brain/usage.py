"""What a turn's LLM rounds were billed: counted from the reply stream, recorded as events.

A round's stream says what each response is billed as it begins (:class:`UsageReported`, from
providers that report it then) and as it ends (:class:`Done`); a response cut short by a
barge-in or a failure has only the first. A provider that learns usage only at the end (an
OpenAI-compatible server) reports an estimate as the response begins: its input, to which the
text and tool calls that come add their output, until the response's :class:`Done` brings the
server's usage instead (a response cut short keeps the estimate). One that reports its input as
it begins and its output only at the end (Anthropic) and is cut short adds an estimate of the
output it had streamed. :class:`RoundUsage` keeps one
entry per response (a fallback or a retry makes several); the worker records them as
``usage.recorded``, one event per provider and kind (estimates apart, marked ``estimated``), for
integrators to bill from and for the fold to sum into the turn's ``turn.completed`` (a turn's
rounds may run on different instances). A speculative reply that
no turn adopted is recorded the same way, marked ``speculative`` (billed, but none of the
turn's rounds).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from parley.brain.llm.base import (
    Done,
    ProviderSwitched,
    TextDelta,
    ToolCall,
    Usage,
    UsageReported,
    estimate_tokens,
)
from parley.brain.llm.router import RouterEvent
from parley.common.events import UsageRecorded

# usage.recorded kind → the Usage field it counts
LLM_KINDS = {"llm_input_tokens": "input_tokens", "llm_cache_read_tokens": "cache_read_tokens",
             "llm_cache_write_tokens": "cache_write_tokens",
             "llm_output_tokens": "output_tokens"}


def add_usage(a: Usage, b: Usage) -> Usage:
    """The tokens of both."""
    return Usage(**{name: getattr(a, name) + getattr(b, name) for name in LLM_KINDS.values()})


@dataclass
class _Response:
    provider: str
    usage: Usage  # what it was billed, as reported or estimated so far
    estimated: bool = False
    output_characters: int = 0  # of its text and tool calls, so far
    ended: bool = False  # its Done came (with the whole usage)

    def unreported_output(self) -> int:
        """Output tokens a reported response cut short made past what it reported (estimated).

        Anthropic reports a response's input as it begins and its output only as it ends: one
        cut short (a barge-in) was billed the words it had written by then.
        """
        if self.estimated or self.ended or not self.output_characters:
            return 0
        return max(estimate_tokens(self.output_characters) - self.usage.output_tokens, 0)


class RoundUsage:
    """The responses one run of a round was billed for, as its stream reported them."""

    def __init__(self, run: int) -> None:
        self.run = run  # the delivery of the unit of work that asks the model (1 the first time)
        self._responses: list[_Response] = []
        self._begun = False  # the latest response reported its start and has not ended

    def add(self, item: RouterEvent) -> None:
        """Count what an item of the stream says a response was billed.

        A response that began (:class:`UsageReported`), one that ended (:class:`Done`, or a
        ``final`` :class:`UsageReported` for an empty reply the router fell back from: its
        whole usage, instead of what it began with), and the text and tool calls of one
        whose usage is an estimate until it ends (not once the router switched provider: what
        comes then is another response's).
        """
        latest = self._responses[-1] if self._responses else None
        if isinstance(item, TextDelta | ToolCall):
            if self._begun and latest is not None:
                latest.output_characters += len(item.text) if isinstance(item, TextDelta) \
                    else len(item.name) + len(json.dumps(item.arguments))
                if latest.estimated:
                    latest.usage = msgspec.structs.replace(
                        latest.usage, output_tokens=estimate_tokens(latest.output_characters))
        elif isinstance(item, ProviderSwitched):
            self._begun = False
        elif isinstance(item, UsageReported | Done):
            ended = isinstance(item, Done) or item.final
            if ended and self._begun and latest and latest.provider == item.provider:
                self._responses[-1] = _Response(item.provider, item.usage, item.estimated,
                                                ended=True)
            else:
                self._responses.append(_Response(item.provider, item.usage, item.estimated,
                                                 ended=ended))
            self._begun = not ended

    @property
    def provider(self) -> str:
        """The provider of the latest response ("" before any)."""
        return self._responses[-1].provider if self._responses else ""

    def total(self) -> Usage:
        """Every response's tokens, estimates included."""
        total = Usage()
        for usage in self.by_provider().values():
            total = add_usage(total, usage)
        return total

    def by_provider(self) -> dict[tuple[str, bool], Usage]:
        """The tokens per provider, estimated (True) apart from reported."""
        totals: dict[tuple[str, bool], Usage] = {}

        def count(key: tuple[str, bool], usage: Usage) -> None:
            totals[key] = add_usage(totals.get(key, Usage()), usage)

        for response in self._responses:
            count((response.provider, response.estimated), response.usage)
            if unreported := response.unreported_output():
                count((response.provider, True), Usage(output_tokens=unreported))
        return totals


def usage_recorded(billed: RoundUsage, *, org_id: str, call_id: str, turn_id: str,
                   id_of: Callable[[str, str, bool], uuid.UUID],
                   causation_id: uuid.UUID | None = None,
                   speculative: bool = False) -> list[UsageRecorded]:
    """``billed`` as ``usage.recorded`` events, one per provider and kind that is not zero.

    ``id_of(provider, kind, estimated)`` names each: the same record published again is a
    duplicate.
    """
    return [UsageRecorded(
        id=id_of(provider, kind, estimated), org_id=org_id, call_id=call_id, turn_id=turn_id,
        kind=kind, quantity=float(getattr(usage, name)),  # type: ignore[arg-type]
        unit="tokens", provider=provider, speculative=speculative, estimated=estimated,
        causation_id=causation_id)
        for (provider, estimated), usage in billed.by_provider().items()
        for kind, name in LLM_KINDS.items() if getattr(usage, name)]
