"""Preemptive generation: the reply starts before the turn ends and is published only after."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import pytest

from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.llm.base import Done, LlmEvent, LlmRequest, TextDelta, Usage, UserMessage
from parley.brain.llm.router import MORE_FILLERS, LlmRouter
from parley.brain.preemptive import Speculation, Speculations, normalize
from parley.brain.worker import BrainWorker
from parley.common.events import (
    SpeechStarted,
    SpeechStopped,
    TranscriptFinal,
    TranscriptPartial,
    TurnUserEnded,
)
from parley.devkit.emulators.anthropic import ScriptedReply, ScriptedToolUse

from .conftest import (
    ORG,
    conversation,
    open_call,
    running_brain,
    services,
    turn_context,
    user_says,
)

REPLY = "We open at eight. Would you like to book a visit?"


async def final(bus, call_id: str, text: str) -> None:
    await bus.publish(TranscriptFinal(org_id=ORG, call_id=call_id, text=text))


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def published(recorder, call_id: str, turn_id: str) -> list[str]:
    """What the brain published for the turn, in order."""
    return [e.type for e in recorder.events if e.call_id == call_id
            and getattr(e, "turn_id", "") == turn_id and e.type != "turn.user_ended"]


async def started_worker(bus, pool, emulator, **overrides):
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm], **overrides))
    await worker.start()
    return worker, llm


def running_worker(bus, pool, emulator, **overrides):
    """conftest's running_brain on the emulated Anthropic model (as started_worker's)."""
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    return running_brain(bus, pool, [llm], **overrides)


async def test_a_reply_started_from_the_final_is_published_only_when_the_turn_ends(
        bus, pool, emulator, recorder) -> None:
    worker, llm = await started_worker(bus, pool, emulator)
    emulator.ttft_s = 0.1  # the model's first token comes 100 ms after each request
    try:
        await open_call(bus, "p1")
        await recorder.wait("agent.say", "p1")  # greeted: this instance follows the call
        emulator.script(ScriptedReply(text=REPLY))
        await final(bus, "p1", "What time do you open?")
        await until(lambda: emulator.completed_streams == 1)  # the whole reply is buffered
        await asyncio.sleep(0.2)
        # Before the turn ends only its first clause goes out, prepared for media to synthesise.
        assert published(recorder, "p1", "t1") == ["agent.reply_prepared"]
        prepared, = recorder.of("agent.reply_prepared", "p1")
        assert (prepared.words, prepared.text, prepared.last) == (
            "what time do you open", "We open at eight.", False)

        await user_says(bus, "p1", "t1", "what time do you open")  # same words, other casing
        completed = await recorder.wait("turn.completed", "p1")
        speculative = [(e.seq, e.text, e.last) for e in recorder.of("agent.say", "p1")
                       if e.turn_id == "t1"]
        assert len(emulator.requests) == 1  # the speculative request was the turn's
        assert worker.speculations.outcomes == {"adopted": 1}
        assert not completed[0].cancelled
        # The model took its 100 ms, but before the turn ended: the turn did not wait for it.
        assert completed[0].ttft_ms >= 100 and completed[0].llm_wait_ms < 50
        kinds = published(recorder, "p1", "t1")
        assert kinds.index("turn.started") < kinds.index("agent.say")
        assert kinds.count("agent.reply_prepared") == 1

        # The same turn without a final before it: no speculation, the same clauses.
        await open_call(bus, "p2")
        await recorder.wait("agent.say", "p2")
        emulator.script(ScriptedReply(text=REPLY))
        await user_says(bus, "p2", "t1", "what time do you open")
        plain_completed = await recorder.wait("turn.completed", "p2")
        assert plain_completed[0].llm_wait_ms >= 100  # this turn waited out the model's ttft
        plain = [(e.seq, e.text, e.last) for e in recorder.of("agent.say", "p2")
                 if e.turn_id == "t1"]
        assert speculative == plain and " ".join(t for _, t, _ in plain) == REPLY
        assert worker.speculations.outcomes == {"adopted": 1}
    finally:
        emulator.ttft_s = 0.0
        await worker.stop()
        await llm.aclose()


@pytest.mark.parametrize("talking_s", [0.1, 0.5])
async def test_an_adopted_slow_speculation_says_its_filler_timed_from_the_turns_end(
        bus, pool, emulator, recorder, talking_s) -> None:
    # The speculation went out while the caller was still talking, and its model is slow.
    # Timed from that request, the router's filler came too early after the turn's end (0.1 s
    # of talking), or while the caller still talked (0.5 s), and was dropped: silence until
    # the first token.
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(dataclasses.replace(services(bus, pool, [llm]),
                                             router=LlmRouter([llm], filler_after_ms=300)))
    await worker.start()
    try:
        await open_call(bus, "f1")
        await recorder.wait("agent.say", "f1")
        emulator.ttft_s = 1.5
        emulator.script(ScriptedReply(text=REPLY))
        await final(bus, "f1", "What time do you open?")
        await until(lambda: len(emulator.requests) == 1)
        await asyncio.sleep(talking_s)
        await user_says(bus, "f1", "t1", "What time do you open?")
        await recorder.wait("turn.completed", "f1")
        assert worker.speculations.outcomes == {"adopted": 1}
        ended, = recorder.of("turn.user_ended", "f1")
        says = [e for e in recorder.of("agent.say", "f1") if e.turn_id == "t1"]
        texts = [e.text for e in says]
        # The fillers, each after another 0.3 s of silence (how many: as the reply is slow)
        fillers = ("One moment.", *MORE_FILLERS)
        assert texts[-2:] == ["We open at eight.", "Would you like to book a visit?"]
        assert 1 <= len(texts) - 2 <= len(fillers)
        assert tuple(texts[:-2]) == fillers[:len(texts) - 2]
        waited = (says[0].at - ended.at).total_seconds()
        assert 0.3 <= waited < 0.3 + 0.5  # timed from the turn's end, not from the first token
    finally:
        emulator.ttft_s = 0.0
        await worker.stop()
        await llm.aclose()


async def test_a_speculation_on_other_words_is_never_published(
        bus, pool, emulator, recorder) -> None:
    async with running_worker(bus, pool, emulator) as worker:
        await open_call(bus, "p3")
        await recorder.wait("agent.say", "p3")
        emulator.script(ScriptedReply(text="Tuesday is fully booked."),
                        ScriptedReply(text="Wednesday at nine is free."))
        await final(bus, "p3", "Can I come on Tuesday?")
        await until(lambda: emulator.completed_streams == 1)
        await user_says(bus, "p3", "t1", "Can I come on Wednesday?")
        await recorder.wait("turn.completed", "p3")
        said = [e.text for e in recorder.of("agent.say", "p3") if e.turn_id == "t1"]
        assert said == ["Wednesday at nine is free."]
        assert len(emulator.requests) == 2
        assert conversation(emulator.requests[-1])[-1]["content"] == "Can I come on Wednesday?"
        assert "adopted" not in worker.speculations.outcomes
        assert sum(worker.speculations.outcomes.values()) == 1


async def keys(bus, call_id: str, turn_id: str, pressed: str) -> None:
    """The caller's turn of keys, as media ends it (numbered apart from spoken turns: k<n>)."""
    await bus.publish(TurnUserEnded(org_id=ORG, call_id=call_id, turn_id=turn_id, text=pressed,
                                    reason="dtmf"))


