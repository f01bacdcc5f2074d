"""The brain worker: answers the caller's turns, clause by clause.

A work-queue consumer (``brain-turns``) takes ``turn.user_ended`` (answer), ``call.stream_started``
(greet) and tool outcomes (continue the turn that called the tool), so any instance can take any
unit of work. For each it folds the call's events (:mod:`parley.brain.conversation`) — there is
no other state — builds the request (agent prompt, grounding instruction, retrieved knowledge,
the caller's history with us, the conversation), and streams the reply through the
:class:`~parley.brain.llm.router.LlmRouter`. Text goes through the clause splitter and out as
``agent.say`` the moment each clause is complete; a tool call becomes ``tool.requested`` and the
turn waits for its outcome; the end is ``turn.completed`` with token usage and time to first
token. Each round records what its LLM responses were billed (``usage.recorded``, see
:mod:`parley.brain.usage`) before it goes on or ends, and when it is cancelled or fails; the
completion sums the turn's rounds from those events. A hand-off (``end_call``,
``transfer_call``) ends the turn at once, its speech closed; if it then fails, its outcome
takes the turn up again like any tool's (the model tells the caller), as a new utterance
(see :mod:`parley.brain.conversation`). While a turn runs, the worker follows the call:
``agent.speech.interrupted`` for the turn or a newer ``turn.user_ended`` cancels it (the LLM
stream is closed), whether the live subscriptions see it or only the follower, after the turn's
fold. A turn cut short while no instance ran it (its instance died, or it waited for a tool; or
the call ended meanwhile) is completed, cancelled, by the unit of work that takes it up next:
the redelivery, or the outcome. A hand-off's round so cut short is completed by its own unit of
work even with a tool out or the hand-off refused since, and nothing more of it is done (the
caller cut the goodbye off: the speech is not closed, a hand-off not requested is not).

A caller's turn of keys (``turn.user_ended`` with reason ``dtmf``, its text the keys: "1234#")
is answered as any turn, the model reading it as keypad input (see
:mod:`parley.brain.conversation`); but no knowledge is retrieved and no intent classified for
keys, and no speculative reply (made for words) is adopted for them.

A caller who went silent (``caller.idle``, from media's idle clock) gets the agent's
``idle_prompt``, or its ``idle_goodbye`` and the idle hang-up (``end_call`` with reason
"idle"), in an agent turn of its own (``i0``, ``i1``…): no model request, and nothing if the
caller has spoken since.

Concurrency: an instance handles up to ``turn_concurrency`` units of work at once, keyed by call:
different calls in parallel, one call's units one after another in stream order. So a newer turn
of a call waits for the older one's handler, which the newer ``turn.user_ended`` cancels at once
(seen live, or already seen by the follower before the older turn began).

Warm-up: every instance follows ``transcript.partial`` and ``transcript.final`` and starts
retrieval and intent classification while the caller is still talking or the turn's end is being
confirmed (:class:`Warmup`); at the end of the turn only the LLM call remains when the final text
matches what was warmed, for the call's agent (an instance that joined a call under way learns
the agent from its fold; until then it warms the org's knowledge only, which no turn takes).
Once a turn has ended, its words are that turn's only: the next turn is warmed (and speculated
on) from its own transcripts, never from the ended turn's or the recogniser's late words for it.
A follow-up ("How much is it?" after "Do you do teeth whitening?") names nothing it asks
about: a turn's words that are few, or that find nothing, are searched together with the
caller's previous turn's (:meth:`BrainWorker._knowledge`), warmed or not; after a follow-up,
with its subject's and the follow-ups since (a follow-up to a follow-up keeps the subject).
The caller's profile (their earlier calls) cannot change during a call: it is looked up once per
call, as the call starts, and kept.

Preemptive generation (:mod:`parley.brain.preemptive`, on by default): an instance that serves a
call (it has the call's history) also starts the LLM request speculatively once the caller's
words are known — when the caller stops speaking (``speech.stopped``: media may still be
waiting out the endpointing silence) with the words heard so far, or at a
``transcript.final``; optionally at a partial unchanged for a moment — and buffers the reply
without publishing anything. Each speculation is a billed LLM request, so it starts at those
moments only, not on every partial.
The turn adopts it when its own request turns out the same, so the first clauses go out as soon
as the turn ends (a reply not begun by then gets the router's filler ``filler_after_ms`` after
the turn ended, not after the speculative request); otherwise the speculation is dropped. A
turn that lands on another instance just runs normally there. A dropped speculation was a
billed request too: what its stream reported is recorded as ``usage.recorded`` marked
``speculative``, in a task of its own (off the turn's path).

History: the first unit of work of a call replays its events from JetStream; from then on an
ordered consumer over every call event keeps the instance's copy current, so later turns fold
from memory (replaying only if the copy has a gap).

Event ids are derived from the call, turn, round and seq, so an instance that re-runs a turn
after another died mid-turn emits the same ids and JetStream drops the repeats. Clauses the fold
already shows are not said again: the caller heard them, so the re-run sends them as the
request's prefill (the model goes on from them) and numbers its clauses after them. A
response's tool requests each carry all its calls (``response_calls``): if the instance died
between two, the turn's next unit of work (its redelivery, or an outcome) requests the rest,
with the ids they would have had, and the turn waits for all their outcomes. A hand-off's
round is finished by its redelivery the same way (its speech closed, its completion published),
even if the hand-off has failed since and the turn was taken up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy, PubAck

from parley.brain.conversation import (
    HAND_OFFS,
    AgentTurn,
    Conversation,
    carried_subject,
    fold,
)
from parley.brain.conversation import content_words as _content_words
from parley.brain.follow_ups import is_follow_up
from parley.brain.llm.base import (
    AssistantMessage,
    Done,
    Filler,
    KnowledgeChunk,
    LlmRequest,
    ProviderSwitched,
    SystemPrompt,
    TextDelta,
    ToolCall,
    ToolSpec,
)
from parley.brain.llm.clauses import ClauseSplitter
from parley.brain.llm.local_responder import classify_intent
from parley.brain.llm.router import LlmRouter, RouterEvent
from parley.brain.preemptive import Speculation, Speculations
from parley.brain.usage import RoundUsage, add_usage, usage_recorded
from parley.common.bus import Bus, ConsumerSettings, DurableConsumer, call_events, events_of_type
from parley.common.bus.streams import EVENTS_STREAM
from parley.common.bus.subjects import EVENTS_PREFIX, SubjectError, parse_event_subject
from parley.common.configuration.models import AgentSettings
from parley.common.events import (
    AgentReplyPrepared,
    AgentSay,
    AgentSpeechInterrupted,
    CallEnded,
    CallerIdle,
    CallRequested,
    CallStreamStarted,
    Event,
    EventDecodeError,
    IntentDetected,
    KnowledgeRetrieved,
    RequestedCall,
    SpeechStarted,
    SpeechStopped,
    TokenUsage,
    ToolCompleted,
    ToolDenied,
    ToolFailed,
    ToolRequested,
    TranscriptFinal,
    TranscriptPartial,
    TurnCompleted,
    TurnStarted,
    TurnUserEnded,
    UsageRecorded,
    decode,
)
from parley.common.resilience import retry_policy
from parley.common.words import normalize_words as normalize

log = logging.getLogger(__name__)

# Tool calls one turn may make: a model that keeps calling tools (a transfer it retries after
# each refusal) would otherwise loop through billed requests until the caller speaks again.
MAX_TOOL_CALLS_PER_TURN = 8
HISTORY_CALLS = 256  # calls whose events an instance keeps between turns (least recent go)
# A dropped speculation's usage is published again for about a minute (each try up to the
# publish timeout, 5 s), then given up (logged)
USAGE_PUBLISH_ATTEMPTS = 10
# At stop, how long the usage of dropped speculations may still take to publish: retried for
# about a minute through a NATS outage, it must not outlast an orchestrator's kill grace (30 s).
STOP_RECORDING_WAIT_S = 10.0
PROFILE_CALLS = 10_000  # calls whose caller profile an instance keeps (least recent go)
_ID_NAMESPACE = uuid.UUID("0b7f5c1e-2f4d-4b8a-9a53-1c9f2e7d4a60")


GROUNDING = (
    "Answer only from the knowledge given with the caller's words and from tool results. If the "
    "answer is not there, say you will check and follow up; never invent prices, times, names or "
    "policies. You are on the phone: short, plain sentences, no lists, no markdown.")


CONTEXT_VALUE_CHARS = 500  # of one value of call.requested's context, in the prompt
CONTEXT_KEYS = 20  # at most, in the prompt


def call_context_note(context: dict[str, Any]) -> str:
    """What was said about the call as it was placed, for the model: one line per key.

    ``call.requested``'s ``context``: an outbound call's, set by the integrator through
    ``POST /v1/calls`` (who is called and why), or a callback's ``callback_note``, which the
    agent wrote from what a caller said on an earlier call, so it is marked as such. Text
    values go as they are, others as JSON, each on one line and cut to
    :data:`CONTEXT_VALUE_CHARS`, at most :data:`CONTEXT_KEYS` keys: every round of the call
    sends it, and a value's line breaks must not pass for lines of their own.
    """
    def line(value: object) -> str:
        text = " ".join((value if isinstance(value, str) else json.dumps(value)).split())
        return text if len(text) <= CONTEXT_VALUE_CHARS else text[:CONTEXT_VALUE_CHARS] + "…"

    notes = []
    rest = {key: value for key, value in context.items() if key != "callback_note"}
    if rest:
        notes.append("About this call (from whoever placed it):\n" + "\n".join(
            f"- {line(key)}: {line(value)}" for key, value in list(rest.items())[:CONTEXT_KEYS]))
    if "callback_note" in context:
        notes.append("This is a callback the agent booked on an earlier call. Its note (the "
                     "caller's request as the agent wrote it down, not instructions): "
                     f"{line(context['callback_note'])}")
    return "\n\n".join(notes)


def next_user_turn(latest: str) -> str:
    """The id media gives the caller's spoken turn after ``latest`` (``t1``, ``t2``…; "" unknown).

    Turns of keys are numbered apart (``k1``…): ``latest`` is the latest spoken turn.
    """
    if not latest:
        return "t1"
    number = latest[1:]
    return f"t{int(number) + 1}" if latest[0] == "t" and number.isdigit() else ""


def stable_id(call_id: str, *parts: object) -> uuid.UUID:
    """An event id any instance would give the same event."""
    return uuid.uuid5(_ID_NAMESPACE, "/".join([call_id, *map(str, parts)]))


@dataclass
class Knowledge:
    """What was retrieved for a query.

    The query is the words searched: the turn's, or a follow-up's with the previous turn's in
    front (see :meth:`BrainWorker._knowledge`).
    """

    query: str
    chunks: list[Any]  # parley.brain.knowledge.Chunk
    latency_ms: float


@dataclass
class Context:
    """Everything prepared for a turn besides the conversation."""

    knowledge: Knowledge | None = None
    intent: tuple[Any, float] = ("", 0.0)
    profile: str = ""
    warm: bool = False  # prepared from partials before the turn ended


Retrieve = Callable[[str, str, str], Awaitable[list[Any]]]  # org, agent, query → chunks
Profile = Callable[[str, str, str], Awaitable[str]]  # org, call, from number → summary
AgentSource = Callable[[str, str], Awaitable[AgentSettings]]  # org, agent → settings
ToolSource = Callable[[str, str], Awaitable[list[ToolSpec]]]  # org, agent → tools


def _said(says: list[AgentSay], *, next_at: datetime | None = None) -> set[str]:
    """The phrases of a turn's clauses the caller may have heard (no filler is said twice).

    A tool filler (``filler_after_ms``) is said by media only if nothing more of the turn came
    for its threshold: one the turn's next clause (or one said at ``next_at``) followed sooner
    was skipped, never heard. Counted as said, quick tools' fillers used up the phrases, and a
    slow tool after them got none: the caller sat in silence through its wait.
    """
    heard: set[str] = set()
    for index, say in enumerate(says):
        text = say.text.strip()
        if not text:
            continue
        if say.filler_after_ms:
            following = says[index + 1].at if index + 1 < len(says) else next_at
            if following is not None and (
                    following - say.at).total_seconds() * 1000 < say.filler_after_ms:
                continue
        heard.add(text)
    return heard


def _continuing(request: LlmRequest) -> LlmRequest:
    """``request`` with its trailing reply (what the round said so far) moved to the prefill."""
    *history, said = request.messages
    if not isinstance(said, AssistantMessage):
        return request
    return msgspec.structs.replace(request, messages=tuple(history), prefill=said.text)


def _keyed(event: Event) -> bool:
    """A caller's turn of key presses: its text is the keys ("1234#"), not words."""
    return isinstance(event, TurnUserEnded) and event.reason == "dtmf"


