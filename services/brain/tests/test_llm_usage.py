"""What a turn's LLM requests were billed: ``usage.recorded`` per round, summed on completion.

A round that called tools threw its usage away, so ``turn.completed`` carried only the last
round's tokens (and the last round's time to first token), and a cancelled turn reported none
though its request was billed. Each round now records what its responses were billed as
``usage.recorded`` (input, output, cache read and cache write tokens, per provider); the turn's
completion sums its rounds from those events, whichever instance ran them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from parley.brain import worker as brain_worker
from parley.brain.conversation import fold
from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.llm.base import (
    Done,
    Filler,
    LlmEvent,
    LlmRequest,
    ProviderSwitched,
    TextDelta,
    Usage,
    UsageReported,
)
from parley.brain.llm.local_responder import LocalResponder
from parley.brain.usage import RoundUsage, usage_recorded
from parley.brain.worker import BrainWorker
from parley.common.bus import Bus
from parley.common.events import (
    AgentSay,
    AgentSpeechInterrupted,
    SpeechStarted,
    ToolCompleted,
    ToolFailed,
    ToolRequested,
    TranscriptFinal,
    TurnCompleted,
    TurnUserEnded,
    UsageRecorded,
)
from parley.devkit.emulators.anthropic import (
    ScriptedReply,
    ScriptedToolUse,
    count_tokens,
    prompt_tokens,
)
from parley.devkit.infra import NatsServer

from .conftest import (
    ORG,
    SETTINGS,
    conversation,
    open_call,
    openai_llm,
    running_brain,
    services,
    turn_context,
    user_says,
)

KINDS = {"llm_input_tokens": "input_tokens", "llm_output_tokens": "output_tokens",
         "llm_cache_read_tokens": "cache_read_tokens",
         "llm_cache_write_tokens": "cache_write_tokens"}


# A prompt long enough for the API to cache (Haiku 4.5, the default model, caches a prefix of
# 4096 tokens or more; the emulator counts words).
LONG = msgspec.structs.replace(SETTINGS, prompt=SETTINGS.prompt + " Be kind." * 2100)


async def long_prompt(org_id: str, agent_id: str) -> Any:
    return LONG


def billed_input(request: dict[str, Any]) -> int:
    """An Anthropic request's input with SETTINGS' short prompt and a short call: below the
    minimum the API caches, the whole prompt is billed as input."""
    return prompt_tokens(request)


class Metered:
    """The Anthropic provider, keeping the usage of every response it finished."""

    def __init__(self, inner: AnthropicLlm) -> None:
        self.inner = inner
        self.name, self.cost, self.supports_tools = inner.name, inner.cost, inner.supports_tools
        self.done: list[Done] = []

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmEvent]:
        async for event in self.inner.stream(request):
            if isinstance(event, Done):
                self.done.append(event)
            yield event


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def recorded_totals(recorder, call_id: str) -> Counter[str]:
    """The call's usage.recorded summed per kind (all of it the brain's, for turn t1)."""
    totals: Counter[str] = Counter()
    for usage in recorder.of("usage.recorded", call_id):
        assert (usage.turn_id, usage.provider, usage.unit) == ("t1", "anthropic", "tokens")
        totals[usage.kind] += usage.quantity
    return totals


def as_totals(completed: TurnCompleted) -> Counter[str]:
    return Counter({kind: getattr(completed.usage, field) for kind, field in KINDS.items()
                    if getattr(completed.usage, field)})


async def test_a_turn_whose_rounds_ran_on_two_instances_completes_with_all_their_usage(
        bus, pool, emulator, recorder) -> None:
    """Round 0 (a slow first token, then a tool call) runs on one instance, round 1 (after the
    tool's outcome) on another. turn.completed carried round 1's tokens and round 1's time to
    first token only. Now it carries both rounds' tokens, summed from the usage.recorded each
    round published, and the first round's time to first token (what the caller waited)."""
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    metered = Metered(llm)
    emulator.script(
        ScriptedReply(text="Let me check the calendar.", tool_uses=(ScriptedToolUse(
            name="book_appointment", input={"day": "Friday", "time": "10:00"}, id="toolu_1"),)),
        ScriptedReply(text="You're booked for Friday at ten."))
    emulator.ttft_s = 0.3
    first = BrainWorker(services(bus, pool, [metered], agents=long_prompt))
    await first.start()
    try:
        await open_call(bus, "c-rounds")
        await user_says(bus, "c-rounds", "t1", "Can I come Friday at ten?")
        await recorder.wait("tool.requested", "c-rounds")
    finally:
        await first.stop()
    emulator.ttft_s = 0.0
    second = BrainWorker(services(bus, pool, [metered], agents=long_prompt))
    await second.start()
    try:
        await bus.publish(ToolCompleted(org_id=ORG, call_id="c-rounds", tool_call_id="toolu_1",
                                        name="book_appointment", result={"booked": True}))
        done, = await recorder.wait("turn.completed", "c-rounds")
        assert second.replays == 1  # it knew nothing of the call: the sum came from events
    finally:
        await second.stop()
        await llm.aclose()
    assert len(metered.done) == 2
    billed = Counter({kind: sum(getattr(d.usage, field) for d in metered.done)
                      for kind, field in KINDS.items()})
    assert billed["llm_input_tokens"] and billed["llm_output_tokens"]
    assert billed["llm_cache_write_tokens"]  # round 0's system prompt, cached
    assert billed["llm_cache_read_tokens"]  # and read by round 1
    assert as_totals(done) == +billed
    assert recorded_totals(recorder, "c-rounds") == +billed
    assert done.ttft_ms >= 300 and done.llm_wait_ms >= 300  # round 0's: the caller's wait
    assert not done.cancelled and done.provider == "anthropic"


async def test_an_interrupted_turn_reports_what_its_request_was_billed(
        bus, pool, emulator, recorder) -> None:
    """The caller barged in while the reply streamed: the request's input tokens were billed,
    yet the cancelled turn.completed said zero and nothing was recorded. Now what the provider
    reported when the response began is recorded and completes the turn."""
    emulator.tokens_per_second = 20
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm], agents=long_prompt))
    await worker.start()
    try:
        emulator.script(ScriptedReply(text="Our hours are eight to five on weekdays, " * 8))
        await open_call(bus, "c-cut")
        await user_says(bus, "c-cut", "t1", "What are your hours?")
        await recorder.wait("agent.say", "c-cut", where=lambda e: e.turn_id == "t1")
        await bus.publish(AgentSpeechInterrupted(org_id=ORG, call_id="c-cut", turn_id="t1",
                                                 played_text="Our hours are"))
        done, = await recorder.wait("turn.completed", "c-cut")
        assert done.cancelled
    finally:
        await worker.stop()
        await llm.aclose()
    request, = emulator.requests
    # the tools, the prompt and the conversation up to the caller's words, cached by this
    # request; after them, the turn's context (the greeting, stored after the words here, is
    # history before them: the request ends with the caller's turn)
    assert conversation(request)[-1] == {"role": "user", "content": "What are your hours?"}
    assert done.usage.cache_write_tokens > 4096
    assert done.usage.input_tokens == prompt_tokens(request) - done.usage.cache_write_tokens
    assert done.usage.input_tokens >= count_tokens(turn_context(request)) > 0
    assert done.provider == "anthropic"
    assert recorded_totals(recorder, "c-cut") == as_totals(done)