async def test_a_speculation_on_words_is_not_adopted_by_a_turn_of_keys(
        bus, pool, emulator, recorder) -> None:
    # The caller read the digits out, then typed them: the words and the keys normalise alike
    # ("1234"), and the reply speculated on the words was adopted for the keys.
    async with running_worker(bus, pool, emulator) as worker:
        await open_call(bus, "p8")
        await recorder.wait("agent.say", "p8")
        emulator.script(ScriptedReply(text="Twelve thirty-four, got it."),
                        ScriptedReply(text="Thanks, I have your code."))
        await final(bus, "p8", "1234")
        await until(lambda: emulator.completed_streams == 1)
        await keys(bus, "p8", "k1", "1234#")
        await recorder.wait("turn.completed", "p8")
        assert [e.text for e in recorder.of("agent.say", "p8") if e.turn_id == "k1"] == [
            "Thanks, I have your code."]
        assert len(emulator.requests) == 2
        assert conversation(emulator.requests[-1])[-1] == {"role": "user",
                                                           "content": "[keypad] 1234#"}
        assert "adopted" not in worker.speculations.outcomes
        assert sum(worker.speculations.outcomes.values()) == 1


async def test_after_a_turn_of_keys_the_next_spoken_turn_is_prepared_for(
        bus, pool, emulator, recorder) -> None:
    # Media numbers turns of keys apart (k1) from spoken ones (t1): the reply prepared for the
    # caller's next words was for turn "" after k1, and so never published.
    async with running_worker(bus, pool, emulator) as worker:
        await open_call(bus, "p9")
        await recorder.wait("agent.say", "p9")
        emulator.script(ScriptedReply(text="Thanks, I have your code."),
                        ScriptedReply(text=REPLY))
        await keys(bus, "p9", "k1", "1234#")
        await recorder.wait("turn.completed", "p9")
        await final(bus, "p9", "What time do you open?")
        prepared, = await recorder.wait("agent.reply_prepared", "p9")
        assert (prepared.turn_id, prepared.text) == ("t1", "We open at eight.")
        await user_says(bus, "p9", "t1", "What time do you open?")
        await recorder.wait("turn.completed", "p9", count=2)
        assert worker.speculations.outcomes == {"adopted": 1}
        assert conversation(emulator.requests[-1])[-3:] == [
            {"role": "user", "content": "[keypad] 1234#"},
            {"role": "assistant", "content": "Thanks, I have your code."},
            {"role": "user", "content": "What time do you open?"}]


