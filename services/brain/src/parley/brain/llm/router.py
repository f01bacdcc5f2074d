"""Choose an LLM per turn, fall back before the caller notices, and never leave dead air.

For each turn the router lists the providers that can serve it — tools need ``supports_tools``,
a ``max_cost`` budget leaves out dearer ones, an open circuit breaker leaves a provider out
until its reset timeout — and tries them in order: the configured order (best first), with
unhealthy ones (half-open breaker, error-rate EWMA over ``max_error_rate``) moved behind the
healthy ones. An attempt that fails *before its first token* — an error, or no token within
``first_token_deadline_s`` (a tool call begun counts: :class:`ToolCallStarted`, not passed
on) — is counted against the provider (health EWMA and breaker) and the next one is tried,
announced by a :class:`ProviderSwitched` event. The first provider tried has
``first_token_deadline_s``; each fallback has ``fallback_first_token_deadline_s`` (at most the
same), shorter by default: the caller has waited out one provider already, and the last in a
chain (the local responder) answers at once. An error that is about the request rather than
the provider (a 400, 413 or 422) is not counted: one call's bad request, redelivered a few
times, would otherwise open the breaker and take the provider away from every call on the
instance. (Tool arguments the model garbled are no error: the provider yields the call with
its ``arguments_error``, which goes back to the model as the call's outcome.)

A retryable error (429, 5xx, a connection failure) is tried again on the same provider, after
a short backoff (or the wait the provider asked for, a 429's ``retry-after``, if longer),
while the backoff ends within that provider's window (its first-token
deadline, counted from its first attempt: a retry does not get a window of its own) and
within the turn's deadline (``turn_deadline_s``, from the request).
A failure *after* text went out ends the turn with :class:`LlmError`: repeating half a sentence
would be worse. So does a stream gone silent for ``stall_timeout_s`` once begun (a socket that
stalls without closing), rather than the caller waiting out the turn deadline mid-sentence.
An empty reply (no text but whitespace, no tool call) to what the caller just said is a
failure before the first token too, not counted against the provider: they would hear only
silence. (After a tool result, silence can be the answer.)

If no first token has come ``filler_after_ms`` into the turn, a :class:`Filler` ("One
moment.") is yielded, so the caller hears something while a slow or failing provider is
replaced; if still none has come ``filler_after_ms`` after that, the next of ``more_fillers``
("Sorry, just a moment longer."), and so on until they run out: a few different phrases, not
one said over and over, and never a silence longer than the threshold until they do. The
threshold is the agent's (``stream(filler_after_ms=…)``, from its settings), else the
router's; none for a reply that goes on from a prefill (the caller is hearing its beginning).
A filler the turn already said (``stream(said=…)``: a slow tool's "One moment." in the round
before) is not said again: the fillers go on from the next one.
That is counted from the request: a speculative reply (requested before the turn
ended, :mod:`parley.brain.preemptive`) drops this filler and times its own from the turn's end.
The final :class:`Done` names the provider that served the turn; a :class:`UsageReported` (a
response billed as it began) names its provider too, and passes on even from an attempt that
then fails: the caller's turn is billed for it all the same. An empty reply's :class:`Done` is
not passed on (the turn goes on), but its usage is, as a ``final`` :class:`UsageReported`.

Each attempt runs the provider's stream in its own task feeding a queue, so waiting with a
deadline never cancels the provider halfway through a read; closing the router's stream (or
cancelling its consumer) cancels that task, which closes the provider's HTTP stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field

import msgspec

from parley.common.resilience import CircuitBreaker, CircuitOpenError, CircuitState

from .base import (
    Done,
    Filler,
    LlmError,
    LlmEvent,
    LlmProvider,
    LlmRequest,
    ProviderSwitched,
    TextDelta,
    ToolCallStarted,
    UsageReported,
    UserMessage,
)

__all__ = ["MORE_FILLERS", "LlmRouter", "ProviderHealth", "RouterEvent", "against_provider"]

RouterEvent = LlmEvent | Filler | ProviderSwitched
_END = object()
# Said in turn after the first filler, each after another filler threshold of silence.
MORE_FILLERS = ("Sorry, just a moment longer.", "Thanks for bearing with me.")


@dataclass
class _Fillers:
    """The turn's fillers still to say, and when the next is due (None: no more)."""

    texts: list[str]
    every_s: float
    due: float | None

    def take(self, now: float) -> Filler:
        """The filler due now; the next is due a threshold later, if any is left."""
        filler = Filler(text=self.texts.pop(0))
        self.due = now + self.every_s if self.texts else None
        return filler


