import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.llm.base import (
    Done,
    Filler,
    LlmError,
    LlmRequest,
    ProviderSwitched,
    TextDelta,
    ToolCall,
    ToolCallStarted,
    ToolResult,
    ToolSpec,
    ToolUse,
    UsageReported,
    UserMessage,
)
from parley.brain.llm.local_responder import LocalResponder
from parley.brain.llm.openai_compat import OpenAICompatLlm
from parley.brain.llm.router import LlmRouter, RouterEvent
from parley.common.resilience import CircuitBreaker, CircuitState
from parley.devkit.emulators.anthropic import (
    AnthropicEmulator,
    ScriptedReply,
    ScriptedToolUse,
)
from parley.devkit.emulators.openai_compat import OpenAICompatEmulator

REQUEST = LlmRequest(messages=(UserMessage(text="Hello"),))


class FakeProvider:
    """A provider whose timing and failures a test controls."""

    def __init__(self, name: str, *, text: str = "Hello there.", delay_s: float = 0.0,
                 fail_status: int | None = None, fail_after_text: bool = False,
                 stall_after_text_s: float = 0.0,
                 supports_tools: bool = True, cost: float = 1.0) -> None:
        self.name = name
        self.cost = cost
        self.supports_tools = supports_tools
        self.text = text
        self.delay_s = delay_s
        self.fail_status = fail_status
        self.fail_after_text = fail_after_text
        self.stall_after_text_s = stall_after_text_s
        self.calls = 0
        self.closed = 0

    async def stream(self, request: LlmRequest) -> AsyncIterator[TextDelta | Done]:
        self.calls += 1
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail_status is not None:
                raise LlmError(self.name, "boom", status=self.fail_status)
            yield TextDelta(text=self.text)
            if self.fail_after_text:
                raise LlmError(self.name, "connection reset", retryable=True)
            await asyncio.sleep(self.stall_after_text_s)
            yield Done(ttft_ms=self.delay_s * 1000)
        finally:
            self.closed += 1


async def collect(router: LlmRouter, request: LlmRequest = REQUEST,
                  **kwargs: float) -> list[RouterEvent]:
    async with aclosing(router.stream(request, **kwargs)) as events:  # type: ignore[arg-type]
        return [event async for event in events]


