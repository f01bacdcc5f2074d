"""The warm-up: turn context prepared from the caller's transcripts before the turn ends."""

from __future__ import annotations

import asyncio

from parley.brain.conversation import fold
from parley.brain.knowledge import ingest
from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.llm.local_responder import LocalResponder
from parley.brain.worker import BrainWorker, Context, Warmup
from parley.common.events import (
    SpeechStarted,
    SpeechStopped,
    TranscriptFinal,
    TranscriptPartial,
    TurnUserEnded,
)
from parley.devkit.emulators.anthropic import ScriptedReply

from .conftest import AGENT, ORG, open_call, services, user_says


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def recording_warmup() -> tuple[Warmup, list[tuple[str, str]]]:
    """A warm-up whose preparations are recorded as (agent, text)."""
    prepared: list[tuple[str, str]] = []

    async def prepare(org: str, call: str, agent: str, text: str, previous: str) -> Context:
        prepared.append((agent, text))
        return Context()

    return Warmup(prepare), prepared


async def final_then_take(warmup: Warmup, call_id: str, turn_id: str, text: str, *,
                          previous: str) -> Context | None:
    """The recogniser's final ``text`` of ``turn_id`` comes (and is warmed); then the turn,
    ended on those words after ``previous``, takes what was warmed for it (None: nothing)."""
    warmup.on_event(TranscriptFinal(org_id=ORG, call_id=call_id, text=text, utterance_id=turn_id))
    return await warmup.take(call_id, text, agent_id="", previous=previous)


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
    context = await warmup.take("c1", "And a whitening?", agent_id=AGENT,
                                previous="How much is a cleaning?")
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


async def test_an_ended_turns_words_are_not_expected_but_that_turn_still_takes_them() -> None:
    warmup, _ = recording_warmup()
    warmup.on_event(TranscriptFinal(org_id=ORG, call_id="c1", text="What time do you open?",
                                    utterance_id="t1"))
    assert warmup.expected("c1") is not None
    # The turn ends (seen live); its handler, here or on another instance, has not run yet.
    warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c1", turn_id="t1",
                                  text="What time do you open?"))
    assert warmup.expected("c1") is None  # no speculation on them at the next speech.stopped
    context = await warmup.take("c1", "What time do you open?", agent_id="")
    assert context is not None and context.warm

    # The next turn may say the same words: they are its own.
    warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c1", turn_id="t1",
                                  text="What time do you open?"))
    warmup.on_event(TranscriptFinal(org_id=ORG, call_id="c1", text="What time do you open?",
                                    utterance_id="t2"))
    expected = warmup.expected("c1")
    assert expected is not None and expected[0] == "What time do you open?"


async def test_a_turn_of_keys_leaves_the_spoken_turn_being_said_warm() -> None:
    # Media ends a turn of keys (k1) while a spoken one goes on: the words said before the
    # keys were forgotten, and the spoken turn missed its warmed context.
    warmup, prepared = recording_warmup()
    warmup.on_event(TranscriptFinal(org_id=ORG, call_id="c1", text="My order number is",
                                    utterance_id="t1"))
    warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c1", turn_id="k1", text="1234#",
                                  reason="dtmf"))
    expected = warmup.expected("c1")
    assert expected is not None and expected[0] == "My order number is"
    warmup.on_event(TranscriptFinal(org_id=ORG, call_id="c1", text="and it never came.",
                                    utterance_id="t1"))
    warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c1", turn_id="t1",
                                  text="My order number is and it never came."))
    context = await warmup.take("c1", "My order number is and it never came.", agent_id="")
    assert context is not None and context.warm
    assert prepared[-1] == ("", "My order number is and it never came.")


async def test_late_words_of_an_ended_turn_are_not_the_next_turns() -> None:
    warmup, prepared = recording_warmup()
    warmup.on_event(TranscriptPartial(org_id=ORG, call_id="c1", text="What time do you open",
                                      utterance_id="t1"))
    # Media ended t1 at its max wait on the partial; the slow recogniser's final comes after.
    warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c1", turn_id="t1",
                                  text="What time do you open"))
    warmup.on_event(TranscriptFinal(org_id=ORG, call_id="c1", text="What time do you open?",
                                    utterance_id="t1"))
    assert warmup.expected("c1") is None
    warmup.on_event(TranscriptFinal(org_id=ORG, call_id="c1", text="Do you take Delta Dental?",
                                    utterance_id="t2"))
    expected = warmup.expected("c1")
    assert expected is not None and expected[0] == "Do you take Delta Dental?"
    await asyncio.sleep(0)
    assert prepared[-1][1] == "Do you take Delta Dental?"
    assert not any("open?" in text for _, text in prepared)  # the late final: never warmed


