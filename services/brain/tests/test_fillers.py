"""The agent's filler threshold, from its stored settings, times what the caller hears."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg

from parley.brain.agents import AgentLookups
from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.llm.router import LlmRouter
from parley.brain.worker import BrainWorker
from parley.common.configuration import update_agent
from parley.common.events import ToolCompleted, TurnUserEnded
from parley.devkit.emulators.anthropic import ScriptedReply, ScriptedToolUse

from .conftest import AGENT, ORG, open_call, running_brain, user_says


@contextlib.asynccontextmanager
async def brain_on_emulator(bus, pool, emulator, *, filler_after_ms: int,
                            agents_from_store: bool = False,
                            **services: Any) -> AsyncIterator[BrainWorker]:
    """A started brain worker answering through the Anthropic emulator, its router saying fillers
    after ``filler_after_ms``; with ``agents_from_store`` the agent's settings (and its own
    threshold) are read from Postgres on every turn; ``services``: other services' settings."""
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    overrides = {"agents": AgentLookups(pool, keep_s=0).settings} if agents_from_store else {}
    overrides.update(services)
    router = LlmRouter([llm], filler_after_ms=filler_after_ms, first_token_deadline_s=10)
    async with running_brain(bus, pool, [llm], router=router, **overrides) as worker:
        yield worker


async def store_filler_after_ms(database_url: str, filler_after_ms: int) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await update_agent(conn, ORG, AGENT, {"filler_after_ms": filler_after_ms})


async def open_call_past_greeting(bus, recorder, call_id: str) -> None:
    await open_call(bus, call_id)
    await recorder.wait("agent.say", call_id)  # the greeting


def said_in_turn(recorder, call_id: str, turn_id: str) -> list[str]:
    return [e.text for e in recorder.of("agent.say", call_id) if e.turn_id == turn_id]


async def test_a_slow_reply_gets_the_fillers_at_the_agents_threshold(
        bus, pool, emulator, recorder, database_url) -> None:
    # The filler threshold was the brain's alone (PARLEY_FILLER_AFTER_MS, 1.2 s): an agent could
    # not have its own. Stored with the agent, it times the fillers its calls hear; with a slow
    # model, a second, different one follows another threshold of silence.
    await store_filler_after_ms(database_url, 400)
    async with brain_on_emulator(bus, pool, emulator, filler_after_ms=5000,
                                 agents_from_store=True):
        await open_call_past_greeting(bus, recorder, "fa")
        emulator.ttft_s = 1.1
        emulator.script(ScriptedReply(text="We open at eight."))
        await user_says(bus, "fa", "t1", "When do you open?")
        await recorder.wait("turn.completed", "fa")
        says = said_in_turn(recorder, "fa", "t1")
        assert says[:2] == ["One moment.", "Sorry, just a moment longer."]
        assert says[-1] == "We open at eight."

        await store_filler_after_ms(database_url, 0)  # none
        emulator.script(ScriptedReply(text="Nine on Saturdays."))
        await user_says(bus, "fa", "t2", "And on Saturdays?")
        await recorder.wait("turn.completed", "fa", count=2)
        assert said_in_turn(recorder, "fa", "t2") == ["Nine on Saturdays."]


async def test_no_filler_comes_after_a_prepared_clause_the_caller_is_already_hearing(
        bus, pool, emulator, recorder) -> None:
    # Media played the clause another instance's speculation prepared; this instance says it
    # as the turn's first clause and asks the model to go on from it. The router timed its
    # fillers from that request as if nothing had been said, so a model slower than the
    # threshold put "One moment." (and more) into the middle of the answer being heard.
    async with brain_on_emulator(bus, pool, emulator, filler_after_ms=300):
        await open_call_past_greeting(bus, recorder, "fp")
        emulator.ttft_s = 1.0
        emulator.script(ScriptedReply(text="and on Saturdays at nine."))
        await bus.publish(TurnUserEnded(org_id=ORG, call_id="fp", turn_id="t1",
                                        text="When do you open?",
                                        prepared_text="We open at eight on weekdays,"))
        await recorder.wait("turn.completed", "fp")
        assert said_in_turn(recorder, "fp", "t1") == [
            "We open at eight on weekdays,", "and on Saturdays at nine."]


async def test_the_slow_tool_filler_does_not_repeat_a_filler_the_caller_just_heard(
        bus, pool, emulator, recorder) -> None:
    # The model took two thresholds to write a tool call: the caller heard "One moment." and
    # "Sorry, just a moment longer.". The slow-tool filler was skipped only when the round's
    # last clause was that same "One moment.", which with several fillers it no longer is, so
    # the caller heard "One moment." a second time as the tool ran.
    async with brain_on_emulator(bus, pool, emulator, filler_after_ms=400):
        await open_call_past_greeting(bus, recorder, "ft")
        emulator.ttft_s = 1.1
        emulator.script(ScriptedReply(tool_uses=(ScriptedToolUse(
            name="book_appointment", input={"day": "Friday"}, id="toolu_slow"),)))
        await user_says(bus, "ft", "t1", "Book me in Friday")
        await recorder.wait("tool.requested", "ft")
        says = said_in_turn(recorder, "ft", "t1")
        assert says[:2] == ["One moment.", "Sorry, just a moment longer."]
        assert says.count("One moment.") == 1, says