async def test_a_round_asked_again_after_a_failure_records_both_requests(
        bus, pool, emulator, recorder) -> None:
    """The reply broke off mid-stream (overloaded) and the redelivered turn asked the model
    again: two billed requests. Both are recorded, each under its own ids, and summed."""
    reply = "We open at eight. We close at five. A cleaning is ninety five dollars."

    def recovered(body: dict) -> ScriptedReply:
        emulator.faults.error_after_tokens = None
        return ScriptedReply(text=reply)

    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        await open_call(bus, "c-again")
        await recorder.wait("agent.say", "c-again")
        emulator.faults.error_after_tokens = 9
        emulator.script(ScriptedReply(text=reply), recovered)
        await user_says(bus, "c-again", "t1", "Tell me about the clinic.")
        done, = await recorder.wait("turn.completed", "c-again")
    finally:
        await worker.stop()
        await llm.aclose()
    first, second = emulator.requests
    assert done.usage.input_tokens == billed_input(first) + billed_input(second)
    assert recorded_totals(recorder, "c-again") == as_totals(done)
    assert len({u.id for u in recorder.of("usage.recorded", "c-again")}) == len(
        recorder.of("usage.recorded", "c-again"))


def test_each_completion_sums_the_rounds_since_the_turn_was_taken_up() -> None:
    """A failed hand-off takes its turn up again and the turn completes once more: that
    completion reports the rounds after the hand-off's, which the first one reported, whether
    the failure is stored before the first completion or after it."""
    def usage(kind: str, quantity: float) -> UsageRecorded:
        return UsageRecorded(org_id=ORG, call_id="c", turn_id="t1", kind=kind,
                             quantity=quantity, unit="tokens", provider="anthropic")

    asked = TurnUserEnded(org_id=ORG, call_id="c", turn_id="t1", text="Put me through.")
    hand_off = [usage("llm_input_tokens", 120), usage("llm_output_tokens", 9),
                ToolRequested(org_id=ORG, call_id="c", turn_id="t1", tool_call_id="x",
                              name="transfer_call", ttft_ms=250.0, llm_wait_ms=240.0)]
    turn = fold("c", [asked, *hand_off]).turn("t1")
    assert turn.rounds_since_taken_up == range(0, 1)
    assert (turn.usage_since_taken_up().input_tokens,
            turn.usage_since_taken_up().output_tokens) == (120, 9)
    assert turn.round_first_token[0] == (250.0, 240.0)

    completed = TurnCompleted(org_id=ORG, call_id="c", turn_id="t1")
    failed = ToolFailed(org_id=ORG, call_id="c", tool_call_id="x", name="transfer_call",
                        error="refused")
    for stored in ([completed, failed], [failed, completed]):
        turn = fold("c", [asked, *hand_off, *stored, usage("llm_input_tokens", 140)]).turn("t1")
        assert turn.rounds_since_taken_up == range(1, 2)
        assert (turn.usage_since_taken_up().input_tokens,
                turn.usage_since_taken_up().output_tokens) == (140, 0)
        assert turn.round_usage[0].input_tokens == 120  # the first completion's