async def test_no_billed_speculation_on_an_answered_turns_late_words(
        bus, pool, emulator, recorder) -> None:
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        await open_call(bus, "w2")
        await recorder.wait("agent.say", "w2")  # greeted: this instance follows the call
        emulator.script(ScriptedReply(text="We open at eight."))
        await user_says(bus, "w2", "t1", "What time do you open")
        await recorder.wait("turn.completed", "w2")
        assert len(emulator.requests) == 1
        # The recogniser's final for t1 comes after the turn was answered, then the caller
        # starts the next turn and stops before the recogniser says anything of it.
        await bus.publish(TranscriptFinal(org_id=ORG, call_id="w2",
                                          text="What time do you open on Saturday?",
                                          utterance_id="t1"))
        await bus.publish(SpeechStarted(org_id=ORG, call_id="w2", offset_ms=5000))
        await bus.publish(SpeechStopped(org_id=ORG, call_id="w2", offset_ms=5600))
        await asyncio.sleep(0.3)
        assert len(emulator.requests) == 1  # no speculation on the previous turn's words
        assert worker.speculations.get("w2") is None
    finally:
        await worker.stop()
        await llm.aclose()


async def test_a_turn_takes_only_what_was_warmed_knowing_its_previous_turns_words() -> None:
    # A follow-up's knowledge is searched with the caller's previous turn's words too: what
    # was warmed without them (an instance that did not see that turn end) is not the turn's.
    warmup, _ = recording_warmup()
    assert await final_then_take(warmup, "c1", "t2", "How much is it?",
                                 previous="Do you do teeth whitening?") is None

    warmup.learn_words("c1", "Do you do teeth whitening?")  # from the fold of t1's unit of work
    context = await final_then_take(warmup, "c1", "t2", "How much is it?",
                                    previous="Do you do teeth whitening?")
    assert context is not None and context.warm
    # Seen live, a turn's end gives the next turn its previous words: a follow-up's, with the
    # subject it went on with (a follow-up to a follow-up keeps the subject).
    warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c1", turn_id="t2", text="How much is it?"))
    warmup.learn_words("c1", "Do you do teeth whitening?")  # an older fold changes nothing
    assert await final_then_take(warmup, "c1", "t3", "And how long?",
                                 previous="How much is it?") is None
    context = await final_then_take(warmup, "c1", "t3", "And how long?",
                                    previous="Do you do teeth whitening? How much is it?")
    assert context is not None and context.warm
    # A revision of that turn goes on from the subject before it, as the fold does.
    warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c1", turn_id="t3", text="And how long?"))
    warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c1", turn_id="t4",
                                  text="And how long does it take?", revises="t3"))
    warmup.on_event(TranscriptFinal(org_id=ORG, call_id="c1", text="Is it safe?",
                                    utterance_id="t5"))
    conversation = fold("c1", [
        TurnUserEnded(org_id=ORG, call_id="c1", turn_id=turn_id, text=text, revises=revises)
        for turn_id, text, revises in [
            ("t1", "Do you do teeth whitening?", ""), ("t2", "How much is it?", ""),
            ("t3", "And how long?", ""), ("t4", "And how long does it take?", "t3"),
            ("t5", "Is it safe?", "")]])
    context = await warmup.take("c1", "Is it safe?", agent_id="",
                                previous=conversation.previous_words["t5"])
    assert context is not None and context.warm


