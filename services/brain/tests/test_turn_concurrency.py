"""One brain instance answers many calls' turns at once, each call's in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.llm.base import LlmEvent, LlmRequest
from parley.brain.worker import BrainWorker
from parley.devkit.emulators.anthropic import ScriptedReply

from .conftest import ORG, open_call, services, user_says


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