async def test_a_speculation_that_is_not_adopted_records_what_it_was_billed(
        bus, pool, emulator, recorder) -> None:
    """Speculative replies the turn did not adopt were billed requests, but only adopted ones
    were recorded. One on other words than the turn ended with (the whole reply streamed) and
    one cut short by the caller speaking again (only its input reported, as it began) now
    record what their streams reported, under the turn they answered, marked speculative: the
    turn's completion, which sums the turn's own rounds, leaves them out."""
    emulator.tokens_per_second = 50
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    metered = Metered(llm)
    worker = BrainWorker(services(bus, pool, [metered]))
    await worker.start()
    try:
        await open_call(bus, "c-spec")
        await recorder.wait("agent.say", "c-spec")  # greeted: this instance follows the call
        emulator.script(ScriptedReply(text="Tuesday is fully booked."),
                        ScriptedReply(text="Wednesday at nine is free."))
        await bus.publish(TranscriptFinal(org_id=ORG, call_id="c-spec",
                                          text="Can I come on Tuesday?"))
        await until(lambda: emulator.completed_streams == 1)
        await user_says(bus, "c-spec", "t1", "Can I come on Wednesday?")
        completed, = await recorder.wait("turn.completed", "c-spec")
        assert "adopted" not in worker.speculations.outcomes
        await asyncio.sleep(0.1)  # the follower has the completion: t2 can be speculated on

        emulator.script(ScriptedReply(text="Whitening is two hundred dollars. " * 20))
        await bus.publish(TranscriptFinal(org_id=ORG, call_id="c-spec",
                                          text="Do you do whitening?"))
        await until(lambda: len(metered.done) == 2 and len(emulator.requests) == 3)
        await asyncio.sleep(0.2)  # the response has begun (message_start), and goes on
        await bus.publish(SpeechStarted(org_id=ORG, call_id="c-spec", offset_ms=9000))
        await until(lambda: worker.speculations.outcomes.get("caller spoke") == 1)
        assert emulator.completed_streams == 2  # cut short: no Done, only what it began with
        tuesday, wednesday, whitening = (billed_input(r) for r in emulator.requests)

        every_input = tuesday + wednesday + whitening
        await until(lambda: sum(u.quantity for u in recorder.of("usage.recorded", "c-spec")
                                if u.kind == "llm_input_tokens") == every_input)

        def recorded(turn_id: str, *, speculative: bool) -> Counter[str]:
            totals: Counter[str] = Counter()
            for usage in recorder.of("usage.recorded", "c-spec"):
                if (usage.turn_id, usage.speculative) == (turn_id, speculative):
                    assert (usage.provider, usage.unit) == ("anthropic", "tokens")
                    totals[usage.kind] += usage.quantity
            return totals

        assert recorded("t2", speculative=True)["llm_input_tokens"] == whitening
        first_speculation = Counter({kind: getattr(metered.done[0].usage, field)
                                     for kind, field in KINDS.items()})
        assert metered.done[0].usage.input_tokens == tuesday
        assert recorded("t1", speculative=True) == +first_speculation
        # The turn's own request, recorded and completed as before.
        assert recorded("t1", speculative=False)["llm_input_tokens"] == wednesday
        assert as_totals(completed) == recorded("t1", speculative=False)
    finally:
        await worker.stop()
        await llm.aclose()
    ids = [u.id for u in recorder.of("usage.recorded", "c-spec")]
    assert len(set(ids)) == len(ids)