async def test_a_tool_call_in_a_speculative_reply_waits_for_the_turn(
        bus, pool, emulator, recorder) -> None:
    async with running_worker(bus, pool, emulator) as worker:
        await open_call(bus, "p4")
        await recorder.wait("agent.say", "p4")
        emulator.script(ScriptedReply(text="Let me book that.", tool_uses=(
            ScriptedToolUse("book_appointment", {"day": "friday"}, id="toolu_p4"),)))
        await final(bus, "p4", "Book me for Friday.")
        await until(lambda: emulator.completed_streams == 1)
        await asyncio.sleep(0.2)
        assert recorder.of("tool.requested", "p4") == []
        assert published(recorder, "p4", "t1") == []

        await user_says(bus, "p4", "t1", "Book me for Friday.")
        (tool,) = await recorder.wait("tool.requested", "p4")
        assert tool.tool_call_id == "toolu_p4" and tool.arguments == {"day": "friday"}
        assert worker.speculations.outcomes == {"adopted": 1}
        said = [e.text for e in recorder.of("agent.say", "p4") if e.turn_id == "t1"]
        assert said == ["Let me book that.", "One moment."]  # the filler, if the tool is slow


async def test_a_stable_partial_starts_it_and_new_speech_cancels_it(
        bus, pool, emulator, recorder) -> None:
    async with running_worker(bus, pool, emulator, preemptive_partial_stable_s=0.05) as worker:
        await open_call(bus, "p5")
        await recorder.wait("agent.say", "p5")
        emulator.script(ScriptedReply(text="First guess."), ScriptedReply(text="Sure."))
        await bus.publish(TranscriptPartial(org_id=ORG, call_id="p5", text="I need a"))
        await until(lambda: emulator.completed_streams == 1)  # stable for 50 ms: started
        await bus.publish(SpeechStarted(org_id=ORG, call_id="p5", offset_ms=1000))
        await until(lambda: worker.speculations.outcomes.get("caller spoke") == 1)
        await bus.publish(TranscriptPartial(org_id=ORG, call_id="p5", text="cleaning"))
        await final(bus, "p5", "I need a cleaning.")  # the turn's words: finals joined
        await until(lambda: len(emulator.requests) == 2)
        await user_says(bus, "p5", "t1", "I need a cleaning.")
        await recorder.wait("turn.completed", "p5")
        assert [e.text for e in recorder.of("agent.say", "p5") if e.turn_id == "t1"] == [
            "Sure."]
        assert worker.speculations.outcomes.get("adopted") == 1
        assert len(emulator.requests) == 2