def text_of(events: list[RouterEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def test_the_first_healthy_provider_serves() -> None:
    first, second = FakeProvider("a", text="From A."), FakeProvider("b")
    events = await collect(LlmRouter([first, second]))
    assert text_of(events) == "From A." and second.calls == 0
    done = events[-1]
    assert isinstance(done, Done) and done.provider == "a"


async def test_falls_back_from_anthropic_500_to_the_local_responder() -> None:
    emulator = AnthropicEmulator(api_key="k")
    await emulator.start()
    claude = AnthropicLlm(api_key="k", base_url=emulator.base_url)
    try:
        emulator.faults.fail_next(500)
        router = LlmRouter([claude, LocalResponder()], retries=0)
        events = await collect(router)
        assert events[0] == ProviderSwitched(from_provider="anthropic", to_provider="local",
                                             reason="HTTP 500: Internal server error")
        assert text_of(events) == "Hi! How can I help you today?"
        done = events[-1]
        assert isinstance(done, Done) and done.provider == "local" and done.intent == "greeting"
        assert router.health["anthropic"].error_rate > 0
        assert router.health["anthropic"].failures == ["HTTP 500: Internal server error"]

        emulator.script(ScriptedReply(text="Claude again."))  # healthy again: back to first
        events = await collect(router)
        assert text_of(events) == "Claude again." and events[-1].provider == "anthropic"  # type: ignore[union-attr]
    finally:
        await claude.aclose()
        await emulator.stop()


async def test_a_429_is_retried_on_the_same_provider_within_the_deadline() -> None:
    emulator = AnthropicEmulator(api_key="k")
    await emulator.start()
    claude = AnthropicLlm(api_key="k", base_url=emulator.base_url)
    try:
        emulator.faults.fail_next(429)
        emulator.script(ScriptedReply(text="Second time lucky."))
        router = LlmRouter([claude, LocalResponder()], retry_backoff_s=0.05)
        events = await collect(router)
        assert not any(isinstance(e, ProviderSwitched) for e in events)
        assert text_of(events) == "Second time lucky." and events[-1].provider == "anthropic"
        assert len(emulator.requests) == 2
    finally:
        await claude.aclose()
        await emulator.stop()


async def test_a_429_whose_retry_after_outlasts_the_window_falls_back_at_once() -> None:
    """Anthropic's 429 says when to come back (``retry-after``, whole seconds).

    The router retried after its own 0.2 s backoff, which the real API answers with another
    429 (the limit has not let up): a wasted round trip before the fallback, and one more
    request counted against the limit. Now a retry waits at least what the API asked, so a
    wait past the provider's window goes to the next provider at once.
    """
    emulator = AnthropicEmulator(api_key="k")
    await emulator.start()
    claude = AnthropicLlm(api_key="k", base_url=emulator.base_url)
    try:
        emulator.faults.fail_next(429, times=5, retry_after_s=30)
        router = LlmRouter([claude, LocalResponder()], retry_backoff_s=0.05)
        events = await collect(router)
        switched = events[0]
        assert isinstance(switched, ProviderSwitched) and switched.to_provider == "local"
        assert len(emulator.requests) == 1
        assert emulator.headers and text_of(events)
    finally:
        await claude.aclose()
        await emulator.stop()


async def test_a_429_is_retried_once_its_retry_after_has_passed() -> None:
    emulator = AnthropicEmulator(api_key="k")
    await emulator.start()
    claude = AnthropicLlm(api_key="k", base_url=emulator.base_url)
    try:
        emulator.faults.fail_next(429, retry_after_s=1)
        emulator.script(ScriptedReply(text="Worth the wait."))
        router = LlmRouter([claude, LocalResponder()], retry_backoff_s=0.05,
                           filler_after_ms=None)
        started = time.monotonic()
        events = await collect(router)
        assert text_of(events) == "Worth the wait." and events[-1].provider == "anthropic"  # type: ignore[union-attr]
        assert len(emulator.requests) == 2 and time.monotonic() - started >= 1.0
    finally:
        await claude.aclose()
        await emulator.stop()


async def test_the_fillers_keep_their_threshold_while_a_429_waits_out_its_retry_after() -> None:
    """A 429 asked for 2 s, retried within the window: the caller still hears the fillers.

    The router slept out the backoff without saying them, so the first filler, due at 0.4 s,
    came only as the retry began (2 s of silence): the silence the fillers are there to break.
    """
    emulator = AnthropicEmulator(api_key="k")
    await emulator.start()
    claude = AnthropicLlm(api_key="k", base_url=emulator.base_url)
    try:
        emulator.faults.fail_next(429, retry_after_s=2)
        emulator.script(ScriptedReply(text="Worth the wait."))
        router = LlmRouter([claude, LocalResponder()], retry_backoff_s=0.05,
                           first_token_deadline_s=5, filler_after_ms=400)
        started = time.monotonic()
        heard: list[tuple[float, RouterEvent]] = []
        async with aclosing(router.stream(REQUEST)) as events:
            async for event in events:
                heard.append((time.monotonic() - started, event))
        fillers = [(at, e.text) for at, e in heard if isinstance(e, Filler)]
        assert [text for _, text in fillers][:2] == ["One moment.",
                                                     "Sorry, just a moment longer."]
        assert fillers[0][0] < 1.5 and fillers[1][0] < 1.9  # (due at 0.4 s and 0.8 s)
        assert text_of([e for _, e in heard]) == "Worth the wait."
        assert len(emulator.requests) == 2 and heard[-1][0] >= 2.0
    finally:
        await claude.aclose()
        await emulator.stop()


async def test_a_stalled_stream_is_abandoned_and_closed_at_the_deadline() -> None:
    emulator = AnthropicEmulator(api_key="k")
    await emulator.start()
    claude = AnthropicLlm(api_key="k", base_url=emulator.base_url)
    try:
        emulator.faults.stall = True
        router = LlmRouter([claude, LocalResponder()], first_token_deadline_s=0.3,
                           filler_after_ms=None)
        billed, *events = await collect(router)
        # The abandoned response was billed its input, passed on for the turn to record; it
        # is no first token, so the deadline was kept.
        assert isinstance(billed, UsageReported) and billed.provider == "anthropic"
        assert billed.usage.input_tokens > 0
        assert events[0] == ProviderSwitched(from_provider="anthropic", to_provider="local",
                                             reason="no first token within 0.3 s")
        assert text_of(events) == "Hi! How can I help you today?"
        for _ in range(100):
            if emulator.aborted:
                break
            await asyncio.sleep(0.01)
        assert emulator.aborted, "the stalled HTTP stream was left open"
    finally:
        await claude.aclose()
        await emulator.stop()


async def test_a_filler_is_said_once_when_the_first_token_is_slow() -> None:
    slow = FakeProvider("slow", delay_s=0.3, text="Here you go.")
    events = await collect(LlmRouter([slow], filler_after_ms=250, first_token_deadline_s=2))
    assert events[0] == Filler(text="One moment.")
    assert sum(isinstance(e, Filler) for e in events) == 1  # the next was due at 0.5 s
    assert text_of(events) == "Here you go."

    fast = FakeProvider("fast")
    events = await collect(LlmRouter([fast], filler_after_ms=200))
    assert not any(isinstance(e, Filler) for e in events)


async def test_filler_then_fallback_when_the_deadline_passes() -> None:
    stuck, backup = FakeProvider("stuck", delay_s=5), FakeProvider("backup", text="Backup.")
    router = LlmRouter([stuck, backup], filler_after_ms=120, first_token_deadline_s=0.2)
    events = await collect(router)
    assert [type(e) for e in events] == [Filler, ProviderSwitched, TextDelta, Done]
    assert text_of(events) == "Backup." and stuck.closed == 1  # its stream was cancelled


async def test_the_breaker_opens_after_repeated_failures() -> None:
    broken, backup = FakeProvider("broken", fail_status=503), FakeProvider("backup")
    router = LlmRouter([broken, backup], breaker_factory=lambda name: CircuitBreaker(
        name, failure_threshold=3, reset_timeout=60))
    for _ in range(3):
        assert text_of(await collect(router)) == "Hello there."
    assert broken.calls == 3
    assert router.health["broken"].breaker.state is CircuitState.OPEN
    events = await collect(router)
    assert broken.calls == 3 and not any(isinstance(e, ProviderSwitched) for e in events)
    assert [p.name for p in router.candidates(REQUEST)] == ["backup"]


async def test_a_refused_request_does_not_count_against_the_provider() -> None:
    # One call's bad request (redelivered turn after turn) must not open the breaker for all.
    refusing = FakeProvider("main", fail_status=400)
    router = LlmRouter([refusing])
    for _ in range(5):
        with pytest.raises(LlmError, match="HTTP 400"):
            await collect(router)
    health = router.health["main"]
    assert refusing.calls == 5 and health.breaker.state is CircuitState.CLOSED
    assert health.error_rate == 0.0
    refusing.fail_status = None  # the next call's request is fine: it is served
    assert text_of(await collect(router)) == "Hello there."

    # A bad key fails every request: that one does count.
    unauthorised = FakeProvider("main", fail_status=401)
    router = LlmRouter([unauthorised])
    for _ in range(3):
        with pytest.raises(LlmError, match="HTTP 401"):
            await collect(router)
    assert router.health["main"].breaker.state is CircuitState.OPEN


async def test_a_failure_after_text_is_not_retried_elsewhere() -> None:
    flaky, backup = FakeProvider("flaky", fail_after_text=True), FakeProvider("backup")
    router = LlmRouter([flaky, backup])
    received: list[RouterEvent] = []
    with pytest.raises(LlmError) as caught:
        async for event in router.stream(REQUEST):
            received.append(event)
    assert text_of(received) == "Hello there." and caught.value.provider == "flaky"
    assert backup.calls == 0 and router.health["flaky"].error_rate > 0


async def test_capability_and_cost_narrow_the_choice() -> None:
    no_tools = FakeProvider("no-tools", supports_tools=False, cost=0.1)
    pricey = FakeProvider("pricey", cost=5.0)
    cheap = FakeProvider("cheap", cost=0.5, text="Cheap.")
    router = LlmRouter([no_tools, pricey, cheap])
    with_tools = LlmRequest(messages=REQUEST.messages, tools=(ToolSpec(name="end_call"),))
    assert [p.name for p in router.candidates(with_tools)] == ["pricey", "cheap"]
    assert [p.name for p in router.candidates(with_tools, max_cost=1)] == ["cheap"]
    assert text_of(await collect(router, with_tools, max_cost=1)) == "Cheap."

    broken = FakeProvider("broken", fail_status=400)
    with pytest.raises(LlmError) as caught:
        await collect(LlmRouter([broken]))
    assert "broken (HTTP 400: boom)" in caught.value.message


async def test_unhealthy_providers_go_last() -> None:
    first, second = FakeProvider("first"), FakeProvider("second")
    router = LlmRouter([first, second])
    router.health["first"].error_rate = 0.9
    assert [p.name for p in router.candidates(REQUEST)] == ["second", "first"]


async def test_cancelling_the_consumer_cancels_the_provider() -> None:
    slow = FakeProvider("slow", delay_s=5)
    router = LlmRouter([slow], filler_after_ms=None, first_token_deadline_s=10)
    task = asyncio.create_task(collect(router))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slow.closed == 1
    assert router.health["slow"].breaker.state is CircuitState.CLOSED
    assert router.health["slow"].error_rate == 0


@pytest.mark.parametrize("vendor", ["anthropic", "openai"])
async def test_a_tool_call_being_written_is_not_taken_for_a_stalled_provider(
        vendor: str) -> None:
    # A model that answers with a tool call streams its arguments, which become one ToolCall
    # only once complete: the router saw nothing until then and, past the first-token
    # deadline, dropped a provider that was streaming, counted it as failing (its breaker
    # opens after three such turns), and answered the booking with the local responder.
    emulator: AnthropicEmulator | OpenAICompatEmulator
    llm: AnthropicLlm | OpenAICompatLlm
    if vendor == "anthropic":
        emulator = AnthropicEmulator(api_key="k", tokens_per_second=25)
        await emulator.start()
        llm = AnthropicLlm(api_key="k", base_url=emulator.base_url)
    else:
        emulator = OpenAICompatEmulator(api_key="k", tokens_per_second=25)
        await emulator.start()
        llm = OpenAICompatLlm(base_url=f"{emulator.base_url}/v1", model="m", api_key="k")
    booking = {"day": "Tuesday", "time": "10:30", "patient": "Jane Doe",
               "reason": "cleaning and a check-up"}
    try:
        emulator.script(ScriptedReply(tool_uses=(
            ScriptedToolUse(name="book_appointment", input=booking, id="toolu_1"),)))
        router = LlmRouter([llm, LocalResponder()], first_token_deadline_s=0.3,
                           filler_after_ms=None)
        events = await collect(router, LlmRequest(
            messages=(UserMessage(text="Book me in Tuesday at 10:30"),),
            tools=(ToolSpec(name="book_appointment"),)))
        assert not any(isinstance(e, ProviderSwitched | ToolCallStarted) for e in events)
        assert [e for e in events if isinstance(e, ToolCall)] == [
            ToolCall(id="toolu_1", name="book_appointment", arguments=booking)]
        assert events[-1].provider == vendor  # type: ignore[union-attr]
        assert router.health[vendor].error_rate == 0
    finally:
        await llm.aclose()
        await emulator.stop()


async def test_an_empty_reply_falls_back_rather_than_leaving_silence() -> None:
    # Models sometimes answer with nothing at all (after a tool result, typically): no text,
    # no tool call. The turn completed and the caller heard silence.
    emulator = AnthropicEmulator(api_key="k")
    await emulator.start()
    claude = AnthropicLlm(api_key="k", base_url=emulator.base_url)
    try:
        router = LlmRouter([claude, LocalResponder()], retries=0)
        for empty in ("", "  \n"):
            emulator.script(ScriptedReply(text=empty))
            billed, ended, *events = await collect(router)
            assert isinstance(billed, UsageReported)  # the empty reply was billed all the same
            assert ended.final and ended.provider == "anthropic"  # ... as its end said
            assert events[0] == ProviderSwitched(
                from_provider="anthropic", to_provider="local",
                reason="an empty reply (no text, no tool call)")
            assert text_of(events) == "Hi! How can I help you today?"
        assert router.health["anthropic"].failures == []  # the provider is not unwell
        # Continuing a reply (a prefill), having nothing to add is fine; so is silence after a
        # tool result (digits sent into a phone menu: wait for its next prompt).
        emulator.script(ScriptedReply(text=""))
        events = await collect(router, LlmRequest(messages=REQUEST.messages, prefill="Sure."))
        assert [type(e) for e in events] == [UsageReported, Done]
        assert events[-1].provider == "anthropic"
        emulator.script(ScriptedReply(text=""))
        after_tool = LlmRequest(messages=(
            *REQUEST.messages, ToolUse(id="toolu_1", name="send_dtmf", arguments={"digits": "1"}),
            ToolResult(tool_use_id="toolu_1", content='{"ok": true}')))
        events = await collect(router, after_tool)
        assert [type(e) for e in events] == [UsageReported, Done]
        assert events[-1].provider == "anthropic"
    finally:
        await claude.aclose()
        await emulator.stop()


async def test_a_stream_that_stalls_mid_reply_fails_instead_of_holding_the_turn() -> None:
    # Text went out, then the socket went quiet (no close): before, the caller waited out the
    # 30 s turn deadline mid-sentence; now the turn fails (and its redelivery goes on from
    # what was said).
    stuck = FakeProvider("stuck", stall_after_text_s=30)
    router = LlmRouter([stuck, FakeProvider("backup")], stall_timeout_s=0.3)
    received: list[RouterEvent] = []
    started = time.monotonic()
    with pytest.raises(LlmError, match="stalled") as caught:
        async for event in router.stream(REQUEST):
            received.append(event)
    assert time.monotonic() - started < 2
    assert text_of(received) == "Hello there." and caught.value.provider == "stuck"
    await asyncio.sleep(0)
    assert stuck.closed == 1  # its stream was closed, not left hanging


async def timed(router: LlmRouter, **kwargs: object) -> list[tuple[float, RouterEvent]]:
    started = time.monotonic()
    async with aclosing(router.stream(REQUEST, **kwargs)) as events:  # type: ignore[arg-type]
        return [(time.monotonic() - started, event) async for event in events]


async def test_providers_failing_in_turn_never_leave_the_caller_silent_past_the_threshold(
        ) -> None:
    # Two providers that hang, then the local responder. The filler was said once, at the
    # threshold, and each provider had the whole first-token deadline: with the defaults, the
    # caller heard "One moment." at 1.2 s, then silence until 6 s. Now a different filler follows
    # each further threshold of silence (a few at most), and a fallback gets a shorter window.
    first, second = FakeProvider("a", delay_s=30), FakeProvider("b", delay_s=30)
    router = LlmRouter([first, second, LocalResponder()], filler_after_ms=300,
                       first_token_deadline_s=1.0, fallback_first_token_deadline_s=0.5)
    events = await timed(router)
    kinds = [type(e) for _, e in events if not isinstance(e, TextDelta)]
    assert kinds == [Filler, Filler, Filler, ProviderSwitched, ProviderSwitched, Done]
    fillers = [(at, e.text) for at, e in events if isinstance(e, Filler)]
    assert [text for _, text in fillers] == ["One moment.", "Sorry, just a moment longer.",
                                             "Thanks for bearing with me."]
    assert all(later - earlier >= 0.28 for (earlier, _), (later, _) in zip(
        fillers, fillers[1:], strict=False))  # a threshold apart, not bunched
    switched = [e for _, e in events if isinstance(e, ProviderSwitched)]
    assert [s.reason for s in switched] == ["no first token within 1 s",
                                            "no first token within 0.5 s"]
    answered = next(at for at, e in events if isinstance(e, TextDelta))
    assert 1.4 <= answered < 1.9  # the local responder at ~1.5 s, not 2.0 s
    assert first.closed == second.closed == 1


async def test_the_agents_filler_threshold_is_used_over_the_routers() -> None:
    slow = FakeProvider("slow", delay_s=0.4, text="Here you go.")
    router = LlmRouter([slow], filler_after_ms=5000)
    events = await collect(router, filler_after_ms=100)
    assert events[0] == Filler(text="One moment.") and text_of(events) == "Here you go."
    events = await collect(router, filler_after_ms=0)
    assert not any(isinstance(e, Filler) for e in events)


class FlakyProvider(FakeProvider):
    """Answers 429 its first ``failures`` times, at once; then as a FakeProvider."""

    def __init__(self, name: str, failures: int, **kwargs: object) -> None:
        super().__init__(name, **kwargs)  # type: ignore[arg-type]
        self.failures = failures

    async def stream(self, request: LlmRequest) -> AsyncIterator[TextDelta | Done]:
        if self.failures:
            self.failures -= 1
            self.calls += 1
            raise LlmError(self.name, "rate limited", status=429)
        async for event in super().stream(request):
            yield event


async def test_a_fallback_is_retried_on_a_429_in_its_own_window() -> None:
    # The retry's budget was the time since the turn began against the first-token deadline:
    # once the first provider had used its deadline, the second was never retried on a 429,
    # and the turn went to the third (or failed).
    stuck, busy = FakeProvider("stuck", delay_s=30), FlakyProvider("busy", 1, text="Busy one.")
    router = LlmRouter([stuck, busy, FakeProvider("last", text="Last.")],
                       first_token_deadline_s=0.5, filler_after_ms=None, retry_backoff_s=0.05)
    events = await collect(router)
    assert text_of(events) == "Busy one." and events[-1].provider == "busy"  # type: ignore[union-attr]
    assert busy.calls == 2


async def test_429s_are_retried_only_within_the_turns_deadline() -> None:
    # Retried while a backoff ends within the turn's deadline, not the first-token deadline's
    # turn-long budget: a turn whose deadline is near does not sleep past it.
    busy = FlakyProvider("busy", 100)
    router = LlmRouter([busy], first_token_deadline_s=30, retries=10, retry_backoff_s=0.1,
                       filler_after_ms=None, turn_deadline_s=0.5)
    with pytest.raises(LlmError):
        await collect(router)
    assert busy.calls == 3  # at 0, 0.1 and 0.3 s; the next (0.6 s) is past the deadline