def recorded_by_estimate(recorder, call_id: str, provider: str = "openai"
                         ) -> dict[bool, Counter[str]]:
    """The call's usage.recorded summed per kind, apart for estimates and reported usage."""
    totals: dict[bool, Counter[str]] = {False: Counter(), True: Counter()}
    for usage in recorder.of("usage.recorded", call_id):
        assert (usage.turn_id, usage.provider, usage.unit) == ("t1", provider, "tokens")
        totals[usage.estimated][usage.kind] += usage.quantity
    return totals


def characters_of(request: dict) -> int:
    """What an OpenAI-compatible request holds: its messages (the system prompt among them)."""
    return len(json.dumps(request["messages"])) + len(json.dumps(request.get("tools", [])))


CUT_REPLY = "Our hours are eight to five on weekdays, and nine to noon on Saturdays. " * 6


async def barged_in_mid_reply(bus, pool, recorder, llm, call_id: str
                              ) -> tuple[AgentSay, TurnCompleted]:
    """Turn t1 of a new call, the caller barging in once its first clause is said: that clause
    and the turn's completion (cancelled)."""
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        await open_call(bus, call_id)
        await user_says(bus, call_id, "t1", "What are your hours?")
        said, *_ = await recorder.wait("agent.say", call_id, where=lambda e: e.turn_id == "t1")
        await bus.publish(AgentSpeechInterrupted(org_id=ORG, call_id=call_id, turn_id="t1",
                                                 played_text="Our hours are"))
        done, = await recorder.wait("turn.completed", call_id)
        assert done.cancelled
        await asyncio.sleep(0.1)  # nothing more is recorded
    finally:
        await worker.stop()
        await llm.aclose()
    return said, done


async def test_an_openai_compatible_turn_cut_short_records_an_estimate_of_its_usage(
        bus, pool, openai_emulator, recorder) -> None:
    """An OpenAI-compatible server reports usage only in the stream's last chunk. The caller
    barged in mid-reply: the server had billed the prompt and the words it generated, yet the
    cancelled turn recorded nothing and its turn.completed said zero. Now the turn records an
    estimate, marked so: the input from the request's characters, the output from the reply's
    characters received before the cut."""
    openai_emulator.tokens_per_second = 20
    openai_emulator.script(ScriptedReply(text=CUT_REPLY))
    said, done = await barged_in_mid_reply(bus, pool, recorder, openai_llm(openai_emulator),
                                           "c-oa-cut")
    request, = openai_emulator.requests
    recorded = recorded_by_estimate(recorder, "c-oa-cut")
    assert not recorded[False]  # the server reported nothing
    estimate = recorded[True]
    assert characters_of(request) / 5 < estimate["llm_input_tokens"] < characters_of(request) / 3
    assert len(said.text) / 5 < estimate["llm_output_tokens"] < len(CUT_REPLY) / 4
    assert as_totals(done) == estimate
    assert done.provider == "openai"