async def test_by_default_the_caller_stopping_starts_it_and_a_partial_alone_does_not(
        bus, pool, emulator, recorder) -> None:
    async with running_worker(bus, pool, emulator) as worker:  # the service's defaults
        await open_call(bus, "p7")
        await recorder.wait("agent.say", "p7")
        emulator.script(ScriptedReply(text="We are open until six."))
        await bus.publish(SpeechStarted(org_id=ORG, call_id="p7", offset_ms=500))
        await bus.publish(TranscriptPartial(org_id=ORG, call_id="p7", text="When do you close"))
        await asyncio.sleep(0.3)
        assert emulator.requests == []  # words still coming: no billed request yet
        await bus.publish(SpeechStopped(org_id=ORG, call_id="p7", offset_ms=1800))
        await until(lambda: emulator.completed_streams == 1)  # the endpointing silence
        await final(bus, "p7", "When do you close?")  # the same words: nothing new
        await user_says(bus, "p7", "t1", "When do you close?")
        await recorder.wait("turn.completed", "p7")
        assert len(emulator.requests) == 1
        assert worker.speculations.outcomes == {"adopted": 1}
        assert [e.text for e in recorder.of("agent.say", "p7") if e.turn_id == "t1"] == [
            "We are open until six."]


async def test_turned_off_it_never_speculates(bus, pool, emulator, recorder) -> None:
    async with running_worker(bus, pool, emulator, preemptive=False) as worker:
        await open_call(bus, "p6")
        await recorder.wait("agent.say", "p6")
        await final(bus, "p6", "Hello there.")
        await asyncio.sleep(0.3)
        assert emulator.requests == []
        await user_says(bus, "p6", "t1", "Hello there.")
        await recorder.wait("turn.completed", "p6")
        assert len(emulator.requests) == 1 and worker.speculations.outcomes == {}


def test_normalize_ignores_case_punctuation_and_spacing() -> None:
    assert normalize("What time do you OPEN?") == normalize(" what time, do you open ")
    assert normalize("I'd like Tuesday.") != normalize("I'd like Wednesday.")


async def playing(bus, call_id: str, turn_id: str, text: str, clause: str, *,
                  last: bool = False) -> None:
    """The turn ended, and media is already playing ``clause`` (a prepared first clause)."""
    await bus.publish(TurnUserEnded(org_id=ORG, call_id=call_id, turn_id=turn_id, text=text,
                                    prepared_text=clause, prepared_last=last))


async def test_a_turn_playing_the_prepared_clause_adopts_the_speculation_that_made_it(
        bus, pool, emulator, recorder) -> None:
    async with running_worker(bus, pool, emulator) as worker:
        await open_call(bus, "q1")
        await recorder.wait("agent.say", "q1")
        emulator.script(ScriptedReply(text=REPLY))
        await final(bus, "q1", "What time do you open?")
        prepared, = await recorder.wait("agent.reply_prepared", "q1")
        assert prepared.turn_id == "t1" and prepared.text == "We open at eight."

        # Media played it: the turn adopts the speculation even though the words it ended
        # with differ (media compared them itself; the brain must say what is being heard).
        await playing(bus, "q1", "t1", "What time do you open, please?", prepared.text)
        await recorder.wait("turn.completed", "q1")
        said = [(e.seq, e.text) for e in recorder.of("agent.say", "q1") if e.turn_id == "t1"]
        assert said == [(0, "We open at eight."), (1, "Would you like to book a visit?")]
        assert len(emulator.requests) == 1
        assert worker.speculations.outcomes == {"adopted": 1}


async def test_a_prepared_clause_from_elsewhere_is_said_first_and_the_model_continues_it(
        bus, pool, emulator, recorder) -> None:
    # This instance did not speculate (another one did): the clause the caller hears is the
    # turn's first, and the model is asked to go on from it.
    async with running_worker(bus, pool, emulator, preemptive=False):
        await open_call(bus, "q2")
        await recorder.wait("agent.say", "q2")
        emulator.script(ScriptedReply(text=" Would you like to book a visit?"))
        await playing(bus, "q2", "t1", "What time do you open?", "We open at eight.")
        await recorder.wait("turn.completed", "q2")
        said = [(e.seq, e.text, e.last) for e in recorder.of("agent.say", "q2")
                if e.turn_id == "t1"]
        assert said == [(0, "We open at eight.", False),
                        (1, "Would you like to book a visit?", True)]
        messages = emulator.requests[-1]["messages"]
        assert messages[-1] == {"role": "assistant", "content": [
            {"type": "text", "text": "We open at eight."}]}
        assert messages[-2]["role"] == "user"

        # A prepared clause that was the whole reply ends the turn without asking the model.
        requests = len(emulator.requests)
        await playing(bus, "q2", "t2", "Thanks!", "You're welcome!", last=True)
        await until(lambda: any(e.turn_id == "t2" for e in recorder.of("turn.completed", "q2")))
        said = [(e.seq, e.text, e.last) for e in recorder.of("agent.say", "q2")
                if e.turn_id == "t2"]
        assert said == [(0, "You're welcome!", True)]
        assert len(emulator.requests) == requests