async def test_the_round_after_a_slow_tool_goes_on_from_its_filler_not_again_from_the_first(
        bus, pool, emulator, recorder, database_url) -> None:
    # The tool filler ("One moment.") went out with the tool request; the model, slow to answer
    # the tool's outcome, then got the router's fillers from the first: the caller heard "One
    # moment." from the tool filler and again from the router. The router's fillers go on
    # from what the turn already said.
    await store_filler_after_ms(database_url, 0)  # (the first round: none)
    async with brain_on_emulator(bus, pool, emulator, filler_after_ms=5000,
                                 agents_from_store=True):
        await open_call_past_greeting(bus, recorder, "fr")
        emulator.script(
            ScriptedReply(text="Let me check.", tool_uses=(ScriptedToolUse(
                name="book_appointment", input={"day": "Friday"}, id="toolu_fr"),)),
            ScriptedReply(text="You're booked for Friday."))
        await user_says(bus, "fr", "t1", "Book me in Friday")
        await recorder.wait("tool.requested", "fr")
        await store_filler_after_ms(database_url, 400)
        emulator.ttft_s = 1.1  # (the answer to the outcome: two thresholds of silence)
        await bus.publish(ToolCompleted(org_id=ORG, call_id="fr", tool_call_id="toolu_fr",
                                        name="book_appointment", result={"booked": True}))
        await recorder.wait("turn.completed", "fr")
        says = said_in_turn(recorder, "fr", "t1")
        assert says[:3] == ["Let me check.", "One moment.", "Sorry, just a moment longer."]
        assert says.count("One moment.") == 1, says
        assert says[-1] == "You're booked for Friday."


async def test_the_slow_tool_filler_is_not_a_phrase_the_turn_said_before_its_reply_began(
        bus, pool, emulator, recorder) -> None:
    # The model was slow to begin: the caller heard the router's "One moment.", then "Let me
    # check." and a tool call. The slow-tool filler was skipped only right after a filler, so
    # "One moment." was published again with the tool request, for the caller to hear twice.
    async with brain_on_emulator(bus, pool, emulator, filler_after_ms=400):
        await open_call_past_greeting(bus, recorder, "fb")
        emulator.ttft_s = 0.7  # one threshold of silence (two on a slow machine)
        emulator.script(ScriptedReply(text="Let me check.", tool_uses=(ScriptedToolUse(
            name="book_appointment", input={"day": "Friday"}, id="toolu_fb"),)))
        await user_says(bus, "fb", "t1", "Book me in Friday")
        await recorder.wait("tool.requested", "fb")
        says = said_in_turn(recorder, "fb", "t1")
        assert says[0] == "One moment." and "Let me check." in says
        assert says.count("One moment.") == 1, says


async def test_each_slow_tool_of_a_turn_gets_the_next_filler_until_all_are_said(
        bus, pool, emulator, recorder) -> None:
    # A turn called one slow tool, then (in the round its outcome started) another, and more
    # (the brain publishes each tool's filler; media says it if the tool is slow). Since no
    # filler phrase is said twice in a turn, the second tool's filler, always "One moment.",
    # was skipped: the caller heard silence for the whole of the second tool's wait. Each
    # slow tool's filler is the next phrase the turn has not said; none once all have been.
    async with brain_on_emulator(bus, pool, emulator, filler_after_ms=5000,
                                 tool_filler_after_ms=300):
        await open_call_past_greeting(bus, recorder, "fs")
        emulator.script(*(ScriptedReply(tool_uses=(ScriptedToolUse(
            name="check_calendar", input={"week": week}, id=f"toolu_fs{week}"),))
            for week in range(4)), ScriptedReply(text="Nothing free for a month."))
        await user_says(bus, "fs", "t1", "When can I come in?")
        for week in range(4):
            await recorder.wait("tool.requested", "fs", count=week + 1)
            await asyncio.sleep(0.5)  # slower than the filler's threshold: it was said
            await bus.publish(ToolCompleted(org_id=ORG, call_id="fs", name="check_calendar",
                                            tool_call_id=f"toolu_fs{week}", result={"free": []}))
        await recorder.wait("turn.completed", "fs")
        fillers = [(say.text, say.filler_after_ms) for say in recorder.of("agent.say", "fs")
                   if say.turn_id == "t1" and say.filler_after_ms]
        assert fillers == [("One moment.", 300), ("Sorry, just a moment longer.", 300),
                           ("Thanks for bearing with me.", 300)]
        assert said_in_turn(recorder, "fs", "t1")[-1] == "Nothing free for a month."


async def test_a_tool_filler_a_quick_tool_left_unsaid_does_not_use_up_the_sequence(
        bus, pool, emulator, recorder) -> None:
    # Media says a tool's filler only if nothing more of the turn comes for its threshold; the
    # brain counted it as said all the same. Three quick tools in a turn (their fillers
    # published, never heard) used up every phrase, and a fourth, slow tool got none: the
    # caller sat in silence for its whole wait. A filler the turn's next clause came within
    # its threshold of was never said: the phrase is still the turn's to say.
    async with brain_on_emulator(bus, pool, emulator, filler_after_ms=60000,
                                 tool_filler_after_ms=60000):  # (unsaid, however slow the CI)
        await open_call_past_greeting(bus, recorder, "fq")
        emulator.script(*(ScriptedReply(tool_uses=(ScriptedToolUse(
            name="check_calendar", input={"week": week}, id=f"toolu_fq{week}"),))
            for week in range(4)), ScriptedReply(text="Nothing free for a month."))
        await user_says(bus, "fq", "t1", "When can I come in?")
        for week in range(4):
            await recorder.wait("tool.requested", "fq", count=week + 1)
            await bus.publish(ToolCompleted(org_id=ORG, call_id="fq", name="check_calendar",
                                            tool_call_id=f"toolu_fq{week}", result={"free": []}))
        await recorder.wait("turn.completed", "fq")
        fillers = [(say.text, say.filler_after_ms) for say in recorder.of("agent.say", "fq")
                   if say.turn_id == "t1" and say.filler_after_ms]
        assert fillers == [("One moment.", 60000)] * 4, fillers