@dataclass
class ProviderHealth:
    """What the router knows about one provider: latency and error-rate EWMAs, a breaker."""

    breaker: CircuitBreaker
    ttft_ewma_ms: float | None = None
    error_rate: float = 0.0
    turns: int = 0
    failures: list[str] = field(default_factory=list)

    def record(self, *, ok: bool, alpha: float, ttft_ms: float | None = None,
               reason: str = "") -> None:
        """Fold one attempt's outcome into the averages (the breaker is updated separately)."""
        self.turns += 1
        self.error_rate += alpha * ((0.0 if ok else 1.0) - self.error_rate)
        if ttft_ms is not None:
            self.ttft_ewma_ms = (ttft_ms if self.ttft_ewma_ms is None
                                 else self.ttft_ewma_ms + alpha * (ttft_ms - self.ttft_ewma_ms))
        if reason:
            self.failures = [*self.failures[-9:], reason]


class LlmRouter:
    """Streams each turn from the best available provider, with fallback and a filler.

    ``breaker_factory`` makes each provider's :class:`CircuitBreaker` (default: open after 3
    consecutive failures, probe again after 30 s). ``clock`` is injectable for tests.
    """

    def __init__(self, providers: Sequence[LlmProvider], *, first_token_deadline_s: float = 3.0,
                 fallback_first_token_deadline_s: float | None = 1.5,
                 filler_after_ms: float | None = 1200.0, filler_text: str = "One moment.",
                 more_fillers: Sequence[str] = MORE_FILLERS,
                 ewma_alpha: float = 0.2, max_error_rate: float = 0.5,
                 breaker_factory: Callable[[str], CircuitBreaker] | None = None,
                 clock: Callable[[], float] = time.monotonic, retries: int = 1,
                 retry_backoff_s: float = 0.2, stall_timeout_s: float = 8.0,
                 turn_deadline_s: float | None = None) -> None:
        if not providers:
            raise ValueError("a router needs at least one provider")
        names = [p.name for p in providers]
        if len(set(names)) != len(names):
            raise ValueError(f"provider names must be unique: {names}")
        self.providers = list(providers)
        self.first_token_deadline_s = first_token_deadline_s
        # A fallback's window (None: the first provider's); never longer than the first's.
        self.fallback_first_token_deadline_s = (
            first_token_deadline_s if fallback_first_token_deadline_s is None
            else min(first_token_deadline_s, fallback_first_token_deadline_s))
        self.filler_after_ms = filler_after_ms
        self.filler_text = filler_text
        self.more_fillers = tuple(more_fillers)
        self.turn_deadline_s = turn_deadline_s  # the whole turn's (None: none), for retries
        self.ewma_alpha = ewma_alpha
        self.max_error_rate = max_error_rate
        make = breaker_factory or (lambda name: CircuitBreaker(
            name, failure_threshold=3, reset_timeout=30.0, clock=clock,
            is_failure=against_provider))
        self.health = {p.name: ProviderHealth(breaker=make(p.name)) for p in providers}
        self._clock = clock
        self.retries = retries  # extra tries on the same provider for a retryable error
        # Once it has begun, a stream silent this long has stalled: a failure after text (the
        # turn ends, and its redelivery goes on from what was said) rather than the caller
        # waiting out the whole turn deadline mid-sentence.
        self.stall_timeout_s = stall_timeout_s
        self.retry_backoff_s = retry_backoff_s

    def candidates(self, request: LlmRequest, *, max_cost: float | None = None,
                   ) -> list[LlmProvider]:
        """The providers that may serve ``request``, in the order they will be tried."""
        eligible = [p for p in self.providers
                    if (p.supports_tools or not request.tools)
                    and (max_cost is None or p.cost <= max_cost)
                    and self.health[p.name].breaker.state is not CircuitState.OPEN]
        return sorted(eligible, key=lambda p: not self._healthy(p.name))  # stable: keeps order

    def _healthy(self, name: str) -> bool:
        health = self.health[name]
        return (health.breaker.state is CircuitState.CLOSED
                and health.error_rate <= self.max_error_rate)

    async def stream(self, request: LlmRequest, *, max_cost: float | None = None,
                     filler_after_ms: float | None = None,
                     said: Collection[str] = ()) -> AsyncIterator[RouterEvent]:
        """Stream the turn; raise :class:`LlmError` if no provider could start it.

        ``filler_after_ms``: the agent's filler threshold (0: no filler; None: the router's).
        ``said``: what the turn already said (its earlier rounds, their tool filler): a filler
        among it is not said again, the next one is.
        """
        turn_started = self._clock()
        turn_end = None if self.turn_deadline_s is None else turn_started + self.turn_deadline_s
        after_ms = self.filler_after_ms if filler_after_ms is None else filler_after_ms
        heard = {text.strip() for text in said}
        # A reply going on from a prefill has begun: the caller is hearing it, and a filler
        # would come in the middle of it.
        fillers = (_Fillers([], 0.0, None) if not after_ms or after_ms <= 0 or request.prefill
                   else _Fillers([text for text in (self.filler_text, *self.more_fillers)
                                  if text.strip() not in heard], after_ms / 1000,
                                 turn_started + after_ms / 1000))
        if not fillers.texts:
            fillers.due = None
        tried: list[str] = []
        previous: tuple[str, str] | None = None
        for provider in self.candidates(request, max_cost=max_cost):
            if previous is not None:
                yield ProviderSwitched(from_provider=previous[0], to_provider=provider.name,
                                       reason=previous[1])
            health = self.health[provider.name]
            emitted = False
            # The provider's own window for a first token, its retries included.
            window = (self.first_token_deadline_s if previous is None
                      else self.fallback_first_token_deadline_s)
            window_end = self._clock() + window
            deadline = window_end if turn_end is None else min(window_end, turn_end)
            for attempt in range(1 + self.retries):
                try:
                    async with health.breaker.guard():
                        async for event in self._attempt(provider, request, fillers,
                                                         deadline, window):
                            if isinstance(event, UsageReported):
                                event = msgspec.structs.replace(event, provider=provider.name)
                            elif isinstance(event, Done):
                                event = msgspec.structs.replace(event, provider=provider.name)
                                health.record(ok=True, alpha=self.ewma_alpha,
                                              ttft_ms=event.ttft_ms)
                            elif not isinstance(event, Filler):
                                emitted = True
                            yield event
                    return
                except CircuitOpenError:
                    reason = "circuit open"
                    break
                except LlmError as exc:
                    reason = (exc.message if exc.status is None
                              else f"HTTP {exc.status}: {exc.message}")
                    if against_provider(exc):
                        health.record(ok=False, alpha=self.ewma_alpha, reason=reason)
                    if emitted:
                        raise
                    # 429/5xx: again on the same provider if the wait ends within its window
                    # and the turn's deadline, waiting at least what the provider asked for
                    backoff = max(self.retry_backoff_s * (attempt + 1), exc.retry_after_s or 0.0)
                    if (not exc.retryable or attempt == self.retries
                            or self._clock() + backoff >= deadline):
                        break
                    # The fillers keep their threshold while the backoff is waited out (a
                    # retry-after of seconds is silence to the caller too).
                    resume = self._clock() + backoff
                    while (now := self._clock()) < resume:
                        if fillers.due is not None and now >= fillers.due:
                            yield fillers.take(now)
                            continue
                        await asyncio.sleep(min(resume, fillers.due or resume) - now)
            tried.append(f"{provider.name} ({reason})")
            previous = (provider.name, reason)
        raise LlmError("router", "no provider could serve the turn: "
                       + (", ".join(tried) or "none eligible"), retryable=bool(tried))

    async def _attempt(self, provider: LlmProvider, request: LlmRequest, fillers: _Fillers,
                       first_token_by: float, window: float) -> AsyncIterator[LlmEvent | Filler]:
        """One provider's events; before the first, enforce the deadline and say the fillers."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        pump = asyncio.create_task(_pump(provider, request, queue),
                                   name=f"llm-{provider.name}")
        deadline: float | None = first_token_by
        started = False
        try:
            while True:
                if started:
                    try:
                        async with asyncio.timeout(self.stall_timeout_s):
                            item = await queue.get()
                    except TimeoutError:
                        raise LlmError(provider.name, "the stream stalled: nothing for "
                                       f"{self.stall_timeout_s:g} s") from None
                else:
                    now = self._clock()
                    wakes = [t for t in (deadline, fillers.due) if t is not None]
                    try:
                        # A timeout scope, not wait_for: that runs the get in a task of its own,
                        # and the first token would reach the turn two loop turns later.
                        async with asyncio.timeout(max(min(wakes) - now, 0) if wakes else None):
                            item = await queue.get()
                    except TimeoutError:
                        now = self._clock()
                        if fillers.due is not None and now >= fillers.due:
                            yield fillers.take(now)
                            continue
                        if deadline is not None and now >= deadline:
                            raise LlmError(provider.name,
                                           f"no first token within {window:g} s") from None
                        continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, ToolCallStarted):
                    # The model is writing a tool call: not stalled, though the caller hears
                    # nothing yet (the filler stays due).
                    deadline = None
                    continue
                if isinstance(item, UsageReported):
                    yield item  # billed, but no token yet: the deadline and filler stay due
                    continue
                if not started and _answers_the_caller(request) and (
                        isinstance(item, Done) or isinstance(item, TextDelta)
                        and not item.text.strip()):
                    if isinstance(item, Done):
                        # Nothing to say and nothing to do, to what the caller just said: they
                        # would hear silence. The next provider; the response was billed all
                        # the same, as its end says (not only as it began).
                        yield UsageReported(usage=item.usage, estimated=item.estimated,
                                            final=True)
                        raise LlmError(provider.name, "an empty reply (no text, no tool call)",
                                       retryable=False)
                    continue  # leading whitespace: not yet a reply
                started = True
                fillers.due = None  # the reply has begun: no more fillers
                yield item  # type: ignore[misc]
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump


def _answers_the_caller(request: LlmRequest) -> bool:
    """Whether the reply answers the caller's words, so saying nothing is no answer.

    Not after a tool result (having sent DTMF into a phone menu, waiting silently for its next
    prompt is right), nor continuing a reply already begun (a prefill: nothing to add is fine).
    """
    return (not request.prefill and bool(request.messages)
            and isinstance(request.messages[-1], UserMessage))


def against_provider(exc: BaseException) -> bool:
    """Whether a failure says the provider is unwell, not that this one request was refused.

    Counted: connection failures, timeouts, 429 and 5xx (retryable), and 401/403/404 (a bad key
    or a missing model fail every request). Not counted: other 4xx and non-retryable errors
    without a status (what the model sent back for this request could not be used).
    """
    if not isinstance(exc, LlmError) or exc.retryable:
        return True
    return exc.status in (401, 403, 404)


async def _pump(provider: LlmProvider, request: LlmRequest, queue: asyncio.Queue[object]) -> None:
    """Run ``provider``'s stream to the end in this task, handing events (or its error) over."""
    events = provider.stream(request)
    try:
        async for event in events:
            queue.put_nowait(event)
            # Let the consumer have it now: events that arrived together (a burst in one read)
            # would otherwise all be parsed before the first is handed over.
            await asyncio.sleep(0)
    except LlmError as exc:
        queue.put_nowait(exc)
    except Exception as exc:  # a provider bug must not hang the turn: report it as a failure
        queue.put_nowait(LlmError(provider.name, f"unexpected {exc!r}", retryable=True))
    else:
        queue.put_nowait(_END)
    finally:  # on cancellation too: closes the provider's HTTP stream
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()