class _Waiting:
    """A provider that notes when its request goes out, then waits for the model."""

    name, cost, supports_tools = "waiting", 1.0, True

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmEvent]:
        self.log.append("request sent")
        await asyncio.sleep(30)
        yield TextDelta(text="never")


async def test_a_turn_that_will_adopt_a_speculation_lets_its_request_go_out_first() -> None:
    log: list[str] = []
    built = asyncio.Event()

    async def build() -> LlmRequest:
        await built.wait()  # retrieval and the rest of the context
        return LlmRequest(messages=(UserMessage(text="what time do you open"),))

    speculation = Speculation("c1", "what time do you open", build=build,
                              stream=LlmRouter([_Waiting(log)]).stream, delay_s=0.0,
                              on_outcome=lambda outcome: None)

    async def turn() -> None:
        await speculation.made(timeout_s=5.0)
        log.append("turn prepares")

    waiting = asyncio.create_task(turn())
    await asyncio.sleep(0.05)
    assert log == []  # the request is not built yet: the turn waits for it
    built.set()
    await asyncio.wait_for(waiting, 1.0)
    # The router starts the provider in a task of its own; the turn runs only after it.
    assert log == ["request sent", "turn prepares"]
    speculation.cancel()


async def test_waiting_for_a_speculative_request_is_bounded() -> None:
    never = asyncio.Event()

    async def build() -> LlmRequest:
        await never.wait()
        raise AssertionError("unreachable")

    stuck = Speculation("c1", "hello", build=build, stream=LlmRouter([_Waiting([])]).stream,
                        delay_s=0.0, on_outcome=lambda outcome: None)
    began = asyncio.get_running_loop().time()
    await stuck.made(timeout_s=0.1)
    assert 0.09 <= asyncio.get_running_loop().time() - began < 1.0
    stuck.cancel()

    # One still waiting for its words to settle has made no request: nothing to wait for.
    unsettled = Speculation("c2", "hello", build=build, stream=LlmRouter([_Waiting([])]).stream,
                            delay_s=30.0, on_outcome=lambda outcome: None)
    began = asyncio.get_running_loop().time()
    await unsettled.made(timeout_s=5.0)
    assert asyncio.get_running_loop().time() - began < 0.05
    unsettled.cancel()


async def test_no_clause_is_prepared_once_the_turn_has_ended() -> None:
    answered = asyncio.Event()
    prepared: list[str] = []

    async def build() -> LlmRequest:
        return LlmRequest(messages=(UserMessage(text="what time do you open"),))

    async def stream(request: LlmRequest) -> AsyncIterator[LlmEvent]:
        await answered.wait()
        yield TextDelta(text="We open at eight. Would you like to book a visit?")
        yield Done(usage=Usage())

    async def prepare(clause: str, last: bool) -> None:
        prepared.append(clause)

    speculations = Speculations()
    speculation = speculations.start("c1", "What time do you open?", build=build, stream=stream,
                                     delay_s=0.0, timeout_s=10.0, on_clause=prepare)
    await speculation.made(timeout_s=1.0)
    # The turn ends (seen live) before the first clause is complete, and before the turn's
    # handler takes the speculation: media must not be handed a clause for a turn that is over.
    speculations.turn_ended("c1", "what time do you open")
    answered.set()
    taken = speculations.take("c1")
    assert taken is speculation
    items = [item async for item in speculation.adopt()]
    assert isinstance(items[0], TextDelta) and isinstance(items[-1], Done)
    assert prepared == [] and speculation.prepared == ""


@contextlib.asynccontextmanager
async def speculated_on_about_whitening(bus, pool, emulator, recorder, call_id: str,
                                        said: list[str], replies: list[str]):
    """A call to a clinic that knows about teeth whitening, in which the caller says ``said``
    turn by turn: each turn's final comes first and its speculation is made (``replies`` in
    order) before the turn ends. Yields the worker, still running."""
    from parley.brain.knowledge import ingest

    await ingest(pool, ORG, "reception", "whitening.md",
                 b"Teeth whitening: a whitening session takes an hour and costs $300.")
    async with running_worker(bus, pool, emulator) as worker:
        await open_call(bus, call_id)
        await recorder.wait("agent.say", call_id)
        emulator.script(*[ScriptedReply(text=reply) for reply in replies])
        for number, text in enumerate(said, 1):
            await final(bus, call_id, text)
            await until(lambda number=number: emulator.completed_streams == number)
            await user_says(bus, call_id, f"t{number}", text)
            await recorder.wait("turn.completed", call_id, count=number)
        yield worker


