"""Usage and quota events, emitted by billing and the services that meter."""

from __future__ import annotations

from typing import Literal

from .envelope import CallEvent, OrgEvent


class UsageRecorded(CallEvent, frozen=True, kw_only=True, tag="usage.recorded"):
    """Metered usage of a call, e.g. STT seconds or LLM tokens.

    The brain records the LLM tokens of each round of a turn (``turn_id``, the caller's turn)
    once the round's usage is known, per provider: ``llm_input_tokens`` (billed at the input
    rate: neither read from nor written to the provider's prompt cache),
    ``llm_cache_read_tokens``, ``llm_cache_write_tokens`` and ``llm_output_tokens``, in unit
    ``tokens``. A round cut short (a barge-in, a failure) records what the provider had reported
    by then. A provider that reports usage only as a response ends (an OpenAI-compatible
    server) reports nothing for a response cut short, or one that ended without usage: the
    brain records an estimate instead, marked ``estimated`` (the input from the request's
    characters, the output from the reply's characters received, about four a token); one
    that reports its input as a response begins and its output only as it ends (Anthropic)
    records, for a response cut short, the reported input and an estimate of the output. A round
    asked again (its unit of work redelivered) records its new request too.
    A reply the brain speculated on before the turn ended and then dropped (not adopted) was
    billed too: it is recorded ``speculative``, under the turn it answered if known, and is not
    part of that turn's ``turn.completed`` usage.
    """

    kind: Literal["call_minutes", "stt_seconds", "tts_characters", "llm_input_tokens",
                  "llm_output_tokens", "llm_cache_read_tokens", "llm_cache_write_tokens",
                  "tool_calls", "recording_seconds"]
    quantity: float
    unit: str
    provider: str = ""
    cost_usd: float = 0.0
    turn_id: str = ""  # the caller's turn whose LLM round this is ("" for usage of no turn)
    speculative: bool = False  # a speculative reply for turn_id that no turn adopted
    estimated: bool = False  # the brain's estimate: the provider never reported this usage


class QuotaExceeded(OrgEvent, frozen=True, kw_only=True, tag="quota.exceeded"):
    """An organisation went over a plan limit."""

    kind: str
    limit: float
    used: float
