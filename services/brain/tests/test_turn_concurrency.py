"""One brain instance answers many calls' turns at once, each call's in order."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.llm.base import LlmEvent, LlmRequest
from parley.brain.llm.router import LlmRouter
from parley.brain.worker import BrainWorker
from parley.common.bus import Bus
from parley.common.events import (
    AgentSay,
    AgentSpeechInterrupted,
    ToolCompleted,
    ToolRequested,
    TurnCompleted,
)
from parley.devkit.emulators.anthropic import ScriptedReply

from .conftest import ORG, open_call, services, user_says
from .test_turn_redelivery import HeldWhile


class HeldBack:
    """The anthropic provider, except that requests whose caller words contain ``word`` wait
    until :attr:`release` is set (a slow model for one call)."""

    def __init__(self, inner: AnthropicLlm, word: str) -> None:
        self.inner, self.word = inner, word
        self.name, self.cost, self.supports_tools = inner.name, inner.cost, inner.supports_tools
        self.release = asyncio.Event()
        self.held = 0

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmEvent]:
        if self.word in request.last_user_text:
            self.held += 1
            await self.release.wait()
        async for event in self.inner.stream(request):
            yield event


async def test_a_slow_turn_of_one_call_does_not_delay_another_call(
        bus, pool, emulator, recorder) -> None:
    emulator.default_reply = ScriptedReply(text="Sure, happy to help.")
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    held = HeldBack(llm, "slowly")
    worker = BrainWorker(services(bus, pool, [held], turn_concurrency=8))
    await worker.start()
    try:
        await open_call(bus, "ca")
        await open_call(bus, "cb")
        await user_says(bus, "ca", "t1", "Please think slowly about my question.")
        await recorder.wait("turn.started", "ca")
        began = time.monotonic()
        await user_says(bus, "cb", "t1", "What time do you open?")
        (say,) = await recorder.wait("agent.say", "cb", where=lambda e: e.turn_id == "t1",
                                     timeout=2.0)
        assert time.monotonic() - began < 1.0
        assert say.text == "Sure, happy to help."
        assert held.held == 1 and not recorder.of("turn.completed", "ca")  # a is still waiting
        held.release.set()
        await recorder.wait("turn.completed", "ca")
        assert [e.text for e in recorder.of("agent.say", "ca") if e.turn_id == "t1"] == [
            "Sure, happy to help."]
    finally:
        await worker.stop()
        await llm.aclose()


async def test_a_newer_turn_cancels_the_older_one_promptly_even_if_it_came_first(
        bus, pool, emulator, recorder) -> None:
    # t1's model never answers (it would give up only after the router's 3 s first-token
    # deadline); t2 ends right behind t1, before t1's run can have started watching the call.
    # t2 waits behind t1 (same call): it is answered quickly only if t1 is cancelled at once.
    emulator.default_reply = ScriptedReply(text="Friday works.")
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    held = HeldBack(llm, "book")
    worker = BrainWorker(services(bus, pool, [held], turn_concurrency=8))
    await worker.start()
    try:
        await open_call(bus, "cc")
        await recorder.wait("agent.say", "cc")  # the greeting: the call's history is cached
        began = time.monotonic()
        await user_says(bus, "cc", "t1", "I want to book.")
        await user_says(bus, "cc", "t2", "Actually, Friday please.")
        await recorder.wait("agent.say", "cc", where=lambda e: e.turn_id == "t2", timeout=2.0)
        assert time.monotonic() - began < 1.5
        await recorder.wait("turn.completed", "cc", where=lambda e: e.turn_id == "t2")
        assert not [e for e in recorder.of("agent.say", "cc") if e.turn_id == "t1"]
        # t1 was cancelled (or, if t2 was already known when it came up, skipped), and ended
        # before t2 began: one call's units of work run one after another
        kinds = [(e.type, e.turn_id) for e in recorder.events if e.call_id == "cc"
                 and e.type in ("turn.started", "turn.completed")]
        if ("turn.started", "t1") in kinds:
            t1_end = kinds.index(("turn.completed", "t1"))
            assert recorder.of("turn.completed", "cc")[0].cancelled
            assert t1_end < kinds.index(("turn.started", "t2"))
    finally:
        held.release.set()
        await worker.stop()
        await llm.aclose()


async def test_an_event_stored_while_its_call_is_replayed_is_not_lost(
        bus, pool, emulator, recorder) -> None:
    """The follower delivers an event of a call whose history is being replayed, and the replay
    (which reads the stream as it was when it began) ends before it: the history keeps it."""
    from nats.aio.msg import Msg

    from parley.common.events import TurnUserEnded, encode

    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        await open_call(bus, "cr")
        await recorder.wait("agent.say", "cr")
        worker._history.pop("cr", None)  # not cached here: the next unit of work replays it
        stored = await bus.replay_call("cr")
        later = TurnUserEnded(org_id=ORG, call_id="cr", turn_id="t1", text="Hello?")
        real_replay = worker.s.bus.replay

        async def replay_then_a_late_event(subject: str, *, start_seq: int = 1):
            async for item in real_replay(subject, start_seq=start_seq):
                yield item
            # The follower delivers an event stored after the replay took its snapshot.
            msg = Msg(bus.nc, subject=f"parley.ev.{ORG}.call.cr.turn.user_ended",
                      data=encode(later), reply="$JS.ACK.EVENTS.c.1.999.999.0.0")
            worker._followed_from = worker._followed_from or 1
            await worker._follow(msg)

        worker.s.bus.replay = replay_then_a_late_event  # type: ignore[method-assign]
        events = await worker._call_events("cr", ORG, upto=1)
        worker.s.bus.replay = real_replay  # type: ignore[method-assign]
        assert [e.id for e in events[:len(stored)]] == [e.id for e in stored]
        assert events[-1].id == later.id  # kept, not dropped while the history was rebuilt
        assert worker._history["cr"][0] == 999
    finally:
        await worker.stop()
        await llm.aclose()


class LateFollower(Bus):
    """The test's bus, except that the worker's follower (its ordered consumer of every call
    event) gets an ``agent.speech.interrupted``, and what is stored after it, only once
    :attr:`release` is set: the follower lags behind the live subscriptions, which get the
    event at once."""

    def __init__(self, nc) -> None:
        super().__init__(nc)
        self.release = asyncio.Event()
        subscribe = self.js.subscribe

        async def lagging(subject: str, *args, cb=None, ordered_consumer=False, **kwargs):
            follow = cb

            async def late(msg) -> None:
                if msg.subject.endswith(".agent.speech.interrupted"):
                    await self.release.wait()
                await follow(msg)

            return await subscribe(subject, *args, cb=late if ordered_consumer else cb,
                                   ordered_consumer=ordered_consumer, **kwargs)

        self.js.subscribe = lagging  # type: ignore[method-assign]


async def _checking_the_calendar(bus, call_id: str) -> None:
    """A call whose turn t1 said 'Let me check the calendar.' and called a booking tool."""
    await open_call(bus, call_id)
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="t0", seq=0,
                               text="Hello!", last=True))
    await user_says(bus, call_id, "t1", "Can I come Friday at ten?")
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="t1", seq=0,
                               text="Let me check the calendar."))
    await bus.publish(ToolRequested(org_id=ORG, call_id=call_id, turn_id="t1",
                                    tool_call_id="toolu_1", name="book_appointment"))


async def test_an_interruption_the_follower_delivers_after_the_turn_began_cancels_it(
        bus, pool, emulator, recorder) -> None:
    """The caller cut in over 'Let me check the calendar.' just as the booking's outcome came.
    The live subscription saw agent.speech.interrupted before the outcome's unit of work had
    begun (no turn of the call running: nothing to cancel), the follower delivered it after
    that unit had folded the call: the turn went on and said the booking over the caller."""
    emulator.default_reply = ScriptedReply(text="You're booked for Friday at ten.")
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    held = HeldWhile(llm, "hold-alpha", "Friday")
    late = LateFollower(bus.nc)
    worker = BrainWorker(dataclasses.replace(
        services(late, pool, [held], turn_concurrency=1),
        router=LlmRouter([held], filler_after_ms=None, first_token_deadline_s=30.0)))
    await _checking_the_calendar(bus, "c-cut")
    await worker.start()
    try:
        await asyncio.sleep(0.3)  # the call's units so far are handled: its history is cached
        await open_call(bus, "c-alpha")
        await user_says(bus, "c-alpha", "t1", "Please answer hold-alpha.")
        await recorder.wait("turn.started", "c-alpha")  # the instance's one slot is busy
        await bus.publish(ToolCompleted(org_id=ORG, call_id="c-cut", tool_call_id="toolu_1",
                                        name="book_appointment", result={"booked": True}))
        await bus.publish(AgentSpeechInterrupted(org_id=ORG, call_id="c-cut", turn_id="t1",
                                                 played_text="Let me check"))
        await asyncio.sleep(0.3)  # seen live: no turn of the call runs here yet
        held.release["hold-alpha"].set()  # the outcome's unit of work runs
        await recorder.wait("turn.started", "c-cut")
        late.release.set()  # the follower delivers the interruption
        await asyncio.sleep(0.3)
        held.release["Friday"].set()
        completed, = await recorder.wait("turn.completed", "c-cut")
        assert completed.cancelled
        assert [e.text for e in recorder.of("agent.say", "c-cut") if e.turn_id == "t1"] == [
            "Let me check the calendar."]
    finally:
        late.release.set()
        for released in held.release.values():
            released.set()
        await worker.stop()
        await llm.aclose()


async def test_an_older_turns_interruption_the_follower_delivers_late_cancels_no_later_turn(
        bus, pool, emulator, recorder) -> None:
    emulator.default_reply = ScriptedReply(text="Tuesday at nine works.")
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    held = HeldWhile(llm, "Tuesday")
    late = LateFollower(bus.nc)
    worker = BrainWorker(dataclasses.replace(
        services(late, pool, [held]),
        router=LlmRouter([held], filler_after_ms=None, first_token_deadline_s=30.0)))
    await open_call(bus, "c-on")
    await bus.publish(AgentSay(org_id=ORG, call_id="c-on", turn_id="t0", seq=0, text="Hello!",
                               last=True))
    await user_says(bus, "c-on", "t1", "When do you open?")
    await bus.publish(AgentSay(org_id=ORG, call_id="c-on", turn_id="t1", seq=0,
                               text="We open at eight.", last=True))
    await bus.publish(TurnCompleted(org_id=ORG, call_id="c-on", turn_id="t1"))
    await worker.start()
    try:
        await asyncio.sleep(0.3)  # the call's units so far are handled: its history is cached
        await user_says(bus, "c-on", "t2", "Can I come Tuesday?")
        # (t1's words were still playing: media's interruption of them is stored after t2)
        await bus.publish(AgentSpeechInterrupted(org_id=ORG, call_id="c-on", turn_id="t1",
                                                 played_text="We open"))
        await recorder.wait("turn.started", "c-on", where=lambda e: e.turn_id == "t2")
        late.release.set()  # the follower delivers t1's interruption while t2 runs
        await asyncio.sleep(0.3)
        held.release["Tuesday"].set()
        completed, = await recorder.wait("turn.completed", "c-on",
                                         where=lambda e: e.turn_id == "t2")
        assert not completed.cancelled
        said = [(e.text, e.last) for e in recorder.of("agent.say", "c-on") if e.turn_id == "t2"]
        assert " ".join(text for text, _ in said).strip() == "Tuesday at nine works."
        assert said[-1][1]
    finally:
        late.release.set()
        held.release["Tuesday"].set()
        await worker.stop()
        await llm.aclose()


async def test_a_repeated_older_turn_end_does_not_cancel_the_running_turn(
        bus, pool, emulator, recorder) -> None:
    # A media instance that takes a call over hears the turn its predecessor had open again and
    # publishes its turn.user_ended again, under the same id: JetStream stores it once, but the
    # brain's live subscription still receives the repeat. In a chaos run it came while the
    # caller's next turn (keys) ran, which was cancelled as if the caller had moved on: it
    # completed, cancelled, with nothing said.
    from parley.common.events import TurnUserEnded

    emulator.default_reply = ScriptedReply(text="Friday works.")
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    held = HeldBack(llm, "book")
    worker = BrainWorker(services(bus, pool, [held], turn_concurrency=8))
    await worker.start()
    try:
        await open_call(bus, "cd")
        await recorder.wait("agent.say", "cd")
        first = TurnUserEnded(org_id=ORG, call_id="cd", turn_id="t1", text="Hello?")
        await bus.publish(first)
        await recorder.wait("turn.completed", "cd", where=lambda e: e.turn_id == "t1")
        await user_says(bus, "cd", "t2", "I want to book.")
        await recorder.wait("turn.started", "cd", where=lambda e: e.turn_id == "t2")
        ack = await bus.publish(first)  # the successor's repeat
        assert ack.duplicate
        await asyncio.sleep(0.3)
        held.release.set()
        (done,) = await recorder.wait("turn.completed", "cd", where=lambda e: e.turn_id == "t2")
        assert not done.cancelled
        assert [e.text for e in recorder.of("agent.say", "cd") if e.turn_id == "t2"] == [
            "Friday works."]
    finally:
        held.release.set()
        await worker.stop()
        await llm.aclose()