async def test_a_follow_up_is_warmed_and_speculated_on_with_its_subjects_knowledge(
        bus, pool, emulator, recorder) -> None:
    # "How much is it?" after "Do you do teeth whitening?": its knowledge is searched with the
    # previous turn's words too, already while the caller speaks, so the speculation made
    # from the warmed context is the turn's own request and is adopted.
    async with speculated_on_about_whitening(
            bus, pool, emulator, recorder, "p-follow",
            ["Do you do teeth whitening?", "How much is it?"],
            ["Yes, we do whitening.", "It costs $300."]) as worker:
        assert worker.speculations.outcomes == {"adopted": 2}
        assert len(emulator.requests) == 2
        assert "$300" in turn_context(emulator.requests[-1])
        assert worker.warmup.hits == 2
        retrieved = recorder.of("knowledge.retrieved", "p-follow")[-1]
        assert retrieved.turn_id == "t2" and len(retrieved.chunk_ids) == 1


async def test_a_follow_up_to_a_follow_up_is_speculated_on_with_its_subjects_knowledge(
        bus, pool, emulator, recorder) -> None:
    # "And how long?" after "How much is it?" after "Do you do teeth whitening?": searched
    # with the subject and the follow-up since, already while the caller speaks, so the
    # speculation made from the warmed context is still the turn's own request.
    async with speculated_on_about_whitening(
            bus, pool, emulator, recorder, "p-follow2",
            ["Do you do teeth whitening?", "How much is it?", "And how long?"],
            ["Yes, we do whitening.", "It costs $300.", "About an hour."]) as worker:
        assert worker.speculations.outcomes == {"adopted": 3}
        assert len(emulator.requests) == 3 and worker.warmup.hits == 3
        assert "takes an hour" in turn_context(emulator.requests[-1])
        retrieved = recorder.of("knowledge.retrieved", "p-follow2")[-1]
        assert retrieved.turn_id == "t3" and len(retrieved.chunk_ids) == 1
        assert retrieved.query == "Do you do teeth whitening? How much is it? And how long?"


async def test_an_adopted_speculation_whose_words_differ_in_case_keeps_the_prompt_cache(
        bus, pool, emulator, recorder) -> None:
    """The speculation asked with the words as the final had them ("Okay, here's the list:
    …"), the turn ended with them cased and punctuated otherwise ("okay here's the list …"):
    adopted all the same, but the call's history then had the turn's text, so the next turn's
    prefix differed from the one the adopted request had written to the prompt cache at the
    caller's words, and it read nothing of it (billed the whole history again). The turn now
    goes on with the words the model was asked with, and the history keeps them."""
    from collections import Counter

    items = " ".join(f"item{i}" for i in range(4500))  # past Haiku's cache minimum (4096)
    async with running_worker(bus, pool, emulator) as worker:
        await open_call(bus, "p-case")
        await recorder.wait("agent.say", "p-case")
        emulator.script(ScriptedReply(text="Got it, that's the whole list."),
                        ScriptedReply(text="You're welcome!"))
        await final(bus, "p-case", f"Okay, here's the list: {items}.")
        await until(lambda: emulator.completed_streams == 1)
        await user_says(bus, "p-case", "t1", f"okay here's the list {items}")
        await recorder.wait("turn.completed", "p-case")
        assert worker.speculations.outcomes == {"adopted": 1} and len(emulator.requests) == 1
        await user_says(bus, "p-case", "t2", "Thanks!")
        await recorder.wait("turn.completed", "p-case", count=2)
        assert conversation(emulator.requests[-1])[-3]["content"] == (
            f"Okay, here's the list: {items}.")
        billed: dict[str, Counter[str]] = {}
        for usage in recorder.of("usage.recorded", "p-case"):
            billed.setdefault(usage.turn_id, Counter())[usage.kind] += usage.quantity
        assert billed["t1"]["llm_cache_write_tokens"] > 4096
        assert billed["t2"]["llm_cache_read_tokens"] == billed["t1"]["llm_cache_write_tokens"]