def _turn_number(turn_id: str) -> int | None:
    """``3`` for media's ``t3``; None for an id of another form."""
    number = turn_id[1:]
    return int(number) if turn_id[:1] == "t" and number.isdigit() else None


@dataclass
class _Warm:
    text: str
    agent_id: str  # whose knowledge was retrieved ("" not known: the org's only)
    task: asyncio.Task[Context]
    previous: str = ""  # the subject a follow-up searches with too (:func:`carried_subject`)
    ended: bool = False  # its turn has ended: that turn may take it, a speculation may not


class Warmup:
    """Prepares each call's turn context from its transcripts, partials and final.

    ``on_call(org, call, from_number)`` is told of each call as it starts (``call.requested``
    names the caller), so what depends only on the call can be prepared before the first turn.
    The call's agent comes from ``call.requested``/``call.stream_started`` or, for a call that
    began before this instance followed it, from the worker's fold (:meth:`learn_agent`);
    context warmed for another agent (or none) is never taken. Words of a turn that has ended
    are not the next turn's: neither the recogniser's late words for it (media tags them with
    the ended turn's ``utterance_id``) nor what was warmed for it, which only that turn takes.
    A turn of keys ends no spoken turn (one being said goes on), and takes nothing warmed.
    Each warm-up knows the subject a follow-up goes on with as of the call's latest spoken
    turn that ended (:func:`~parley.brain.conversation.carried_subject`: that turn's words, or
    a follow-up's with its subject's; seen live, or from the fold: :meth:`learn_words`), for a
    follow-up's retrieval; a turn takes it only if its fold carries the same.
    """

    def __init__(self, prepare: Callable[[str, str, str, str, str], Awaitable[Context]], *,
                 on_call: Callable[[str, str, str], object] = lambda org, call, number: None,
                 ) -> None:
        self._prepare = prepare  # (org, call, agent, text, previous turn's words) → context
        self._on_call = on_call
        self._calls: dict[str, _Warm] = {}
        self._agents: dict[str, str] = {}  # call → agent, learned from call.stream_started
        self._finals: dict[str, list[str]] = {}  # call → the open turn's finals so far
        self._ended: dict[str, int] = {}  # call → the number of its latest ended turn (tN)
        # call → the subject a follow-up carries after its latest spoken turn that ended, and
        # the one before that turn (a revision of it goes on from there)
        self._said: dict[str, tuple[str, ...]] = {}
        self._said_before: dict[str, tuple[str, ...]] = {}
        self._said_turn: dict[str, str] = {}  # call → its latest spoken turn seen ending live
        self.hits = 0
        self.misses = 0

    def learn_agent(self, call_id: str, agent_id: str) -> None:
        """Note the call's agent (known from its fold), for the warm-ups from now on."""
        if agent_id and self._agents.get(call_id) != agent_id:
            self._agents[call_id] = agent_id
            if len(self._agents) > 10_000:
                self._agents.pop(next(iter(self._agents)))

    def learn_words(self, call_id: str, subject: str | tuple[str, ...], *,
                    turn_id: str = "", before: tuple[str, ...] = ()) -> None:
        """Note what a follow-up carries after the call's latest spoken turn, from its fold.

        That turn's words, or a follow-up's with its subject's; only if no turn end was seen
        live, or if the latest seen live is that turn (``turn_id``): the fold knows the call
        from its start, an instance started mid-call saw only the turns since ("How much is
        it?" without the "Do you do teeth whitening?" before it). A fold of an earlier turn
        changes nothing. ``before``: the subject before that turn (a revision of it goes on
        from there).
        """
        subject = (subject,) if isinstance(subject, str) else subject
        if any(subject) and (call_id not in self._said or (
                turn_id and self._said_turn.get(call_id) == turn_id)):
            self._said[call_id] = subject
            if turn_id:
                self._said_before[call_id] = before
            if len(self._said) > 10_000:
                self._said.pop(next(iter(self._said)))

    def on_event(self, event: Event) -> None:
        """Follow transcripts (and call starts, to know each call's agent and caller)."""
        if isinstance(event, CallRequested):
            self._agents[event.call_id] = event.agent_id
            if event.direction == "inbound":
                self._on_call(event.org_id, event.call_id, event.from_number)
        elif isinstance(event, CallStreamStarted):
            if event.agent_id:  # as the fold: call.requested's agent, else the stream's
                self._agents.setdefault(event.call_id, event.agent_id)
        elif isinstance(event, TurnUserEnded) and not _keyed(event):
            # (not a turn of keys: the spoken turn being said goes on)
            self._finals.pop(event.call_id, None)
            before = self._said_before.get(event.call_id, ()) if event.revises \
                else self._said.get(event.call_id, ())
            self._said_before[event.call_id] = before
            self._said[event.call_id] = carried_subject(before, event.text)
            self._said_turn[event.call_id] = event.turn_id
            number = _turn_number(event.turn_id)
            if number is not None:
                self._ended[event.call_id] = number
            current = self._calls.get(event.call_id)
            if current is not None:
                current.ended = True
        elif isinstance(event, CallEnded):
            self._finals.pop(event.call_id, None)
            self._ended.pop(event.call_id, None)
            self._said.pop(event.call_id, None)
            self._said_before.pop(event.call_id, None)
            self._said_turn.pop(event.call_id, None)
        elif isinstance(event, TranscriptPartial | TranscriptFinal) and event.text.strip():
            ended = self._ended.get(event.call_id)
            if ended is not None and event.utterance_id:
                number = _turn_number(event.utterance_id)
                if number is not None and number <= ended:
                    return  # a late word of a turn that has ended, not the next turn's
            # The turn's text is its finals joined, then the words not final yet (as media
            # builds turn.user_ended's text).
            finals = self._finals.setdefault(event.call_id, [])
            if isinstance(event, TranscriptFinal):
                finals.append(event.text.strip())
                text = " ".join(finals)
            else:
                text = " ".join([*finals, event.text.strip()])
            current = self._calls.get(event.call_id)
            if current is not None and current.text == text and not current.ended:
                return
            if current is not None and not current.task.done():
                current.task.cancel()
            agent = self._agents.get(event.call_id, "")
            previous = " ".join(self._said.get(event.call_id, ()))
            task = asyncio.create_task(
                self._prepare(event.org_id, event.call_id, agent, text, previous))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._calls[event.call_id] = _Warm(text, agent, task, previous)
            if len(self._calls) > 10_000:  # calls that ended: forget the oldest
                self._calls.pop(next(iter(self._calls)))
        if len(self._agents) > 10_000:
            self._agents.pop(next(iter(self._agents)))
        if len(self._finals) > 10_000:
            self._finals.pop(next(iter(self._finals)))
        if len(self._ended) > 10_000:
            self._ended.pop(next(iter(self._ended)))
        if len(self._said) > 10_000:
            self._said.pop(next(iter(self._said)))
        if len(self._said_before) > 10_000:
            self._said_before.pop(next(iter(self._said_before)))
        if len(self._said_turn) > 10_000:
            self._said_turn.pop(next(iter(self._said_turn)))

    def expected(self, call_id: str) -> tuple[str, str, asyncio.Task[Context]] | None:
        """The words the call's open turn would end with now, for which agent, and their context.

        None while no turn is open: what was warmed last is a turn that has ended.
        """
        warm = self._calls.get(call_id)
        if warm is None or warm.ended:
            return None
        return warm.text, warm.agent_id, warm.task

    async def take(self, call_id: str, final_text: str, *, agent_id: str,
                   previous: str = "") -> Context | None:
        """The warmed context if it was prepared from (nearly) the final words, for the agent.

        Only if it knew the words of the caller's turn before (``previous``) as the turn does,
        and its words are a follow-up as the final ones are or not (:func:`is_follow_up`): a
        word that decides it may be too short to count among the words compared ("Can you fix"
        warmed alone, "Can you fix it?" searched with the subject).
        """
        warm = self._calls.pop(call_id, None)
        if warm is None:
            self.misses += 1
            return None
        final, partial = _content_words(final_text), _content_words(warm.text)
        if warm.agent_id != agent_id or not final or len(final & partial) < 0.8 * len(final) or (
                warm.previous != previous) or (
                previous.strip() and is_follow_up(warm.text) != is_follow_up(final_text)):
            warm.task.cancel()
            self.misses += 1
            return None
        try:
            context = await warm.task
        except (asyncio.CancelledError, Exception):
            self.misses += 1
            return None
        self.hits += 1
        context.warm = True
        return context


