"""Preemptive generation: start the reply while the end of the caller's turn is being confirmed.

The caller's words are often known before the turn ends: when the caller stops speaking
(``speech.stopped``) media may still be waiting out the endpointing silence, and the words heard
by then are usually what the turn will say; a ``transcript.final`` usually comes before
``turn.user_ended`` (media asks Deepgram to end utterances ahead of its own end of turn);
optionally (off by default: each speculation is a billed request) a partial that has stopped
changing. The worker then starts the turn's LLM request speculatively — the
conversation and the warmed context as they will be if the turn ends with those words — and a
:class:`Speculation` buffers what comes back. Nothing is published: no ``turn.started``, no
``agent.say``, and a tool call the model makes stays in the buffer like text.

When the turn ends, the worker builds the turn's request as usual. If it is the request the
speculation made (the same words once normalised, and nothing else changed: history, knowledge,
profile, prompt, tools), the speculation is adopted: its buffered output goes through the turn
as if it had just arrived, and the stream continues. Otherwise it is dropped and the request is
made fresh. A speculation is cancelled by newer words or speech from the caller, the call's
end, its timeout, or a turn end that another instance takes; there is at most one per call.

A speculation that is not adopted was billed all the same: what its stream reported (the
response's input as it began, the whole usage at its end) is handed to ``on_dropped`` once it
is dropped, for the worker to record.

An adopted reply that has not begun ``filler_after_s`` (the agent's threshold) after the turn
ended (its end as seen here, live) gets a :class:`Filler`, and the next of ``fillers`` after
each further threshold of silence until they run out, as a fresh request would. The router's
own fillers are dropped: they are timed from the speculative request, which went out while the
caller was still talking, so they would come too soon after the turn's end, or before it and be
lost.

The reply's first clause is *prepared* as soon as it is complete (``on_clause``; the worker
publishes it as ``agent.reply_prepared``): media synthesises it while it waits out the silence
and, if the turn ends with the same words, plays it the moment the turn ends. Such a turn says
so (``turn.user_ended.prepared_text``) and must then adopt the speculation that prepared the
clause, whatever else changed: the caller is already hearing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import msgspec

from parley.brain.llm.base import (
    Done,
    Filler,
    LlmRequest,
    ProviderSwitched,
    TextDelta,
    ToolCall,
    UsageReported,
)
from parley.brain.llm.clauses import ClauseSplitter
from parley.brain.llm.router import RouterEvent
from parley.brain.usage import RoundUsage
from parley.common.words import normalize_words as normalize

log = logging.getLogger(__name__)

__all__ = ["Speculation", "Speculations", "normalize"]

UNCLAIMED_GRACE_S = 2.0  # after the turn ends, how long a speculation waits to be taken here


class Speculation:
    """One call's speculative reply to ``text``.

    Built after ``delay_s`` (or at :meth:`start_now`), then streamed into a buffer until adopted
    or cancelled. Adopted, it says ``filler`` (the first of them, if several) if nothing has come
    ``filler_after_s`` after the turn ended (None: no filler), then the next after each further
    ``filler_after_s`` of silence. Dropped (any outcome but adopted), it is handed to
    ``on_dropped``: what it was billed is then :meth:`billed`.
    """

    def __init__(self, call_id: str, text: str, *,
                 build: Callable[[], Awaitable[LlmRequest | None]],
                 stream: Callable[[LlmRequest], AsyncIterator[RouterEvent]],
                 delay_s: float, on_outcome: Callable[[str], None],
                 on_clause: Callable[[str, bool], Awaitable[None]] | None = None,
                 on_dropped: Callable[[Speculation], None] | None = None,
                 filler: str | Sequence[str] = "One moment.",
                 filler_after_s: float | None = None) -> None:
        self.id = uuid.uuid4()  # names its usage records: each speculation is its own request
        self.call_id = call_id
        self.text = text
        self.turn_id = ""  # the caller's turn it answers, once its request is built ("": unknown)
        self._on_dropped = on_dropped
        self._fillers = (filler,) if isinstance(filler, str) else tuple(filler)
        self._filler_after_s = filler_after_s
        self._ended_at: float | None = None  # when the turn ended, as seen here (loop time)
        self.request: LlmRequest | None = None
        self.outcome = ""
        # The first clause of the reply once complete (``last``: it is the whole reply), handed
        # to ``on_clause`` to be prepared; "" until then, or if the reply starts with a tool.
        self.prepared = ""
        self.prepared_last = False
        self._on_clause = on_clause
        self._items: list[RouterEvent] = []
        self._more = asyncio.Event()
        self._go = asyncio.Event()  # no (more) waiting for the words to settle
        if delay_s <= 0:
            self._go.set()
        self._ready = asyncio.Event()  # the request is made (or never will be)
        self._error: Exception | None = None
        self._on_outcome = on_outcome
        self._task = asyncio.create_task(self._run(build, stream, delay_s),
                                         name=f"speculation:{call_id}")

    def start_now(self) -> None:
        """Skip what is left of the wait (the words were confirmed)."""
        self._go.set()

    def turn_ended(self) -> None:
        """The turn ended with these words: start now, and prepare no clause from here on.

        The turn publishes the reply itself; a clause prepared now would reach media after the
        turn it was meant to open had ended.
        """
        if self._ended_at is None:
            self._ended_at = asyncio.get_running_loop().time()
        self._on_clause = None
        self._go.set()

    async def _run(self, build: Callable[[], Awaitable[LlmRequest | None]],
                   stream_of: Callable[[LlmRequest], AsyncIterator[RouterEvent]],
                   delay_s: float) -> None:
        try:
            if delay_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._go.wait(), delay_s)
            self.request = await build()
            self._ready.set()
            if self.request is None:
                return  # not a turn this instance can speculate on
            stream = stream_of(self.request)
            splitter = ClauseSplitter() if self._on_clause is not None else None
            try:
                async for item in stream:
                    self._items.append(item)
                    self._more.set()
                    if splitter is not None:
                        splitter = await self._prepare(splitter, item)
            finally:
                await stream.aclose()
        except Exception as exc:  # kept for the turn: it then makes its own request
            self._error = exc
        finally:
            self._ready.set()
            self._more.set()

    async def _prepare(self, splitter: ClauseSplitter, item: RouterEvent) -> ClauseSplitter | None:
        """Split the reply as the turn will; hand on its first clause. None: nothing to do."""
        clause, last = "", False
        if isinstance(item, TextDelta):
            clauses = splitter.feed(item.text)
            clause = clauses[0] if clauses else ""
        elif isinstance(item, Done):
            clause, last = splitter.flush(), item.stop_reason != "tool_use"
        elif isinstance(item, ToolCall):
            return None  # a tool comes first: the turn's first words wait for its outcome
        if self._on_clause is None:
            return None  # the turn ended meanwhile
        if not clause.strip():
            return None if isinstance(item, Done) else splitter
        self.prepared, self.prepared_last = clause.strip(), last
        await self._on_clause(self.prepared, last)
        return None

    async def made(self, timeout_s: float) -> None:
        """Return once the request is on its way, or will never be (at most ``timeout_s``).

        The request is written out by the router's task for the provider, which starts in
        the loop iteration that wakes a waiter here: one more turn of the loop lets it go first,
        so that the caller runs while the model answers.
        """
        if self._go_or_started():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout_s)
            await asyncio.sleep(0)

    def prepared_as(self, text: str, last: bool) -> bool:
        """Whether this is the speculation that prepared the clause a turn started playing."""
        return bool(text) and self.prepared == text and self.prepared_last == last

    async def matches(self, text: str, request: LlmRequest) -> bool:
        """Whether the turn that ended with ``text`` and builds ``request`` can adopt this.

        Waits for the speculative request to be built if that is under way (it needs the same
        context the turn just awaited), not for a wait for stable words still running.
        """
        if normalize(text) != normalize(self.text) or not self._go_or_started():
            return False
        await self._ready.wait()
        if self.request is None or self._error is not None or self._task.cancelled():
            return False
        if not self.request.messages or not request.messages:
            return False
        # The caller's words may differ in case and punctuation: compare with the turn's own.
        # (The worker has the turn go on with the speculation's words then, so the two are the
        # same request, and the history the next turn's prefix: see BrainWorker._answer.)
        candidate = msgspec.structs.replace(
            self.request, messages=(*self.request.messages[:-1], request.messages[-1]))
        return candidate == request

    def _go_or_started(self) -> bool:
        return self._go.is_set() or self._ready.is_set() or self.request is not None or (
            self._task.done())

    def adopt(self, filler_after_ms: float | None = None) -> AsyncIterator[RouterEvent]:
        """The reply: what was buffered, then the rest as it comes. Closing it stops the LLM.

        ``filler_after_ms``: the agent's filler threshold (0: no filler; None: the one this
        speculation was made with).
        """
        self._finish("adopted")
        after_s = self._filler_after_s if filler_after_ms is None else filler_after_ms / 1000
        if not after_s or after_s <= 0:
            return self._replay(filler_due=None, every_s=0.0)
        ended = self._ended_at  # seen live; else it is ending now
        if ended is None:
            ended = asyncio.get_running_loop().time()
        return self._replay(filler_due=ended + after_s, every_s=after_s)

    async def _replay(self, filler_due: float | None,
                      every_s: float) -> AsyncIterator[RouterEvent]:
        fillers = list(self._fillers)
        index = 0
        try:
            while True:
                while index < len(self._items):
                    item = self._items[index]
                    index += 1
                    if isinstance(item, Filler):
                        continue  # timed from the request, made while the caller was talking
                    if not isinstance(item, ProviderSwitched | UsageReported):
                        filler_due = None  # the reply has begun
                    yield item
                if self._task.done():
                    if self._error is not None:
                        raise self._error
                    return
                self._more.clear()
                try:
                    async with asyncio.timeout_at(filler_due):
                        await self._more.wait()
                except TimeoutError:
                    filler = fillers.pop(0)
                    filler_due = (asyncio.get_running_loop().time() + every_s if fillers
                                  else None)
                    yield Filler(text=filler)
        finally:
            self._task.cancel()

    def cancel(self, outcome: str = "cancelled") -> None:
        """Stop generating; nothing it produced is used."""
        self._task.cancel()  # from here on nothing more is buffered
        self._finish(outcome)

    def billed(self) -> RoundUsage:
        """What its responses were billed, as its stream reported them (final once dropped)."""
        billed = RoundUsage(run=0)  # (asked by no unit of work)
        for item in self._items:
            billed.add(item)
        return billed

    def _finish(self, outcome: str) -> None:
        if not self.outcome:
            self.outcome = outcome
            self._on_outcome(outcome)
            if outcome != "adopted" and self._on_dropped is not None:
                self._on_dropped(self)  # (adopted, the turn records what it was billed)


class Speculations:
    """At most one :class:`Speculation` per call, and what became of them."""

    def __init__(self, *, on_outcome: Callable[[str], None] = lambda outcome: None,
                 filler: str | Sequence[str] = "One moment.",
                 filler_after_s: float | None = None) -> None:
        self._calls: dict[str, Speculation] = {}
        self._on_outcome = on_outcome
        self._filler = filler
        self._filler_after_s = filler_after_s
        self.outcomes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def get(self, call_id: str) -> Speculation | None:
        """The call's speculation, if one is under way."""
        return self._calls.get(call_id)

    def start(self, call_id: str, text: str, *, build: Callable[[], Awaitable[LlmRequest | None]],
              stream: Callable[[LlmRequest], AsyncIterator[RouterEvent]], delay_s: float,
              timeout_s: float,
              on_clause: Callable[[str, bool], Awaitable[None]] | None = None,
              on_dropped: Callable[[Speculation], None] | None = None) -> Speculation:
        """Replace the call's speculation with one for ``text``."""
        self.cancel(call_id, "superseded")
        speculation = Speculation(call_id, text, build=build, stream=stream, delay_s=delay_s,
                                  on_outcome=self._count, on_clause=on_clause,
                                  on_dropped=on_dropped,
                                  filler=self._filler, filler_after_s=self._filler_after_s)
        self._calls[call_id] = speculation
        self._cancel_later(call_id, speculation, delay_s + timeout_s, "expired")
        return speculation

    def take(self, call_id: str) -> Speculation | None:
        """The call's speculation, now the turn's to adopt or drop."""
        return self._calls.pop(call_id, None)

    def cancel(self, call_id: str, outcome: str = "cancelled") -> None:
        """Drop the call's speculation, if any."""
        speculation = self._calls.pop(call_id, None)
        if speculation is not None:
            speculation.cancel(outcome)

    def turn_ended(self, call_id: str, text: str, *, prepared: str = "",
                   prepared_last: bool = False) -> None:
        """The turn ended (seen live): confirm a matching speculation, drop another one.

        It matches on its words, or — when media plays a prepared clause — on being the one
        that prepared it. A confirmed one is dropped anyway if this instance has not taken the
        turn within a grace period (another instance answers it).
        """
        speculation = self._calls.get(call_id)
        if speculation is None:
            return
        if prepared and not speculation.prepared_as(prepared, prepared_last) or (
                not prepared and normalize(text) != normalize(speculation.text)):
            self.cancel(call_id, "superseded")
            return
        speculation.turn_ended()
        self._cancel_later(call_id, speculation, UNCLAIMED_GRACE_S, "unclaimed")

    def _cancel_later(self, call_id: str, speculation: Speculation, delay_s: float,
                      outcome: str) -> None:
        def cancel() -> None:
            if self._calls.get(call_id) is speculation:  # not taken by a turn nor replaced
                self.cancel(call_id, outcome)

        asyncio.get_running_loop().call_later(delay_s, cancel)

    def cancel_all(self) -> None:
        """Drop every speculation (shutdown)."""
        for call_id in list(self._calls):
            self.cancel(call_id, "stopped")

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self._on_outcome(outcome)