async def test_an_anthropic_turn_cut_short_records_an_estimate_of_its_output(
        bus, pool, emulator, recorder) -> None:
    """Anthropic reports a response's input as it begins and its output only at its end
    (message_delta). The caller barged in mid-reply: the words generated by then were billed,
    but only the input was recorded. Now the output received is recorded as an estimate."""
    emulator.tokens_per_second = 20
    emulator.script(ScriptedReply(text=CUT_REPLY))
    said, done = await barged_in_mid_reply(
        bus, pool, recorder, AnthropicLlm(api_key="sk-test", base_url=emulator.base_url),
        "c-an-cut")
    request, = emulator.requests
    recorded = recorded_by_estimate(recorder, "c-an-cut", "anthropic")
    assert recorded[False]["llm_input_tokens"] == billed_input(request)
    assert set(recorded[True]) == {"llm_output_tokens"}
    assert len(said.text) / 5 < recorded[True]["llm_output_tokens"] < len(CUT_REPLY) / 4
    assert as_totals(done) == recorded[False] + recorded[True]


async def test_an_openai_compatible_turn_that_finished_records_only_what_the_server_reported(
        bus, pool, openai_emulator, recorder) -> None:
    """A reply that streamed to its end: the usage chunk it ends with is what the turn records
    and completes with, and no estimate besides it."""
    openai_emulator.script(ScriptedReply(text="We open at eight and close at five."))
    llm = openai_llm(openai_emulator)
    async with running_brain(bus, pool, [llm]):
        await open_call(bus, "c-oa-done")
        await user_says(bus, "c-oa-done", "t1", "What are your hours?")
        done, = await recorder.wait("turn.completed", "c-oa-done")
        await asyncio.sleep(0.1)
    request, = openai_emulator.requests
    recorded = recorded_by_estimate(recorder, "c-oa-done")
    assert not recorded[True]
    assert recorded[False] == Counter({
        "llm_input_tokens": count_tokens(request["messages"]),
        "llm_output_tokens": count_tokens("We open at eight and close at five.")})
    assert as_totals(done) == recorded[False] and not done.cancelled


async def test_an_openai_compatible_stream_dropped_mid_reply_records_an_estimate(
        bus, pool, openai_emulator, recorder) -> None:
    """The connection closed mid-reply (no usage chunk) and the redelivered turn asked again:
    the first request is recorded as an estimate, the second as the server reported it."""
    reply = "We open at eight. We close at five. A cleaning is ninety five dollars."

    def recovered(body: dict) -> ScriptedReply:
        openai_emulator.cut_after_tokens = None
        return ScriptedReply(text=reply)

    llm = openai_llm(openai_emulator)
    async with running_brain(bus, pool, [llm]):
        await open_call(bus, "c-oa-drop")
        await recorder.wait("agent.say", "c-oa-drop")
        openai_emulator.cut_after_tokens = 9
        openai_emulator.script(ScriptedReply(text=reply), recovered)
        await user_says(bus, "c-oa-drop", "t1", "Tell me about the clinic.")
        done, = await recorder.wait("turn.completed", "c-oa-drop")
    first, second = openai_emulator.requests[-2:]
    recorded = recorded_by_estimate(recorder, "c-oa-drop")
    assert characters_of(first) / 5 < recorded[True]["llm_input_tokens"] < (
        characters_of(first) / 3)
    assert 0 < recorded[True]["llm_output_tokens"] < len(reply) / 4
    assert recorded[False]["llm_input_tokens"] == count_tokens(second["messages"])
    assert as_totals(done) == recorded[True] + recorded[False]


async def test_an_empty_reply_that_fell_back_records_what_the_server_billed_for_it(
        bus, pool, openai_emulator, recorder) -> None:
    """The OpenAI-compatible server answered with nothing but whitespace, and the router fell
    back to the local responder. The server had billed that response (its usage chunk came),
    yet only the estimate made as it began was recorded: its Done, with the server's usage,
    was dropped with the empty reply, so billing counted a guess. Now the response is recorded
    as the server reported it, and no estimate besides."""
    openai_emulator.script(ScriptedReply(text="  \n"))
    llm = openai_llm(openai_emulator)
    async with running_brain(bus, pool, [llm, LocalResponder()]):
        await open_call(bus, "c-oa-empty")
        await recorder.wait("agent.say", "c-oa-empty")  # the greeting
        await user_says(bus, "c-oa-empty", "t1", "What are your hours?")
        done, = await recorder.wait("turn.completed", "c-oa-empty")
        await asyncio.sleep(0.1)
    request, = openai_emulator.requests
    recorded: dict[tuple[str, bool], Counter[str]] = {}
    for usage in recorder.of("usage.recorded", "c-oa-empty"):
        recorded.setdefault((usage.provider, usage.estimated), Counter())[usage.kind] += (
            usage.quantity)
    assert recorded == {("openai", False): Counter(
        {"llm_input_tokens": count_tokens(request["messages"])})}
    assert done.provider == "local" and not done.cancelled
    assert as_totals(done) == recorded["openai", False]