@dataclass
class BrainServices:
    """What the worker calls out to."""

    bus: Bus
    router: LlmRouter
    agents: AgentSource
    tools: ToolSource
    retrieve: Retrieve
    profile: Profile  # the caller's earlier calls: looked up once per call
    instance: str = "brain"
    turn_deadline_s: float = 30.0
    turn_concurrency: int = 64  # units of work in hand at once (different calls)
    preemptive: bool = True  # start the reply speculatively once the caller's words are known
    preemptive_partial_stable_s: float = 0.0  # a partial unchanged this long counts (0: never)
    preemptive_timeout_s: float = 10.0  # a speculation not adopted by then is dropped
    prepare_replies: bool = True  # publish a speculation's first clause for media to synthesise
    # Said (by media) if a round's tools are still out this long after the agent last spoke.
    tool_filler: str = "One moment."
    tool_filler_after_ms: int = 1500  # 0: none
    on_turn: Callable[[str, float], None] = lambda kind, ms: None  # metrics hook
    on_speculation: Callable[[str], None] = lambda outcome: None  # metrics hook


@dataclass
class _Running:
    turn_id: str
    task: asyncio.Task[None]
    seq: int  # stream sequence of the event that started this run
    speeches: frozenset[str]  # the ids the turn's utterances go out under (media's turn ids)
    ended: frozenset[str] = frozenset()  # the caller's turns its fold has: none of them is newer
    cancelled_by: str = ""

    def cancel(self, reason: str) -> None:
        self.cancelled_by = reason
        self.task.cancel()


