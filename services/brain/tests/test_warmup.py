"""The warm-up: turn context prepared from the caller's transcripts before the turn ends."""

from __future__ import annotations

import asyncio

from parley.brain.knowledge import ingest
from parley.brain.llm.local_responder import LocalResponder
from parley.brain.worker import BrainWorker, Context, Warmup
from parley.common.events import TranscriptFinal, TurnUserEnded

from .conftest import AGENT, ORG, open_call, services, user_says


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def recording_warmup() -> tuple[Warmup, list[tuple[str, str]]]:
    """A warm-up whose preparations are recorded as (agent, text)."""
    prepared: list[tuple[str, str]] = []

    async def prepare(org: str, call: str, agent: str, text: str) -> Context:
        prepared.append((agent, text))
        return Context()

    return Warmup(prepare), prepared


async def test_context_warmed_without_the_agent_is_not_taken() -> None:
    warmup, prepared = recording_warmup()
    # A call that began before this instance followed it: its agent is not known yet.
    warmup.on_event(TranscriptFinal(org_id=ORG, call_id="c1", text="How much is a cleaning?"))
    warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c1", turn_id="t1",
                                  text="How much is a cleaning?"))
    assert await warmup.take("c1", "How much is a cleaning?", agent_id=AGENT) is None
    assert warmup.misses == 1

    warmup.learn_agent("c1", AGENT)  # from the fold of the call's first unit of work here
    warmup.on_event(TranscriptFinal(org_id=ORG, call_id="c1", text="And a whitening?"))
    warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c1", turn_id="t2",
                                  text="And a whitening?"))
    context = await warmup.take("c1", "And a whitening?", agent_id=AGENT)
    assert context is not None and context.warm
    assert prepared[-1] == (AGENT, "And a whitening?")


async def test_an_instance_started_mid_call_answers_from_the_agents_knowledge(
        bus, pool, recorder) -> None:
    await ingest(pool, ORG, AGENT, "prices.md", b"A teeth cleaning costs $95.")
    await open_call(bus, "w1")  # before this instance started (a deploy, a scale-out)
    worker = BrainWorker(services(bus, pool, [LocalResponder()]))
    await worker.start()
    try:
        for turn_id in ("t1", "t2"):
            await bus.publish(TranscriptFinal(org_id=ORG, call_id="w1",
                                              text="How much is a teeth cleaning?"))
            await until(lambda: worker.warmup.expected("w1") is not None)
            await user_says(bus, "w1", turn_id, "How much is a teeth cleaning?")
            await recorder.wait("turn.completed", "w1", count=int(turn_id[1:]))
            answer = " ".join(e.text for e in recorder.of("agent.say", "w1")
                              if e.turn_id == turn_id)
            assert "$95" in answer, answer
        # The first turn's warm-up did not know the agent; the second's learned it.
        assert (worker.warmup.misses, worker.warmup.hits) == (1, 1)
    finally:
        await worker.stop()