def test_an_estimate_counts_its_response_output_only_and_is_recorded_apart() -> None:
    """An OpenAI-compatible response estimated as it began, cut before its first token and
    retried on the same provider, whose retry reported its usage; then a fallback to a provider
    that reports none. The estimate gets the first response's output only (not the fallback's
    text, and not past the filler), and it is recorded apart from the reported usage of the
    same provider and kind, under ids of its own: the same ids would keep only one."""
    billed = RoundUsage(run=1)
    for item in (UsageReported(usage=Usage(input_tokens=100), provider="openai",
                               estimated=True),
                 Filler(text="One moment."),
                 TextDelta(text="x" * 40),  # ten tokens' worth, before the stream broke
                 UsageReported(usage=Usage(input_tokens=100), provider="openai",
                               estimated=True),
                 Done(usage=Usage(input_tokens=90, output_tokens=7), provider="openai"),
                 UsageReported(usage=Usage(input_tokens=100), provider="openai",
                               estimated=True),
                 ProviderSwitched(from_provider="openai", to_provider="local", reason="x"),
                 TextDelta(text="y" * 400),
                 Done(provider="local")):
        billed.add(item)
    recorded = usage_recorded(billed, org_id=ORG, call_id="c", turn_id="t1",
                              id_of=lambda *parts: uuid.uuid5(uuid.NAMESPACE_URL, repr(parts)))
    totals = Counter()
    for usage in recorded:
        totals[usage.provider, usage.estimated, usage.kind] += usage.quantity
    assert totals == {("openai", True, "llm_input_tokens"): 200,
                      ("openai", True, "llm_output_tokens"): 10,
                      ("openai", False, "llm_input_tokens"): 90,
                      ("openai", False, "llm_output_tokens"): 7}
    assert len({usage.id for usage in recorded}) == len(recorded)


@contextlib.asynccontextmanager
async def speculation_dropped_while_nats_is_away(tmp_path, pool, emulator, call_id: str
                                                 ) -> AsyncIterator[tuple[Any, Bus, Any]]:
    """A brain on its own nats-server, a speculation begun (its input reported) and then dropped
    with the server down: the server, a bus of the test's own and the worker (stopped after)."""
    server = NatsServer(tmp_path / "nats").start()
    bus = await Bus.connect(server.url, name="pytest")
    await bus.ensure_streams()
    # pending_size 0: the connection buffers nothing while it reconnects, as when a longer
    # outage has filled the 2 MB buffer
    brain_bus = await Bus.connect(server.url, name="brain", pending_size=0)
    emulator.tokens_per_second = 50
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(brain_bus, pool, [llm]))
    await worker.start()
    try:
        await open_call(bus, call_id)
        # greeted: the instance follows the call
        await until_async(lambda: stored(bus, call_id, "agent.say"))
        emulator.script(ScriptedReply(text="Whitening is two hundred dollars. " * 20))
        await bus.publish(TranscriptFinal(org_id=ORG, call_id=call_id,
                                          text="Do you do whitening?"))
        await until(lambda: len(emulator.requests) == 1)
        await asyncio.sleep(0.3)  # the response has begun: its input is reported
        server.stop()
        worker.speculations.cancel(call_id, "caller spoke")  # dropped while NATS is away
        yield server, bus, worker
    finally:
        await worker.stop()  # (again: a no-op)
        await llm.aclose()
        await brain_bus.close()
        await bus.close()
        server.stop()


async def stored(bus: Bus, call_id: str, kind: str) -> list:
    return [e for e in await bus.replay_call(call_id) if e.type == kind]