async def test_a_follow_up_seen_live_by_an_instance_that_missed_its_subject_learns_it() -> None:
    """An instance started mid-call (a deploy) sees the caller's "How much is it?" end live,
    not the "Do you do teeth whitening?" before it: its warm-ups carried "How much is it?"
    alone as the subject, and the fold of that turn's unit of work, which knows the whole
    call, was not heard (a turn end had been seen live), so every warm-up of the follow-ups
    after it was made for another search than the turn's, and not taken (nor a speculation
    made from it adopted). The fold of the turn seen live now gives it its subject."""
    warmup, _ = recording_warmup()
    warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c1", turn_id="t2", text="How much is it?"))
    conversation = fold("c1", [
        TurnUserEnded(org_id=ORG, call_id="c1", turn_id=turn_id, text=text)
        for turn_id, text in [("t1", "Do you do teeth whitening?"), ("t2", "How much is it?")]])
    warmup.learn_words("c1", conversation.subject_after["t2"], turn_id="t2")
    context = await final_then_take(warmup, "c1", "t3", "And how long?",
                                    previous="Do you do teeth whitening? How much is it?")
    assert context is not None and context.warm
    # A fold of an earlier turn still changes nothing.
    warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c1", turn_id="t3", text="And how long?"))
    warmup.learn_words("c1", conversation.subject_after["t2"], turn_id="t2")
    context = await final_then_take(
        warmup, "c1", "t4", "Is it safe?",
        previous="Do you do teeth whitening? How much is it? And how long?")
    assert context is not None and context.warm
    # A revision of the turn seen live goes on from the subject the fold had before it.
    warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c2", turn_id="t2", text="How much?"))
    warmup.learn_words("c2", conversation.subject_after["t2"], turn_id="t2",
                       before=conversation.subject_before["t2"])
    warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c2", turn_id="t3", text="How much is it?",
                                  revises="t2"))
    context = await final_then_take(warmup, "c2", "t4", "And how long?",
                                    previous="Do you do teeth whitening? How much is it?")
    assert context is not None and context.warm


async def test_the_warm_up_carries_a_subject_as_the_fold_does() -> None:
    """A question naming its own subject in few words ("Do you take Visa?") starts one, and a
    follow-up in its frame ("And Mastercard?") is warmed with it alone, as the turn's fold
    searches: both decide follow-ups by the same words (before, by their count, both took
    "Do you take Visa?" for a follow-up of the whitening question)."""
    warmed: list[tuple[str, str]] = []

    async def prepare(org: str, call: str, agent: str, text: str, previous: str) -> Context:
        warmed.append((text, previous))
        return Context()

    warmup = Warmup(prepare)
    said = [("t1", "How much does teeth whitening cost at your office?"),
            ("t2", "Do you take Visa?"), ("t3", "And Mastercard?"),
            ("t4", "What would that treatment cost me?"), ("t5", "And how long?")]
    conversation = fold("c1", [TurnUserEnded(org_id=ORG, call_id="c1", turn_id=turn_id,
                                             text=text) for turn_id, text in said])
    for turn_id, text in said:
        warmup.on_event(TranscriptFinal(org_id=ORG, call_id="c1", text=text,
                                        utterance_id=turn_id))
        previous = conversation.previous_words.get(turn_id, "")
        context = await warmup.take("c1", text, agent_id="", previous=previous)
        assert context is not None and context.warm, (turn_id, warmed[-1], previous)
        warmup.on_event(TurnUserEnded(org_id=ORG, call_id="c1", turn_id=turn_id, text=text))
    assert [previous for _, previous in warmed] == [
        "", "How much does teeth whitening cost at your office?", "Do you take Visa?",
        "Do you take Visa? And Mastercard?",
        "Do you take Visa? And Mastercard? What would that treatment cost me?"]


async def test_words_warmed_without_their_pointing_word_are_not_taken_for_a_follow_up(
        bus, pool, recorder) -> None:
    """A plumber's line: "My kitchen sink is leaking" — "Can you fix it?", the last word not yet
    in the words warmed ("Can you fix").

    A warm-up is taken when it holds the final words of three letters or more, which "it" is
    not; but since 304102c that word decides the search: "Can you fix" (naming "fix") was
    searched alone and taken for the follow-up "Can you fix it?", whose own search goes with
    the leak. A warm-up is now taken only if its words decide the follow-up as the final ones.
    """
    await ingest(pool, ORG, AGENT, "leaks.md", b"Leaking taps and sinks are usually fixed in "
                 b"one visit; we carry common washers and cartridges.")
    await ingest(pool, ORG, AGENT, "fixtures.md", b"We fix and fit toilets, showers and water "
                 b"heaters.")
    await open_call(bus, "w-fix")
    worker = BrainWorker(services(bus, pool, [LocalResponder()]))
    await worker.start()
    try:
        await user_says(bus, "w-fix", "t1", "My kitchen sink is leaking")
        await recorder.wait("turn.completed", "w-fix")
        await bus.publish(TranscriptFinal(org_id=ORG, call_id="w-fix", text="Can you fix",
                                          utterance_id="t2"))
        await until(lambda: worker.warmup.expected("w-fix") is not None)
        await user_says(bus, "w-fix", "t2", "Can you fix it?")
        await recorder.wait("turn.completed", "w-fix", count=2)
        retrieved = recorder.of("knowledge.retrieved", "w-fix")
    finally:
        await worker.stop()
    assert retrieved[1].query == "My kitchen sink is leaking Can you fix it?"