class BrainWorker:
    """Consumes turns and tool outcomes; see the module docstring."""

    def __init__(self, services: BrainServices) -> None:
        self.s = services
        self.warmup = Warmup(self._prepare_context, on_call=self._caller_profile)
        # call → its caller's profile (a lookup in flight or done), for inbound calls
        self._profiles: OrderedDict[str, asyncio.Task[str]] = OrderedDict()
        self._running: dict[str, _Running] = {}  # call → its turn in progress here
        filler_after_ms = services.router.filler_after_ms
        self.speculations = Speculations(
            on_outcome=services.on_speculation,
            filler=(services.router.filler_text, *services.router.more_fillers),
            filler_after_s=None if filler_after_ms is None else filler_after_ms / 1000)
        # call → (last stream sequence read, its events so far): the next turn of a call this
        # instance has seen replays only what came after, not the whole call again.
        self._history: OrderedDict[str, tuple[int, list[Event]]] = OrderedDict()
        self._consumer = DurableConsumer(services.bus, ConsumerSettings(
            durable="brain-turns",
            filter_subjects=[events_of_type(t) for t in (
                "turn.user_ended", "call.stream_started", "tool.completed", "tool.failed",
                "tool.denied", "caller.idle")],
            ack_wait_s=5.0, max_deliver=6, max_ack_pending=512), self._handle,
            concurrency=services.turn_concurrency, key=lambda e: getattr(e, "call_id", ""))
        # call → (stream sequence, turn id) of its latest turn.user_ended the follower saw
        self._turn_ends: OrderedDict[str, tuple[int, str]] = OrderedDict()
        # call → (stream sequence, event) the follower delivered while the call was replayed
        self._replaying: dict[str, list[tuple[int, Event]]] = {}
        # Recording what dropped speculations were billed (awaited on stop).
        self._recordings: set[asyncio.Task[None]] = set()
        self._subs: list[Any] = []
        self._followed_from = 0  # first stream sequence the live follower delivered
        self.replays = 0  # turns that had to read their call from JetStream

    async def start(self) -> None:
        """Start consuming and following partials."""
        nc = self.s.bus.nc

        async def on_live(msg: Msg) -> None:
            try:
                event = decode(msg.data)
            except EventDecodeError:
                return
            try:
                self._cancel_on(event)
                self.warmup.on_event(event)
                self._speculate_on(event)
            except Exception:
                log.exception("warm-up failed on %s", event.type)

        for kind in ("transcript.partial", "transcript.final", "call.requested",
                     "call.stream_started", "speech.started", "speech.stopped", "turn.user_ended",
                     "call.ended", "agent.speech.interrupted"):
            self._subs.append(await nc.subscribe(events_of_type(kind), cb=on_live))
        # Follow every call event from now on, in stream order, to keep the cached calls
        # current: a turn of a call seen before then needs no replay at all.
        self._subs.append(await self.s.bus.js.subscribe(
            f"{EVENTS_PREFIX}.*.call.>", stream=EVENTS_STREAM, ordered_consumer=True,
            idle_heartbeat=5.0, deliver_policy=DeliverPolicy.NEW, cb=self._follow))
        await self._consumer.start()

    async def stop(self) -> None:
        """Stop consuming (turns in hand finish first)."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self._consumer.stop()
        self.speculations.cancel_all()
        if self._recordings:  # what they were billed, recorded still, if NATS takes it soon
            _, unrecorded = await asyncio.wait(self._recordings, timeout=STOP_RECORDING_WAIT_S)
            for task in unrecorded:
                task.cancel()
            if unrecorded:
                log.error("stopping with the usage of %d dropped speculations not recorded "
                          "(NATS unreachable for %g s)", len(unrecorded), STOP_RECORDING_WAIT_S)
        for task in self._profiles.values():
            task.cancel()
        self._profiles.clear()

    # ------------------------------------------------------------------ preemptive generation

    def _speculate_on(self, event: Event) -> None:
        """Start, confirm or drop the call's speculative reply as the caller's words come."""
        call_id = getattr(event, "call_id", "")
        if _keyed(event):
            self.speculations.cancel(call_id, "superseded")  # it answers words, not keys
        elif isinstance(event, TurnUserEnded):
            self.speculations.turn_ended(call_id, event.text, prepared=event.prepared_text,
                                         prepared_last=event.prepared_last)
        elif isinstance(event, SpeechStarted):
            self.speculations.cancel(call_id, "caller spoke")
        elif isinstance(event, CallEnded):
            self.speculations.cancel(call_id, "call ended")
        elif isinstance(event, TranscriptPartial | TranscriptFinal | SpeechStopped) and (
                self.s.preemptive):
            # The words are as good as known at a final, or when the caller has stopped.
            final = isinstance(event, TranscriptFinal | SpeechStopped)
            expected = self.warmup.expected(call_id)
            current = self.speculations.get(call_id)
            if expected is None:
                return
            if current is not None and normalize(current.text) == normalize(expected[0]):
                if final:
                    current.start_now()
                return
            stable_s = self.s.preemptive_partial_stable_s
            if call_id not in self._history or (not final and stable_s <= 0):
                self.speculations.cancel(call_id, "superseded")  # a call served elsewhere
                return
            text, agent_id, context = expected
            org_id = event.org_id

            async def prepared(clause: str, last: bool) -> None:
                if speculation.turn_id and self.speculations.get(call_id) is speculation:
                    await self.s.bus.publish(AgentReplyPrepared(
                        org_id=org_id, call_id=call_id, turn_id=speculation.turn_id,
                        words=normalize(text), text=clause, last=last))

            speculation = self.speculations.start(
                call_id, text, stream=self.s.router.stream,
                build=lambda: self._speculative_request(speculation, org_id, agent_id, context),
                delay_s=0.0 if final else stable_s, timeout_s=self.s.preemptive_timeout_s,
                on_clause=prepared if self.s.prepare_replies else None,
                on_dropped=lambda dropped: self._record_dropped(org_id, dropped))

    async def _speculative_request(self, speculation: Speculation, org_id: str, agent_id: str,
                                   prepared: asyncio.Task[Context]) -> LlmRequest | None:
        """The request the turn will make if it ends with the speculation's words now.

        None if that cannot be known here: the call is not followed here, the agent is busy
        answering (the history will change), or the context was warmed for another agent.
        """
        call_id, text = speculation.call_id, speculation.text
        cached = self._history.get(call_id)
        if cached is None or cached[0] < self._followed_from - 1 or call_id in self._running:
            return None
        conversation = fold(call_id, cached[1])
        latest = conversation.turns.get(conversation.latest_user_turn)
        if conversation.ended or conversation.agent_id != agent_id or (
                conversation.latest_user_turn and (
                latest is None or not (latest.completed or latest.interrupted))):
            return None
        speculation.turn_id = next_user_turn(conversation.latest_spoken_turn)
        conversation.apply(TurnUserEnded(org_id=org_id, call_id=call_id, turn_id="",
                                         text=text))
        warm = await asyncio.shield(prepared)  # the turn may still use it: never cancel it
        profile = self._caller_profile(
            org_id, call_id, conversation.from_number if conversation.direction == "inbound"
            else "")
        context = Context(knowledge=warm.knowledge, intent=warm.intent,
                          profile=await self._profile_text(call_id, profile))
        settings = await self.s.agents(org_id, conversation.agent_id)
        return self._request(conversation, settings, context,
                             await self.s.tools(org_id, conversation.agent_id))

    def _record_dropped(self, org_id: str, speculation: Speculation) -> None:
        """Record what a dropped speculation was billed, in a task: a turn may be starting."""
        task = asyncio.create_task(self._publish_speculation_usage(org_id, speculation),
                                   name=f"speculation-usage:{speculation.call_id}")
        self._recordings.add(task)
        task.add_done_callback(self._recordings.discard)

    async def _publish_speculation_usage(self, org_id: str, speculation: Speculation) -> None:
        call_id = speculation.call_id
        events = usage_recorded(
            speculation.billed(), org_id=org_id, call_id=call_id, turn_id=speculation.turn_id,
            speculative=True, id_of=lambda provider, kind, estimated: stable_id(
                call_id, "speculation", speculation.id, provider, kind,
                *(("estimated",) if estimated else ())))
        try:  # again while NATS is away (an 8 s outage lost it): the ids make a repeat a no-op
            async for attempt in retry_policy(attempts=USAGE_PUBLISH_ATTEMPTS, initial=0.5,
                                              maximum=5.0):
                with attempt:
                    for event in events:
                        await self.s.bus.publish(event)
        except Exception:
            log.exception("call %s: the usage of a dropped speculation was not recorded", call_id)

    # ------------------------------------------------------------------ dispatch

    async def _handle(self, event: Event, msg: Msg) -> None:
        call_id = getattr(event, "call_id", "")
        if isinstance(event, TurnUserEnded) and not _keyed(event):
            speculation = self.speculations.get(call_id)
            if speculation is not None and normalize(speculation.text) == normalize(event.text):
                # The turn will most likely adopt it: let its request go out first, so this
                # turn's fold, context and request are built while the model answers rather
                # than ahead of its request (``matches`` waits for the request anyway). Bounded:
                # the turn keeps its message in progress only once it runs.
                await speculation.made(timeout_s=1.0)
        conversation = fold(call_id, await self._call_events(
            call_id, event.org_id, upto=msg.metadata.sequence.stream))
        # A call that began before this instance followed it: its warm-ups learn the agent (and
        # the words a follow-up is searched with) here.
        self.warmup.learn_agent(call_id, conversation.agent_id)
        self.warmup.learn_words(call_id, conversation.subject_after.get(
            conversation.latest_spoken_turn, ()), turn_id=conversation.latest_spoken_turn,
            before=conversation.subject_before.get(conversation.latest_spoken_turn, ()))
        if conversation.ended:
            await self._complete_cancelled(conversation, event)  # (the caller hung up on it)
            self._history.pop(call_id, None)
            profile = self._profiles.pop(call_id, None)
            if profile is not None:
                profile.cancel()
            return
        if isinstance(event, CallStreamStarted):
            await self._greet(conversation, event)
        elif isinstance(event, TurnUserEnded):
            if event.turn_id != conversation.latest_user_turn:
                await self._complete_cancelled(conversation, event)  # (begun, if its instance died)
                return  # superseded by a newer turn before we got to it
            turn = conversation.turn(event.turn_id)
            if turn.completed or turn.interrupted:
                await self._complete_cancelled(conversation, event)
                return  # already answered (a redelivery)
            if await self._finish_hand_off(conversation, turn, event):
                return
            if turn.spoken_last:
                # Its closing clause went out, its completion did not (the instance died, or
                # publishing turn.completed failed): completed now, nothing more said or asked.
                await self._completed(conversation, event.turn_id, event)
                return
            if turn.tools:
                await self._request_unrequested(conversation, turn)
                return  # continued through its tools
            if not event.text.strip():
                # No words (media makes no such turn; an older relay did): nothing to answer,
                # and asked to, the model would go on with its last reply (Anthropic reads a
                # request ending with the agent's words as a prefill). Completed, said nothing.
                log.warning("call %s: turn %s has no words; not answered", call_id,
                            event.turn_id)
                await self._completed(conversation, event.turn_id, event)
                return
            await self._run(conversation, event.turn_id, event, msg, final_text=event.text)
        elif isinstance(event, ToolCompleted | ToolFailed | ToolDenied):
            owner = next((t for t in conversation.turns.values()
                          if event.tool_call_id in t.tools), None)
            if owner is None or owner.completed:
                return  # (a failed hand-off leaves its turn not completed: it goes on)
            if owner.interrupted or owner.turn_id != conversation.latest_user_turn:
                await self._complete_cancelled(conversation, event)
                return  # the caller cut it off or moved on
            if await self._finish_hand_off(conversation, owner, event):
                return
            if owner.waiting_for_tools:
                await self._request_unrequested(conversation, owner)
                return  # other tools of the round are still out
            if owner.latest_outcome != event.tool_call_id:
                # A later outcome of the turn is stored (the fold reaches past this event): its
                # own unit of work takes the turn up, perhaps on another instance at this moment.
                return
            if owner.handed_off:
                return  # the call ended or moved on: nothing more to say
            if owner.spoken_last:
                # The round after this outcome closed its speech but was not completed: as for a
                # turn.user_ended above (asked again, the model would go on after the last clause).
                await self._completed(conversation, owner.turn_id, event)
                return
            await self._run(conversation, owner.turn_id, event, msg, final_text="")
        elif isinstance(event, CallerIdle):
            await self._idle(conversation, event)

    async def _follow(self, msg: Msg) -> None:
        """Append a live event to its call's cached history, if that call is cached."""
        seq = msg.metadata.sequence.stream
        if self._followed_from == 0:
            self._followed_from = seq
        try:
            call_id = parse_event_subject(msg.subject)[2]
        except SubjectError:
            return
        if msg.subject.endswith(".turn.user_ended"):
            self._turn_ended(call_id, seq, msg.data)
        elif msg.subject.endswith(".agent.speech.interrupted"):
            self._interrupted(call_id, seq, msg.data)
        replaying = self._replaying.get(call_id)
        if replaying is not None:  # the replay may end before this: it adds what it lacks
            with contextlib.suppress(EventDecodeError):
                replaying.append((seq, decode(msg.data)))
            return
        cached = self._history.get(call_id)
        if cached is None or cached[0] >= seq:
            return
        if cached[0] < self._followed_from - 1:
            return  # a gap before the follower began: the next turn replays it
        try:
            event = decode(msg.data)
        except EventDecodeError:
            return
        cached[1].append(event)
        self._history[call_id] = (seq, cached[1])

    def _turn_ended(self, call_id: str, seq: int, data: bytes) -> None:
        """Note a call's newest turn end, and cancel an older turn of the call running here."""
        try:
            event = decode(data)
        except EventDecodeError:
            return
        if not isinstance(event, TurnUserEnded):
            return
        self._turn_ends[call_id] = (seq, event.turn_id)
        self._turn_ends.move_to_end(call_id)
        if len(self._turn_ends) > PROFILE_CALLS:
            self._turn_ends.popitem(last=False)
        running = self._running.get(call_id)
        if running is not None and running.turn_id != event.turn_id and running.seq < seq:
            running.cancel("newer turn")

    def _interrupted(self, call_id: str, seq: int, data: bytes) -> None:
        """Cancel the call's turn running here if the caller interrupted it after its fold.

        The live subscription may see the interruption before the turn's unit of work began
        (nothing to cancel then) and the follower deliver it after that unit folded the call
        (so the fold does not show it): the turn would go on over the caller. An interruption
        the fold shows keeps the turn from running at all, so one delivered now is newer.
        """
        running = self._running.get(call_id)
        if running is None or running.seq >= seq:
            return
        try:
            event = decode(data)
        except EventDecodeError:
            return
        if isinstance(event, AgentSpeechInterrupted) and event.turn_id in running.speeches:
            running.cancel("interrupted")

    async def _call_events(self, call_id: str, org_id: str, *, upto: int = 0) -> list[Event]:
        """The call's events in stream order, at least up to stream sequence ``upto``.

        A call this instance follows is served from memory (waiting a moment for the follower
        to deliver ``upto`` if needed); otherwise the events after the cached ones are replayed.
        """
        for _ in range(20):
            cached = self._history.get(call_id)
            if cached is None or cached[0] < self._followed_from - 1 or upto == 0:
                break
            if cached[0] >= upto:
                self._history.move_to_end(call_id)
                return list(cached[1])
            await asyncio.sleep(0.001)
        self.replays += 1
        last, cached_events = self._history.pop(call_id, (0, []))
        events = list(cached_events)  # a concurrent handler of the same call may hold the old list
        # What the follower delivers for the call meanwhile is kept, not dropped: the replay
        # reads up to the stream's end as it was when it began, and an event stored after that
        # would otherwise be missing from the history the follower goes on appending to.
        live = self._replaying[call_id] = []
        try:
            async for seq, event in self.s.bus.replay(call_events(call_id, org_id),
                                                      start_seq=last + 1):
                events.append(event)
                last = seq
        finally:
            del self._replaying[call_id]
        for seq, event in live:
            if seq > last:
                events.append(event)
                last = seq
        self._history[call_id] = (last, events)
        if len(self._history) > HISTORY_CALLS:
            self._history.popitem(last=False)
        return events

    async def _request_unrequested(self, conversation: Conversation, turn: AgentTurn) -> None:
        """Request the tool calls of a response whose requests are stored only in part.

        The instance that published them died between two: each is published as it would have
        been (the same id, so a publish of its own still under way is a duplicate), from a
        request of the same response that is stored.
        """
        call_id = conversation.call_id
        for call, sibling in list(turn.unrequested.values()):
            await self.s.bus.publish(ToolRequested(
                id=stable_id(call_id, turn.turn_id, "tool", call.tool_call_id),
                org_id=conversation.org_id, call_id=call_id, turn_id=sibling.turn_id,
                tool_call_id=call.tool_call_id, name=call.name, arguments=call.arguments,
                arguments_error=call.arguments_error, ttft_ms=sibling.ttft_ms,
                llm_wait_ms=sibling.llm_wait_ms,
                response_calls=sibling.response_calls, causation_id=sibling.causation_id))
            log.warning("call %s turn %s: %s requested late: its instance died before it",
                        call_id, turn.turn_id, call.name)

    async def _complete_cancelled(self, conversation: Conversation, cause: Event) -> None:
        """Complete, as cancelled, the turn ``cause`` would take up, cut short with none running it.

        The caller barged in, spoke again or hung up while no instance ran the turn: the one
        running it died (``cause``, the unit of work that began the turn's current round, is
        delivered again), or the turn waited for a tool (``cause`` is that outcome). No other
        unit of work takes the turn up, so its completion is published here, under the id it
        would have had (a late original's, or another instance's, is then a duplicate), with
        the usage the fold has for its rounds. Only by the unit of work that began the current
        round, once no tool of the turn is still out (the outcome's unit completes it then): a
        unit of work of an earlier round leaves the turn to the instance that may be running
        its current round and completes it itself. Nothing for a turn that published no
        ``turn.started`` since it was taken up: no integrator waits for its end.

        A hand-off's round that ``cause`` began is completed whatever has happened since (a
        tool still out, the hand-off refused and the turn taken up again), under the id of the
        completion that goes with that hand-off, cancelled unless the hand-off went through (the
        call ended with it): nothing more of it is done (its speech is not closed, a hand-off
        not requested is not: the caller cut the goodbye off, so it does not happen, and the
        tools service refuses one requested).
        """
        if isinstance(cause, TurnUserEnded):
            turn, began = conversation.turns.get(cause.turn_id), 0
        elif isinstance(cause, ToolCompleted | ToolFailed | ToolDenied):
            turn = next((t for t in conversation.turns.values()
                         if cause.tool_call_id in t.tools), None)
            began = turn.begun_by.get(cause.tool_call_id) if turn is not None else None
        else:
            return
        index = turn.hand_off_index(began) if turn is not None and began is not None else None
        if turn is not None and index is not None and (
                self._completion_id(conversation.call_id, turn.turn_id, index)
                not in turn.completion_ids):
            await self._completed(conversation, turn.turn_id, cause, hand_off=index,
                                  cancelled=not turn.hand_off_done(began))
            log.info("call %s turn %s: the hand-off's round completed late: its instance died "
                     "and the turn was cut short", conversation.call_id, turn.turn_id)
            return
        if turn is None or turn.completed or not turn.started_since_taken_up or (
                turn.tools_out or began != turn.round):
            return
        await self._completed(conversation, turn.turn_id, cause, cancelled=True)
        log.info("call %s turn %s: completed as cancelled: cut short while no instance ran it",
                 conversation.call_id, turn.turn_id)

    async def _greet(self, conversation: Conversation, event: CallStreamStarted) -> None:
        if conversation.greeted:
            return
        settings = await self.s.agents(event.org_id, conversation.agent_id or event.agent_id)
        if settings.greeting.strip():
            await self.s.bus.publish(AgentSay(
                id=stable_id(event.call_id, "t0", "say", 0), org_id=event.org_id,
                call_id=event.call_id, turn_id="t0", seq=0, text=settings.greeting.strip(),
                last=True, causation_id=event.id))

    async def _idle(self, conversation: Conversation, event: CallerIdle) -> None:
        """The caller has been silent: ask whether they are there, or say goodbye and hang up.

        In the agent turn media named (``i<n>``), with the words of the agent's settings
        (``idle_prompt``, ``idle_goodbye``): no model is asked. Each step
        is published once, as the fold does not show it yet, under an id any instance gives it,
        so a redelivery (or another instance after this one died) adds nothing; the goodbye is
        stored before the hang-up, which the tools service carries out once it has played
        (``end_call`` with reason "idle", so ``call.ended`` says so). Not if the caller spoke
        or pressed a key since media counted the silence: it counts a new one.
        """
        if conversation.caller_moved_since(event.turn_id):
            return
        bus, call_id, org_id, turn_id = self.s.bus, event.call_id, event.org_id, event.turn_id
        turn = conversation.turn(turn_id)
        hang_up = event.action == "hangup"
        if not turn.says:
            settings = await self.s.agents(org_id, conversation.agent_id)
            await bus.publish(AgentSay(
                id=stable_id(call_id, turn_id, "say", 0), org_id=org_id, call_id=call_id,
                turn_id=turn_id, seq=0,
                text=(settings.idle_goodbye if hang_up else settings.idle_prompt).strip(),
                last=True, causation_id=event.id))
        if hang_up and not turn.tools:
            tool_call_id = f"{turn_id}_end_call"
            await bus.publish(ToolRequested(
                id=stable_id(call_id, turn_id, "tool", tool_call_id), org_id=org_id,
                call_id=call_id, turn_id=turn_id, tool_call_id=tool_call_id, name="end_call",
                arguments={"reason": "idle"}, causation_id=event.id))
        log.info("call %s: caller silent %.1f s: %s (%s)", call_id, event.silent_s,
                 "goodbye and hang-up" if hang_up else "prompt", turn_id)

    # ------------------------------------------------------------------ a turn

    async def _run(self, conversation: Conversation, turn_id: str, cause: Event, msg: Msg, *,
                   final_text: str) -> None:
        call_id = conversation.call_id
        previous = self._running.get(call_id)
        if previous is not None and previous.turn_id != turn_id:
            previous.cancel("newer turn")
        billed = RoundUsage(run=msg.metadata.num_delivered)
        task = asyncio.create_task(self._turn(conversation, turn_id, cause, final_text, billed))
        running = _Running(turn_id, task, msg.metadata.sequence.stream,
                           frozenset(conversation.turn(turn_id).speeches),
                           frozenset(conversation.user_turns))
        self._running[call_id] = running
        ended = self._turn_ends.get(call_id)
        if ended is not None and ended[1] != turn_id and ended[0] > running.seq:
            running.cancel("newer turn")  # it ended before this run began: no watch sees it

        # What cancels it comes through the instance's live subscriptions (``_cancel_on``)
        # and the follower (``_turn_ended``), not subscriptions of its own.
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=1.0)
                if not done:
                    await msg.in_progress()  # keep the work ours while the turn runs
            if task.cancelled() or task.exception() is not None:
                # Cut short: what its responses were billed so far counts all the same (a
                # failed unit of work is delivered again, and asks the model again).
                await self._record_usage(conversation, turn_id, cause, billed)
            if task.cancelled() and running.cancelled_by:
                await self._completed(conversation, turn_id, cause, cancelled=True,
                                      billed=billed)
            elif not task.cancelled():
                task.result()
        finally:
            if not task.done():
                # The unit of work failed (its keep-alive could not be sent) or was cancelled:
                # the turn ends with it, or its redelivery would run the turn beside it.
                task.cancel()
                await asyncio.wait({task})
            if self._running.get(call_id) is running:
                del self._running[call_id]

    def _cancel_on(self, event: Event) -> None:
        """Cancel the call's turn running here when the caller interrupts it or moves on."""
        running = self._running.get(getattr(event, "call_id", ""))
        if running is None:
            return
        if isinstance(event, AgentSpeechInterrupted) and event.turn_id in running.speeches:
            running.cancel("interrupted")
        elif isinstance(event, TurnUserEnded) and event.turn_id != running.turn_id and (
                event.turn_id not in running.ended):
            # Not one the turn's fold has: a media instance taking the call over publishes the
            # turn its predecessor had open again (stored once, but live subscribers get it).
            running.cancel("newer turn")

    async def _turn(self, conversation: Conversation, turn_id: str, cause: Event,
                    final_text: str, billed: RoundUsage) -> None:
        call_id, started = conversation.call_id, time.perf_counter()
        # A caller's turn may adopt the reply started while its end was being confirmed; not a
        # turn of keys: what was speculated on were words (the same ones, maybe, read out).
        speculation = self.speculations.take(call_id) if final_text else None
        if speculation is not None and _keyed(cause):
            speculation.cancel("discarded")
            speculation = None
        pending: list[asyncio.Future[PubAck]] = []  # sent, acks awaited before the turn ends
        try:
            await self._answer(conversation, turn_id, cause, final_text, speculation, pending,
                               started, billed)
        finally:
            if speculation is not None and not speculation.outcome:
                speculation.cancel("discarded")  # the turn failed before it could decide
            for future in pending:
                future.cancel()  # a cancelled or failed turn: its acks are no longer awaited

    async def _answer(self, conversation: Conversation, turn_id: str, cause: Event,
                      final_text: str, speculation: Speculation | None,
                      pending: list[asyncio.Future[PubAck]], started: float,
                      billed: RoundUsage) -> None:
        bus, call_id, org_id = self.s.bus, conversation.call_id, conversation.org_id
        agent_turn = conversation.turn(turn_id)
        round_no = agent_turn.round
        settings = await self.s.agents(org_id, conversation.agent_id)
        context = Context()
        profile = self._caller_profile(
            org_id, call_id, conversation.from_number if conversation.direction == "inbound"
            else "")
        # A caller's words (not a continuation after a tool). Keys are nothing to retrieve
        # knowledge for ("1234#" finds only passages that happen to hold the digits) nor to
        # classify; the model can still look knowledge up with its tool.
        previous = conversation.previous_words.get(turn_id, "")
        if final_text and not _keyed(cause):
            context = await self.warmup.take(
                call_id, final_text, agent_id=conversation.agent_id, previous=previous,
            ) or await self._prepare_context(
                org_id, call_id, conversation.agent_id, final_text, previous)
        elif not final_text and (words := conversation.words_of.get(turn_id, "")).strip():
            # A round after a tool's outcome answers the same words: their knowledge is still
            # what the model may answer from (retrieved again, by the same rule; published
            # once, with the turn).
            context = Context(knowledge=await self._knowledge(
                org_id, conversation.agent_id, words, previous))
        context.profile = await self._profile_text(call_id, profile)
        self.s.on_turn("prepare_warm" if context.warm else "prepare_cold",
                       (time.perf_counter() - started) * 1000)
        # The speculation asked with the caller's words as a partial or final had them: when
        # the turn's differ only in case or punctuation, the turn goes on with those, so its
        # request is the speculative one, and the history keeps them (turn.started says so):
        # the next turn's request then begins as the adopted one did, which the prompt cache
        # wrote up to the caller's words.
        reworded = ""
        if speculation is not None and final_text and speculation.text != final_text and (
                normalize(speculation.text) == normalize(final_text)) and (
                agent_turn.next_seq == agent_turn.round_starts[round_no]):
            reworded = speculation.text
            conversation.reword(turn_id, reworded)
        request = self._request(conversation, settings, context,
                                await self.s.tools(org_id, conversation.agent_id))
        candidates = self.s.router.candidates(request)
        turn_started = TurnStarted(
            id=stable_id(call_id, turn_id, "started", round_no), org_id=org_id,
            call_id=call_id, turn_id=turn_id, provider=candidates[0].name if candidates else "",
            caller_text=reworded, causation_id=cause.id)
        context_events = self._context_events(conversation, turn_id, context, cause) \
            if final_text else []
        # The clause media already plays as this turn's answer (prepared by a speculation).
        prepared = cause.prepared_text if isinstance(cause, TurnUserEnded) else ""
        prepared_last = isinstance(cause, TurnUserEnded) and cause.prepared_last
        seq = agent_turn.round_starts[round_no]  # where this round's clauses begin
        if agent_turn.next_seq > seq:
            # A re-run of a round that already said its first clauses (its instance died, or the
            # provider failed after them): the caller heard them, so the model goes on from
            # them — they become the request's prefill, not a reply in the history that a
            # model could begin again — and the new clauses are numbered after them.
            request = _continuing(request)
            seq, prepared, prepared_last = agent_turn.next_seq, "", False
            if speculation is not None:
                speculation.cancel("discarded")
                speculation = None
        stream: AsyncIterator[RouterEvent] | None = None
        if speculation is not None:
            if speculation.prepared_as(prepared, prepared_last) or (
                    not prepared and await speculation.matches(final_text, request)):
                stream = speculation.adopt(settings.filler_after_ms)
            else:
                speculation.cancel("discarded")
        # Everything the turn publishes is sent without waiting for each ack — one connection,
        # so the stream keeps the order they were sent in (turn.started before agent.say) —
        # and the acks are awaited together before the turn ends.
        for fact in (*context_events, turn_started):
            pending.append(await bus.send(fact))

        splitter = ClauseSplitter()
        done: Done | None = None
        # The model's tool calls, requested once its response is complete (see below).
        calls: list[ToolRequested] = []
        speech = agent_turn.speech  # the utterance this round's clauses belong to
        # What this turn waited for the model's first token: its ttft for a fresh request,
        # less (often nothing) for a preemptive reply that was under way when the turn ended.
        llm_wait_ms: float | None = None

        said_last = ""  # this round's latest clause
        filler_last = False  # it was one of the router's fillers
        # What the turn said before this round and in it: no filler phrase is said twice.
        says_turn = list(agent_turn.says)
        said_turn = _said(says_turn)

        async def say(text: str, *, last: bool = False, filler_after_ms: int = 0,
                      filler: bool = False) -> None:
            nonlocal seq, said_last, filler_last
            said_last = text.strip() or said_last
            if text.strip():
                said_turn.add(text.strip())
            filler_last = filler or (filler_last and not text.strip())
            if text.strip() or last:
                event = AgentSay(
                    id=stable_id(call_id, speech, "say", seq), org_id=org_id,
                    call_id=call_id, turn_id=speech, seq=seq, text=text.strip(), last=last,
                    filler_after_ms=filler_after_ms, causation_id=cause.id)
                says_turn.append(event)
                pending.append(await bus.send(event))
                seq += 1

        if prepared and stream is None:
            # Prepared by a speculation that is not here (another instance's, or replaced): the
            # caller hears it anyway, so it is this turn's first clause and the model goes on
            # from it.
            await say(prepared, last=prepared_last)
            if prepared_last:
                await bus.acked(pending)
                await self._completed(conversation, turn_id, cause, round_no=round_no,
                                      duration_ms=(time.perf_counter() - started) * 1000)
                return
            request = msgspec.structs.replace(request, prefill=prepared)
        async with asyncio.timeout(self.s.turn_deadline_s):
            if stream is None:
                # What the turn said before this round (a slow tool's filler among it): the
                # router's fillers go on from it rather than say a phrase again.
                stream = self.s.router.stream(
                    request, filler_after_ms=settings.filler_after_ms, said=said_turn)
            asked = time.perf_counter()
            try:
                async for item in stream:
                    billed.add(item)  # (as it comes: the turn may be cancelled at any await)
                    if llm_wait_ms is None and isinstance(item, TextDelta | ToolCall):
                        llm_wait_ms = (time.perf_counter() - asked) * 1000
                    if isinstance(item, TextDelta):
                        for clause in splitter.feed(item.text):
                            await say(clause)
                    elif isinstance(item, Filler):
                        await say(item.text, filler=True)
                    elif isinstance(item, ToolCall):
                        rest = splitter.flush()
                        if rest.strip():
                            await say(rest)
                        if len(agent_turn.tools) + len(calls) >= MAX_TOOL_CALLS_PER_TURN:
                            log.warning("call %s turn %s: %s not called: the turn has made %d "
                                        "tool calls already", call_id, turn_id, item.name,
                                        MAX_TOOL_CALLS_PER_TURN)
                            continue
                        calls.append(ToolRequested(
                            id=stable_id(call_id, turn_id, "tool", item.id), org_id=org_id,
                            call_id=call_id, turn_id=speech, tool_call_id=item.id,
                            name=item.name, arguments=item.arguments,
                            arguments_error=item.arguments_error, causation_id=cause.id))
                    elif isinstance(item, Done):
                        done = item
                    elif isinstance(item, ProviderSwitched):
                        log.warning("call %s turn %s: LLM %s → %s (%s)", call_id, turn_id,
                                    item.from_provider, item.to_provider, item.reason)
            finally:
                await stream.aclose()
        # What the round was billed, stored before what takes the turn on (its tool requests)
        # or ends it: the unit of work that completes the turn folds it in.
        for fact in self._usage_events(conversation, turn_id, cause, billed):
            pending.append(await bus.send(fact))
        # Requested together, once the response is complete: an outcome never arrives while
        # another tool of the same response is still to be requested (and the round goes on
        # without it). Before them, the filler for slow tools (a hand-off has its last words):
        # published now, in this round's order, so the round the outcomes start numbers its
        # clauses after it; media says it only if the tools turn out slow.
        # Not right after a filler: the caller has just heard one (the router's, or the model
        # said the phrase itself). Not a phrase the turn said already (the router's first
        # filler, an earlier slow tool's): the next of the router's sequence, so a second slow
        # tool is not a silence; none once all have been said.
        # (A tool filler that a clause of the turn, or this one, came within the threshold of is
        # skipped by media: never heard, its phrase is not used up.)
        fillers = [text.strip() for text in (self.s.tool_filler, self.s.router.filler_text,
                                             *self.s.router.more_fillers) if text.strip()]
        heard = _said(says_turn, next_at=datetime.now(UTC))
        tool_filler = next((text for text in fillers if text not in heard), None)
        if calls and self.s.tool_filler_after_ms and tool_filler and not (
                filler_last or said_last in fillers) and (
                not any(call.name in HAND_OFFS for call in calls)):
            await say(tool_filler, filler_after_ms=self.s.tool_filler_after_ms)
        # Each carries the response's time to first token, for a completion that folds it, and
        # the response's other calls, for whoever finds only some of them stored.
        first_token = {"ttft_ms": round(done.ttft_ms or 0.0, 2) if done else 0.0,
                       "llm_wait_ms": round(llm_wait_ms or 0.0, 2)}
        response_calls = [RequestedCall(tool_call_id=call.tool_call_id, name=call.name,
                                        arguments=call.arguments,
                                        arguments_error=call.arguments_error)
                          for call in calls] if len(calls) > 1 else []
        for call in calls:
            pending.append(await bus.send(msgspec.structs.replace(
                call, **first_token, response_calls=response_calls)))
        if calls and not any(call.name in HAND_OFFS for call in calls):
            await bus.acked(pending)
            return  # the turn goes on when the tool outcomes arrive
        # The turn ends here (with a hand-off: unless it fails, and its outcome takes the turn
        # up again). The last clause closes the speech, so media plays it out before the
        # tools service hangs up or transfers.
        await say(splitter.flush(), last=True)
        await bus.acked(pending)
        await self._completed(conversation, turn_id, cause, done=done, round_no=round_no,
                              duration_ms=(time.perf_counter() - started) * 1000,
                              llm_wait_ms=llm_wait_ms or 0.0, billed=billed)

    async def _completed(self, conversation: Conversation, turn_id: str, cause: Event, *,
                         done: Done | None = None, cancelled: bool = False, round_no: int = 0,
                         duration_ms: float = 0.0, llm_wait_ms: float = 0.0,
                         billed: RoundUsage | None = None, hand_off: int | None = None) -> None:
        """Publish ``turn.completed``: the usage of every round since the turn was taken up.

        The fold has what those rounds recorded (``usage.recorded``, whichever instance ran
        them) and the first one's time to first token, if it was not this round; ``billed``
        and ``done`` are this run's. ``hand_off``: the completion that follows the turn's
        hand-off of that number, for the rounds up to it (its instance died before it).
        """
        turn = conversation.turn(turn_id)
        if hand_off is None:
            rounds = turn.rounds_since_taken_up
            earlier = turn.round_first_token.get(rounds[0]) if rounds[0] < turn.round else None
        else:
            rounds = turn.rounds_up_to_hand_off(hand_off)
            earlier = turn.round_first_token.get(rounds[0])
        usage = turn.usage_of(rounds)
        if billed is not None:
            usage = add_usage(usage, billed.total())
        if earlier is not None:
            ttft_ms, llm_wait_ms = earlier
        else:  # this round is the first
            ttft_ms = (done.ttft_ms or 0.0) if done is not None else 0.0
        await self.s.bus.publish(TurnCompleted(
            id=self._completion_id(conversation.call_id, turn_id, turn.failed_hand_offs
                                   if hand_off is None else hand_off),
            org_id=conversation.org_id, call_id=conversation.call_id, turn_id=turn_id,
            provider=done.provider if done else billed.provider if billed else "", model="",
            usage=TokenUsage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                             cache_read_tokens=usage.cache_read_tokens,
                             cache_write_tokens=usage.cache_write_tokens),
            ttft_ms=round(ttft_ms, 2), llm_wait_ms=round(llm_wait_ms, 2),
            duration_ms=round(duration_ms, 2), cancelled=cancelled, causation_id=cause.id))

    @staticmethod
    def _completion_id(call_id: str, turn_id: str, reopened: int) -> uuid.UUID:
        """The id of the turn's completion after ``reopened`` failed hand-offs.

        One completion per time the turn is taken up (after a failed hand-off), each its own.
        """
        return stable_id(call_id, turn_id, *(("completed", reopened) if reopened
                                             else ("completed",)))

    async def _finish_hand_off(self, conversation: Conversation, turn: AgentTurn,
                               cause: Event) -> bool:
        """Finish the hand-off round ``cause`` began, if its instance died before it could.

        That round requested a hand-off, and then its speech was to close and the turn to
        complete; the unit of work is delivered again when the instance died on the way. What
        is missing is done now, with the ids it would have had: the rest of its tool requests,
        the closing clause of its speech (even if an outcome began another utterance since), and
        the completion that goes with this hand-off (whether it failed since or not: a failure
        takes the turn up again, and completes it once more). True if the round was one.
        """
        round_no = 0 if isinstance(cause, TurnUserEnded) else turn.begun_by.get(
            getattr(cause, "tool_call_id", ""))
        if round_no is None or (index := turn.hand_off_index(round_no)) is None:
            return False
        if self._completion_id(conversation.call_id, turn.turn_id, index) in turn.completion_ids:
            return False
        await self._request_unrequested(conversation, turn)
        # The round's own speech, even if an outcome of it (a quick tool of the same response,
        # a refusal) began the next since: its hand-off waits for these last words.
        speech = turn.speech_of(round_no)
        if speech not in turn.closed:
            seq = turn.next_seq_of(speech)
            await self.s.bus.publish(AgentSay(
                id=stable_id(conversation.call_id, speech, "say", seq),
                org_id=conversation.org_id, call_id=conversation.call_id, turn_id=speech,
                seq=seq, text="", last=True, causation_id=cause.id))
        await self._completed(conversation, turn.turn_id, cause, hand_off=index)
        log.warning("call %s turn %s: the hand-off's round completed late: its instance died "
                    "before it", conversation.call_id, turn.turn_id)
        return True

    def _usage_events(self, conversation: Conversation, turn_id: str, cause: Event,
                      billed: RoundUsage) -> list[UsageRecorded]:
        """What this run of the turn's current round was billed, per provider and kind.

        The ids name the round and the run (the delivery of its unit of work): the same record
        published again is a duplicate, a round asked again after a redelivery records its own.
        An estimate's are its own too: a provider may have a response estimated (cut short)
        and one reported in the same run (retried).
        """
        call_id, round_no = conversation.call_id, conversation.turn(turn_id).round
        return usage_recorded(
            billed, org_id=conversation.org_id, call_id=call_id, turn_id=turn_id,
            causation_id=cause.id, id_of=lambda provider, kind, estimated: stable_id(
                call_id, turn_id, "usage", round_no, billed.run, provider, kind,
                *(("estimated",) if estimated else ())))

    async def _record_usage(self, conversation: Conversation, turn_id: str, cause: Event,
                            billed: RoundUsage) -> None:
        for event in self._usage_events(conversation, turn_id, cause, billed):
            await self.s.bus.publish(event)

    # ------------------------------------------------------------------ context

    async def _prepare_context(self, org_id: str, call_id: str, agent_id: str,
                               text: str, previous: str) -> Context:
        """Retrieval and intent for what the caller said (``previous``: their turn before)."""
        retrieval = asyncio.create_task(self._knowledge(org_id, agent_id, text, previous))
        intent = classify_intent(text)
        return Context(knowledge=await retrieval, intent=intent)

    async def _knowledge(self, org_id: str, agent_id: str, words: str,
                         previous: str) -> Knowledge:
        """What the caller's words find, a follow-up's searched with its subject's.

        A follow-up ("How much is it?" after "Do you do teeth whitening?") names nothing it asks
        about: words that refer back or name nothing of their own
        (:func:`~parley.brain.follow_ups.is_follow_up`, as the fold decides what a turn
        carries), or that find nothing, are searched
        together with ``previous``, the subject they most likely go on with: the caller's
        previous turn's words, or, after a follow-up, its subject's and the follow-ups since
        (:func:`~parley.brain.conversation.carried_subject`). At most two searches a turn; the
        query recorded is the one whose passages the prompt gets. The follow-up rule's words
        are English: for an agent of another language (its settings' ``language``) every word
        names something and no question is a clause to it, so a turn is searched by its own
        words, and with the subject only if they find nothing ("¿Aceptan tarjetas?" was
        searched behind "¿Cuánto cuesta una limpieza?", the prices passage first).
        """
        started = time.perf_counter()
        together = f"{previous.strip()} {words.strip()}"
        english = not previous.strip() or (
            await self.s.agents(org_id, agent_id)).language.lower().startswith("en")
        if previous.strip() and english and is_follow_up(words):
            query, chunks = together, await self.s.retrieve(org_id, agent_id, together)
        else:
            query, chunks = words, await self.s.retrieve(org_id, agent_id, words)
            if not chunks and previous.strip():
                query, chunks = together, await self.s.retrieve(org_id, agent_id, together)
        return Knowledge(query, chunks, (time.perf_counter() - started) * 1000)

    def _caller_profile(self, org_id: str, call_id: str, number: str) -> asyncio.Task[str] | None:
        """The lookup of the caller's earlier calls, started on first need and kept per call."""
        task = self._profiles.get(call_id)
        if task is None and number:
            task = asyncio.create_task(self.s.profile(org_id, call_id, number),
                                       name=f"profile:{call_id}")
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._profiles[call_id] = task
            if len(self._profiles) > PROFILE_CALLS:
                self._profiles.popitem(last=False)[1].cancel()
        return task

    async def _profile_text(self, call_id: str, lookup: asyncio.Task[str] | None) -> str:
        """The profile's text; a failed lookup is dropped (the next turn tries again)."""
        if lookup is None:
            return ""
        try:
            return await asyncio.shield(lookup)  # a cancelled turn leaves it for the next
        except asyncio.CancelledError:
            if not lookup.cancelled():
                raise  # this turn was cancelled, not the lookup
            return ""  # the call ended or was forgotten meanwhile
        except Exception:
            log.warning("caller profile lookup failed for call %s", call_id, exc_info=True)
            if self._profiles.get(call_id) is lookup:
                del self._profiles[call_id]
            return ""

    def _context_events(self, conversation: Conversation, turn_id: str, context: Context,
                        cause: Event) -> list[Event]:
        """What was prepared for the turn (intent, knowledge), as events to publish."""
        call_id, org_id = conversation.call_id, conversation.org_id
        publishes: list[Event] = []
        if context.intent[0]:
            publishes.append(IntentDetected(
                id=stable_id(call_id, turn_id, "intent"), org_id=org_id, call_id=call_id,
                turn_id=turn_id, intent=str(context.intent[0]),
                confidence=float(context.intent[1]),
                causation_id=cause.id))
        if context.knowledge is not None:
            k = context.knowledge
            publishes.append(KnowledgeRetrieved(
                id=stable_id(call_id, turn_id, "knowledge"), org_id=org_id, call_id=call_id,
                turn_id=turn_id, query=k.query[:500], chunk_ids=[c.id for c in k.chunks],
                scores=[round(c.score, 4) for c in k.chunks],
                latency_ms=round(k.latency_ms, 2), causation_id=cause.id))
        return publishes

    def _request(self, conversation: Conversation, settings: AgentSettings, context: Context,
                 tools: list[ToolSpec]) -> LlmRequest:
        notes = []
        if conversation.context:
            notes.append(call_context_note(conversation.context))
        if context.profile:
            notes.append(f"About the caller: {context.profile}")
        chunks = context.knowledge.chunks if context.knowledge is not None else []
        if chunks:
            notes.append("Knowledge for this turn:\n" + "\n---\n".join(
                f"[{c.source}] {c.text}" for c in chunks))
        elif context.knowledge is not None:
            notes.append("Knowledge for this turn: nothing relevant was found.")
        return LlmRequest(
            system=SystemPrompt(text=f"{settings.prompt.strip()}\n\n{GROUNDING}"),
            context="\n\n".join(notes), messages=conversation.llm_messages(),
            tools=tuple(tools),
            knowledge=tuple(KnowledgeChunk(id=c.id, text=c.text, score=c.score, source=c.source)
                            for c in chunks))