async def test_a_dropped_speculations_usage_is_recorded_across_a_nats_outage(
        tmp_path, pool, emulator) -> None:
    """nats-server killed for 8 s (a chaos run): the usage of speculations dropped meanwhile
    was published once, the publish failed, and what they were billed was never recorded."""
    async with speculation_dropped_while_nats_is_away(tmp_path, pool, emulator, "c-out") as (
            server, bus, _):
        await asyncio.sleep(1.0)
        server.start()
        usage = await until_async(lambda: stored(bus, "c-out", "usage.recorded"), timeout=15.0)
        assert {u.speculative for u in usage} == {True}
        assert any(u.kind == "llm_input_tokens" and u.quantity > 0 for u in usage)


async def test_a_brain_stopped_during_a_nats_outage_waits_no_minute_for_usage(
        tmp_path, pool, emulator, monkeypatch) -> None:
    """Its usage retried for about a minute while NATS is away, a dropped speculation held the
    brain's stop that long, past an orchestrator's kill grace: the stop now waits a bounded time."""
    monkeypatch.setattr(brain_worker, "STOP_RECORDING_WAIT_S", 0.5)
    async with speculation_dropped_while_nats_is_away(tmp_path, pool, emulator, "c-stop") as (
            _, _, worker):
        began = time.monotonic()
        await worker.stop()
        assert time.monotonic() - began < 5


async def until_async(check, timeout: float = 5.0):
    """Poll an async ``check`` until it returns something truthy; return that."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            found = await check()
        except Exception:  # JetStream still recovering after the restart
            found = None
        if found:
            return found
        assert asyncio.get_running_loop().time() < deadline, "not in time"
        await asyncio.sleep(0.05)


def per_turn(recorder, call_id: str) -> dict[str, Counter[str]]:
    """The call's usage.recorded, summed per turn and kind."""
    turns: dict[str, Counter[str]] = {}
    for usage in recorder.of("usage.recorded", call_id):
        turns.setdefault(usage.turn_id, Counter())[usage.kind] += usage.quantity
    return turns


async def test_a_long_calls_history_is_read_from_the_prompt_cache_turn_after_turn(
        bus, pool, emulator, recorder) -> None:
    """A call whose history grows past the model's cache minimum (4096 tokens on Haiku 4.5, the
    default): only the system prompt was marked for the cache, and the turn's context (here
    "nothing relevant was found") sat between it and the messages, so every turn billed the
    whole history as input again. Now the last block of the conversation is marked and the
    turn's context comes after it: once the prefix passes the minimum, a turn writes it and the
    next turn reads what the turn before wrote. A short call is unaffected: nothing cached."""
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    async with running_brain(bus, pool, [llm]):
        await open_call(bus, "c-short")
        for number, words in enumerate(("Hi.", "What time do you open?", "Thanks."), 1):
            await user_says(bus, "c-short", f"t{number}", words)
            await recorder.wait("turn.completed", "c-short", count=number)
        await open_call(bus, "c-long")
        for number in range(1, 5):  # a caller reading out a long list: 1500 words a turn
            await user_says(bus, "c-long", f"t{number}",
                            " ".join(f"item{number}-{i}" for i in range(1500)))
            await recorder.wait("turn.completed", "c-long", count=number)

    short = per_turn(recorder, "c-short")
    assert set(short) == {"t1", "t2", "t3"}
    for kinds in short.values():  # far below the minimum: billed as plain input, every turn
        assert set(kinds) == {"llm_input_tokens", "llm_output_tokens"}

    long = per_turn(recorder, "c-long")
    # t1 (~1500 words) and t2 (~3000) are below the minimum; t3's prefix (~4500) is written
    assert "llm_cache_write_tokens" not in long["t1"] | long["t2"]
    assert long["t3"]["llm_cache_write_tokens"] > 4096
    assert "llm_cache_read_tokens" not in long["t3"]
    # t4 reads all t3 wrote, and writes only what came since: t3's reply and t4's words
    assert long["t4"]["llm_cache_read_tokens"] == long["t3"]["llm_cache_write_tokens"]
    assert 1500 <= long["t4"]["llm_cache_write_tokens"] < 1600
    assert long["t4"]["llm_input_tokens"] < 100  # the turn's context, after the mark
