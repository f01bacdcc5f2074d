"""Thinking events, emitted by the brain."""

from __future__ import annotations

from typing import Any

import msgspec

from .envelope import CallEvent


class TurnStarted(CallEvent, frozen=True, kw_only=True, tag="turn.started"):
    """The brain began answering a user turn.

    ``caller_text``: the caller's words as the model was asked with them, when not the turn's
    own text ("" otherwise): a reply speculated on the words as a partial or final had them
    ("How much") was adopted for a turn that ended with them cased or punctuated otherwise
    ("how much"). The conversation's history keeps those words, so the next request begins
    as this one did (the prompt cache's prefix).
    """

    turn_id: str
    provider: str = ""
    caller_text: str = ""


class AgentSay(CallEvent, frozen=True, kw_only=True, tag="agent.say"):
    """One clause for the agent to speak, in order; ``last`` closes the turn's speech.

    ``turn_id`` is the caller's turn it answers. A turn's speech closes with its hand-off
    (``end_call``, ``transfer_call``); if the hand-off fails, what the agent says next in that
    turn is a new utterance, ``<turn_id>.1`` (then ``.2``…), numbered from ``seq`` 0.

    ``filler_after_ms`` > 0: a filler ("One moment."), sent as a round's tools are requested,
    said only if the turn's audio so far has played out and nothing more came for that long
    (the tools are slow); otherwise media skips it. Not part of the conversation's history.
    """

    turn_id: str
    seq: int
    text: str
    last: bool = False
    filler_after_ms: int = 0


class AgentReplyPrepared(CallEvent, frozen=True, kw_only=True, tag="agent.reply_prepared"):
    """The first clause of a reply made before the caller's turn ended, for media to synthesise.

    The brain speculates on the caller's words (``words``) while media waits out the
    endpointing silence. Media synthesises ``text`` ahead and, if turn ``turn_id`` ends with the
    same words, plays it at once and says so in ``turn.user_ended.prepared_text``; the brain then
    answers that turn starting with this clause. Otherwise nothing of it is heard.
    """

    turn_id: str  # the caller's turn it answers (the next one media will end)
    words: str  # the caller's words it answers, normalised (see parley.common.words)
    text: str
    last: bool = False  # the whole reply


class TokenUsage(msgspec.Struct, frozen=True, kw_only=True):
    """LLM tokens spent on a turn (``input_tokens``: those not read from or written to a cache)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


class TurnCompleted(CallEvent, frozen=True, kw_only=True, tag="turn.completed"):
    """The brain finished a turn.

    A turn that hands off (``end_call``, ``transfer_call``) completes at once. If the hand-off
    then fails, the brain takes the turn up again so the caller hears why, and the turn
    completes once more (a second ``turn.completed`` with the same ``turn_id``).

    Every ``turn.started`` is followed by a ``turn.completed``: ``cancelled`` when the caller
    barged in, spoke again or hung up, even if no brain instance was running the turn then
    (published when its unit of work comes back: a redelivery after a crash, or a tool's
    outcome).

    ``usage`` sums the ``usage.recorded`` of the turn's LLM rounds (the rounds tool outcomes
    continued and a cancelled round's included, whichever instance ran them): all of them, or
    for a completion after a failed hand-off, those after it. ``ttft_ms`` and ``llm_wait_ms``
    are the first of those rounds' (what the caller waited for the first words).
    """

    turn_id: str
    provider: str = ""
    model: str = ""
    usage: TokenUsage = msgspec.field(default_factory=TokenUsage)
    ttft_ms: float = 0.0  # the model's time to first token, from its request
    # what the turn itself waited for that token: ttft_ms for a request made at the turn's end,
    # less (often 0) when a preemptive reply started before the caller finished was adopted
    llm_wait_ms: float = 0.0
    duration_ms: float = 0.0
    cancelled: bool = False


class RequestedCall(msgspec.Struct, frozen=True, kw_only=True):
    """One tool call of a model's response (see ``tool.requested``'s ``response_calls``)."""

    tool_call_id: str
    name: str
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)
    arguments_error: str = ""


class ToolRequested(CallEvent, frozen=True, kw_only=True, tag="tool.requested"):
    """The model asked to run a tool.

    ``turn_id`` names the utterance it follows (see ``agent.say``), whose audio the tools
    service lets play before ``end_call`` or ``transfer_call`` acts.

    ``response_calls``: when the model's response called several tools, all of them in order,
    on each of their requests. They are published one after another, so an instance that died
    between two left some unpublished: whoever takes the turn up requests those.
    """

    turn_id: str
    tool_call_id: str
    name: str
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)
    # The arguments the model wrote could not be read (not a JSON object; ``arguments`` is then
    # empty): why, for the model. The tools service fails the call with it, as it does
    # arguments that break the tool's schema, and the model reads it in the next round.
    arguments_error: str = ""
    # The response that asked for it: the model's time to first token and what the turn waited
    # for it (so the completion, perhaps on another instance, reports the turn's first round's).
    ttft_ms: float = 0.0
    llm_wait_ms: float = 0.0
    response_calls: list[RequestedCall] = msgspec.field(default_factory=list)


class IntentDetected(CallEvent, frozen=True, kw_only=True, tag="intent.detected"):
    """The caller's intent, classified from the transcript."""

    turn_id: str
    intent: str
    confidence: float = 1.0


class KnowledgeRetrieved(CallEvent, frozen=True, kw_only=True, tag="knowledge.retrieved"):
    """Knowledge chunks retrieved for a turn."""

    turn_id: str
    query: str
    chunk_ids: list[str] = msgspec.field(default_factory=list)
    scores: list[float] = msgspec.field(default_factory=list)
    latency_ms: float = 0.0
