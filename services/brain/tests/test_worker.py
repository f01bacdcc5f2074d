"""The brain worker against real NATS and Postgres, the real anthropic SDK and its emulator."""

from __future__ import annotations

import asyncio
import uuid

import msgspec

from parley.brain.conversation import fold
from parley.brain.knowledge import ingest
from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.llm.local_responder import LocalResponder
from parley.brain.worker import BrainWorker
from parley.common.configuration import AgentSettings
from parley.common.events import (
    AgentSay,
    AgentSpeechInterrupted,
    Event,
    ToolCompleted,
    ToolRequested,
    TurnUserEnded,
)
from parley.devkit.emulators.anthropic import ScriptedReply, ScriptedToolUse

from .conftest import (
    AGENT,
    ORG,
    SETTINGS,
    conversation,
    open_call,
    running_brain,
    services,
    turn_context,
    user_says,
)


async def test_greets_then_answers_clause_by_clause(bus, pool, emulator, recorder) -> None:
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        emulator.script(ScriptedReply(text="We open at eight in the morning, Monday to Friday. "
                                           "Would you like to book a visit?"))
        await open_call(bus, "c1")
        greeting, = await recorder.wait("agent.say", "c1")
        assert (greeting.turn_id, greeting.text, greeting.last) == (
            "t0", SETTINGS.greeting, True)
        await user_says(bus, "c1", "t1", "When do you open?")
        done, = await recorder.wait("turn.completed", "c1")
        says = [e for e in recorder.of("agent.say", "c1") if e.turn_id == "t1"]
        assert [s.seq for s in says] == list(range(len(says))) and says[-1].last
        assert len(says) >= 2  # streamed in clauses, not one blob
        assert " ".join(s.text for s in says).strip() == (
            "We open at eight in the morning, Monday to Friday. Would you like to book a visit?")
        assert done.usage.output_tokens > 0 and done.ttft_ms > 0 and not done.cancelled
        assert done.provider == "anthropic"
        started, = recorder.of("turn.started", "c1")
        assert started.provider == "anthropic"
        request = emulator.requests[-1]
        assert request["system"][0]["cache_control"] == {"type": "ephemeral"}
        assert conversation(request)[-1] == {"role": "user", "content": "When do you open?"}
        assert "Thanks for calling" in str(request["messages"])  # the greeting is history
        assert worker.replays == 1  # the turn folded the call from memory, not from a replay
    finally:
        await worker.stop()
        await llm.aclose()


async def test_a_greeting_said_after_the_caller_spoke_comes_before_their_words(
        bus, pool, emulator, recorder) -> None:
    """The brain was late to greet (restarting, backlogged) and the caller said "Hello?" into
    the silence: the greeting's agent.say was stored after their turn.user_ended, so the fold
    had it after their words and the request ended with the agent's greeting, which Anthropic
    reads as a prefill to continue (the model went on greeting instead of answering). Now what
    the agent said for another turn since the caller spoke comes before their words: the
    request ends with the caller's turn."""
    await open_call(bus, "c-late")  # (no brain running yet: the turn ends before the greeting)
    await user_says(bus, "c-late", "t1", "Hello? Is anyone there?")
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    emulator.script(ScriptedReply(text="Yes, I'm here. How can I help?"))
    async with running_brain(bus, pool, [llm]):
        done, = await recorder.wait("turn.completed", "c-late")
        assert not done.cancelled
        greeting, = [e for e in recorder.of("agent.say", "c-late") if e.turn_id == "t0"]
    ended, = recorder.of("turn.user_ended", "c-late")
    assert recorder.events.index(ended) < recorder.events.index(greeting)  # the late greeting
    request, = emulator.requests
    assert conversation(request) == [
        {"role": "assistant", "content": SETTINGS.greeting},
        {"role": "user", "content": "Hello? Is anyone there?"}]


async def test_tool_use_round_trip_continues_the_turn(bus, pool, emulator, recorder) -> None:
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        emulator.script(
            ScriptedReply(text="Let me check the calendar.", tool_uses=(ScriptedToolUse(
                name="book_appointment", input={"day": "Friday", "time": "10:00"},
                id="toolu_1"),)),
            ScriptedReply(text="You're booked for Friday at ten."))
        await open_call(bus, "c2")
        await user_says(bus, "c2", "t1", "Can I come Friday at ten?")
        requested, = await recorder.wait("tool.requested", "c2")
        assert (requested.name, requested.arguments) == (
            "book_appointment", {"day": "Friday", "time": "10:00"})
        assert not recorder.of("turn.completed", "c2")
        await bus.publish(ToolCompleted(org_id=ORG, call_id="c2", tool_call_id="toolu_1",
                                        name="book_appointment", result={"booked": True}))
        await recorder.wait("turn.completed", "c2")
        says = [e for e in recorder.of("agent.say", "c2") if e.turn_id == "t1"]
        # With the tool request, the filler media says if the tool turns out slow; the round
        # the outcome starts numbers its clauses after it.
        assert [(s.text, s.filler_after_ms) for s in says] == [
            ("Let me check the calendar.", 0), ("One moment.", 1500),
            ("You're booked for Friday at ten.", 0)]
        assert [s.seq for s in says] == [0, 1, 2] and says[-1].last and not says[0].last
        stored = [e for e in recorder.events if e.call_id == "c2"]
        filler_at = next(i for i, e in enumerate(stored) if getattr(e, "filler_after_ms", 0))
        assert filler_at < stored.index(requested)  # before the tool can even start
        second = emulator.requests[-1]["messages"]
        assert any(block.get("type") == "tool_result" for m in second
                   if isinstance(m["content"], list) for block in m["content"])
        assert "One moment" not in str(second)  # perhaps never said: not the model's words
    finally:
        await worker.stop()
        await llm.aclose()


async def test_what_was_heard_of_a_tool_turn_reaches_the_model_round_by_round(
        bus, pool, emulator, recorder) -> None:
    """The caller cut in as round 1 (after the booking) was being said. The model's next request
    read "Let me check the calendar. One moment. You're booked for" before the tool use, and
    nothing after its result: it saw itself claim the booking before making it."""
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    async with running_brain(bus, pool, [llm]):
        emulator.script(
            ScriptedReply(text="Let me check the calendar.", tool_uses=(ScriptedToolUse(
                name="book_appointment", input={"day": "Friday"}, id="toolu_7"),)),
            ScriptedReply(text="You're booked for Friday at ten."),
            ScriptedReply(text="Sure, Monday then."))
        await open_call(bus, "c-heard")
        await user_says(bus, "c-heard", "t1", "Can I come Friday at ten?")
        await recorder.wait("tool.requested", "c-heard")
        await bus.publish(ToolCompleted(org_id=ORG, call_id="c-heard", tool_call_id="toolu_7",
                                        name="book_appointment", result={"booked": True}))
        await recorder.wait("turn.completed", "c-heard")
        await bus.publish(AgentSpeechInterrupted(
            org_id=ORG, call_id="c-heard", turn_id="t1",
            played_text="Let me check the calendar. One moment. You're booked for"))
        await user_says(bus, "c-heard", "t2", "Actually, make it Monday.")
        await recorder.wait("turn.completed", "c-heard", count=2)
    sent = [(m["role"], block.get("text") or block["type"])
            for m in conversation(emulator.requests[-1])
            for block in ([{"text": m["content"]}] if isinstance(m["content"], str)
                          else m["content"])]
    assert sent[-5:] == [
        ("assistant", "Let me check the calendar."), ("assistant", "tool_use"),
        ("user", "tool_result"), ("assistant", "You're booked for"),
        ("user", "Actually, make it Monday.")]


async def test_barge_in_cancels_generation_and_history_keeps_what_was_heard(
        bus, pool, emulator, recorder) -> None:
    emulator.tokens_per_second = 20
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        emulator.script(ScriptedReply(text="Our hours are eight to five on weekdays, " * 8))
        await open_call(bus, "c3")
        await user_says(bus, "c3", "t1", "What are your hours?")
        first, = await recorder.wait("agent.say", "c3", where=lambda e: e.turn_id == "t1")
        await bus.publish(AgentSpeechInterrupted(org_id=ORG, call_id="c3", turn_id="t1",
                                                 played_text="Our hours are"))
        done, = await recorder.wait("turn.completed", "c3")
        assert done.cancelled
        await asyncio.sleep(0.3)
        assert emulator.aborted, "the LLM stream was not closed"
        says = [e for e in recorder.of("agent.say", "c3") if e.turn_id == "t1"]
        assert not any(s.last for s in says)
        events = await bus.replay_call("c3")
        conversation = fold("c3", events)
        assert conversation.llm_messages()[-1].text == "Our hours are"
    finally:
        await worker.stop()
        await llm.aclose()


async def test_a_turn_re_run_after_failing_mid_reply_goes_on_from_what_the_caller_heard(
        bus, pool, emulator, recorder) -> None:
    reply = "We open at eight. We close at five. A cleaning is ninety five dollars. Anything else?"

    def recovered(body: dict) -> ScriptedReply:
        emulator.faults.error_after_tokens = None  # the provider is well again
        return ScriptedReply(text=reply)

    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        await open_call(bus, "c6")
        await recorder.wait("agent.say", "c6")
        # The first answer breaks off (overloaded_error) after its first two clauses' words.
        emulator.faults.error_after_tokens = 9
        emulator.script(ScriptedReply(text=reply), recovered)
        await user_says(bus, "c6", "t1", "Tell me about the clinic.")
        done, = await recorder.wait("turn.completed", "c6", timeout=15)
        assert not done.cancelled and len(emulator.requests) == 2
        said = [(e.seq, e.text, e.last) for e in recorder.of("agent.say", "c6")
                if e.turn_id == "t1"]
        assert [seq for seq, _, _ in said] == list(range(len(said))), said
        assert " ".join(text for _, text, _ in said if text) == reply  # nothing lost or repeated
        assert [last for _, _, last in said].count(True) == 1 and said[-1][2]
        # The re-run asked the model to go on from the clauses already said (a prefill).
        heard = " ".join(text for seq, text, _ in said if seq < 2)
        assert heard.startswith("We open at eight.")
        assert emulator.requests[1]["messages"][-1] == {
            "role": "assistant", "content": [{"type": "text", "text": heard}]}
    finally:
        await worker.stop()
        await llm.aclose()


async def test_local_responder_is_grounded_in_ingested_knowledge(bus, pool, recorder) -> None:
    await ingest(pool, ORG, AGENT, "prices.md", b"# Prices\n\nA teeth cleaning costs $95. "
                 b"A whitening session costs $250.\n\nWe accept most dental insurance plans.")
    worker = BrainWorker(services(bus, pool, [LocalResponder()]))
    await worker.start()
    try:
        await open_call(bus, "c4")
        await user_says(bus, "c4", "t1", "How much is a teeth cleaning?")
        await recorder.wait("turn.completed", "c4")
        answer = " ".join(e.text for e in recorder.of("agent.say", "c4") if e.turn_id == "t1")
        assert "$95" in answer, answer
        retrieved, = recorder.of("knowledge.retrieved", "c4")
        assert retrieved.chunk_ids and retrieved.scores[0] > 0
        assert recorder.of("intent.detected", "c4")[0].intent

        await user_says(bus, "c4", "t2", "Who is the dentist's favourite football team?")
        await recorder.wait("turn.completed", "c4", count=2)
        answer = " ".join(e.text for e in recorder.of("agent.say", "c4") if e.turn_id == "t2")
        assert "follow up" in answer.lower() or "check" in answer.lower(), answer
        assert not any(ch.isdigit() for ch in answer)
    finally:
        await worker.stop()


async def test_local_responder_answers_a_question_said_after_a_greeting(
        bus, pool, recorder) -> None:
    """Callers open with a greeting and say what they call about in the same breath: "Hi, I'm
    calling about teeth whitening", "Hey, how much for a filling, thanks", "Hello, whitening
    and cleaning prices please". Each was a greeting to the intent rules (a question must open
    with its question word or end with "?"), and the local responder only greeted back: "Hi!
    How can I help you today?". What follows a greeting is now classified on its own.
    """
    await ingest(pool, ORG, AGENT, "prices.md", b"A teeth cleaning costs $95. A whitening "
                 b"session costs $250. A filling starts at $180.")
    said = {"Hi, I'm calling about teeth whitening": "$250",
            "Hey, how much for a filling, thanks": "$180",
            "Hello, whitening and cleaning prices please": "$95",
            "Good morning": "How can I help"}
    async with running_brain(bus, pool, [LocalResponder()]):
        for number, (text, expected) in enumerate(said.items()):
            call = f"c-hi-{number}"
            await open_call(bus, call)
            await user_says(bus, call, "t1", text)
            await recorder.wait("turn.completed", call)
            answer = " ".join(e.text for e in recorder.of("agent.say", call)
                              if e.turn_id == "t1")
            assert expected in answer, (text, answer)


async def test_local_responder_answers_a_follow_up_about_the_previous_turns_subject(
        bus, pool, recorder) -> None:
    """The demo's price list; "Do you do whitening?" — "How much does it cost?".

    The follow-up is searched with the previous turn's words (2a5672f), but the responder
    answered it by its own words, which name no subject: "A teeth cleaning costs $95. A
    check-up with X-rays costs $140.". It now answers about the previous turn's subject, and
    declines when no sentence answers it ("deep cleanings": a teeth cleaning is another one).
    """
    await ingest(pool, ORG, AGENT, "prices.md", b"A teeth cleaning costs $95. A check-up with "
                 b"X-rays costs $140.\nA whitening session costs $250. A filling starts at $180.")
    async with running_brain(bus, pool, [LocalResponder()]):
        await open_call(bus, "c-local-follow")
        said = ["Do you do whitening?", "How much does it cost?",
                "And do you do deep cleanings?", "How much does it cost?"]
        for number, text in enumerate(said, 1):
            await user_says(bus, "c-local-follow", f"t{number}", text)
            await recorder.wait("turn.completed", "c-local-follow", count=number)
        answers = [" ".join(e.text for e in recorder.of("agent.say", "c-local-follow")
                            if e.turn_id == f"t{number}") for number in (2, 4)]
        assert answers[0] == "A whitening session costs $250.", answers
        assert "check" in answers[1] and not any(ch.isdigit() for ch in answers[1]), answers


async def test_a_follow_up_to_a_follow_up_keeps_the_subject(bus, pool, emulator,
                                                              recorder) -> None:
    """"Do you do teeth whitening?" — "How much is it?" — "And how long?".

    A follow-up was searched with the caller's previous turn's words only: the second
    follow-up with the first's ("How much is it? And how long?"), which name nothing, so it
    found nothing and the model, told nothing relevant was found, declined how long a
    whitening takes though the passage it had been shown says so. The words a follow-up is
    searched with now carry the subject: the last turn that was no follow-up and the
    follow-ups since.
    """
    await ingest(pool, ORG, AGENT, "whitening.md",
                 b"Teeth whitening: a whitening session takes an hour and costs $300.")
    await ingest(pool, ORG, AGENT, "hours.md", b"We open at eight, Monday to Friday.")
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    async with running_brain(bus, pool, [llm]):
        emulator.script(ScriptedReply(text="Yes, we do whitening."),
                        ScriptedReply(text="It costs $300."),
                        ScriptedReply(text="About an hour."))
        await open_call(bus, "c-follow2")
        said = ["Do you do teeth whitening?", "How much is it?", "And how long?"]
        for number, text in enumerate(said, 1):
            await user_says(bus, "c-follow2", f"t{number}", text)
            await recorder.wait("turn.completed", "c-follow2", count=number)
        context = turn_context(emulator.requests[-1])
        assert "takes an hour" in context and "nothing relevant" not in context
        third = recorder.of("knowledge.retrieved", "c-follow2")[2]
        assert third.query == "Do you do teeth whitening? How much is it? And how long?"
        # A question of its own starts a new subject.
        emulator.script(ScriptedReply(text="We open at eight."),
                        ScriptedReply(text="Monday to Friday."))
        await user_says(bus, "c-follow2", "t4", "What time do you open on Monday?")
        await recorder.wait("turn.completed", "c-follow2", count=4)
        await user_says(bus, "c-follow2", "t5", "Which days?")
        await recorder.wait("turn.completed", "c-follow2", count=5)
        fifth = recorder.of("knowledge.retrieved", "c-follow2")[4]
        assert fifth.query == "What time do you open on Monday? Which days?"


async def test_a_short_question_naming_its_own_subject_is_no_follow_up(
        bus, pool, recorder) -> None:
    """"How much does teeth whitening cost at your office?" — "Do you take Visa?" — "And
    Mastercard?" — "What would that treatment cost me?" — "And how long?".

    A turn was a follow-up by its count of words (three of three letters or more): "Do you
    take Visa?" was one, so it and "And Mastercard?" after it were searched with the whitening
    question in front, and the payments passage came second behind the whitening one. "What
    would that treatment cost me?" (more words, naming nothing) was a subject of its own, so
    the follow-up after it was searched with words naming nothing. A follow-up now refers back
    ("it", "that", "and…", an elliptical "How long?") or names nothing; "Do you take Visa?"
    does neither, and "And Mastercard?" goes on in its frame.
    """
    await ingest(pool, ORG, AGENT, "whitening.md",
                 b"Teeth whitening: a whitening session takes an hour and costs $300.")
    await ingest(pool, ORG, AGENT, "payments.md",
                 b"Payment: we take Visa, Mastercard and American Express, cash and debit cards.")
    await ingest(pool, ORG, AGENT, "hours.md", b"We open at eight, Monday to Friday.")
    await ingest(pool, ORG, AGENT, "parking.md", b"Parking is free behind the building.")
    async with running_brain(bus, pool, [LocalResponder()]):
        await open_call(bus, "c-visa")
        said = ["How much does teeth whitening cost at your office?", "Do you take Visa?",
                "And Mastercard?", "Do you do teeth whitening?",
                "What would that treatment cost me?", "And how long?"]
        for number, text in enumerate(said, 1):
            await user_says(bus, "c-visa", f"t{number}", text)
            await recorder.wait("turn.completed", "c-visa", count=number)
        retrieved = recorder.of("knowledge.retrieved", "c-visa")
    assert [r.query for r in retrieved[1:]] == [
        "Do you take Visa?", "Do you take Visa? And Mastercard?", "Do you do teeth whitening?",
        "Do you do teeth whitening? What would that treatment cost me?",
        "Do you do teeth whitening? What would that treatment cost me? And how long?"]
    payments = retrieved[1].chunk_ids[0]
    assert retrieved[2].chunk_ids[0] == payments
    assert retrieved[5].chunk_ids[0] == retrieved[3].chunk_ids[0] != payments


async def test_a_question_adding_a_subject_of_its_own_is_searched_by_its_own_words(
        bus, pool, recorder) -> None:
    """A plumber's line: "How much is the call-out fee?" — "Also, do you handle emergencies?".

    A word adding to what was said ("also", "too", "as well") made any turn a follow-up, so the
    emergencies question, naming its own subject, was searched with the fee question in front:
    the fee passage came first (0.17, emergencies 0.04) and the local responder, answering
    about the subject it was given, said it would check and follow up. (The old count of words
    searched it alone: four of three letters or more.) Such a turn is now a subject of its own;
    "Weekends too?" (a fragment naming nothing else) still goes on with the subject.
    """
    await ingest(pool, ORG, AGENT, "rates.md", b"Our call-out fee is $89, which covers the first "
                 b"half hour of labour. After that labour is $120 an hour.")
    await ingest(pool, ORG, AGENT, "emergency.md", b"For emergencies such as burst pipes or "
                 b"flooding we come out 24 hours a day, usually within two hours.")
    await ingest(pool, ORG, AGENT, "area.md", b"We serve the whole city and suburbs within 30 "
                 b"miles.")
    async with running_brain(bus, pool, [LocalResponder()]):
        await open_call(bus, "c-also")
        said = ["How much is the call-out fee?", "Also, do you handle emergencies?",
                "Do you serve the suburbs too?"]
        for number, text in enumerate(said, 1):
            await user_says(bus, "c-also", f"t{number}", text)
            await recorder.wait("turn.completed", "c-also", count=number)
        retrieved = recorder.of("knowledge.retrieved", "c-also")
        answers = [" ".join(e.text for e in recorder.of("agent.say", "c-also")
                            if e.turn_id == f"t{number}") for number in (2, 3)]
    assert [r.query for r in retrieved[1:]] == said[1:]
    assert answers[0].startswith("For emergencies"), answers
    assert answers[1] == "We serve the whole city and suburbs within 30 miles.", answers


async def test_the_callers_name_and_number_are_no_subject(bus, pool, recorder) -> None:
    """A dental booking: "Do you do teeth whitening?" — "Yes please" — "My name is John Smith"
    — "My number is 555-0134" — "How much will it be?".

    The caller's name, a clause naming words none of the lists know, was taken for a subject of
    its own (the old count of words had it a follow-up), so the price question after it was
    searched with "My name is John Smith" in front and found nothing: the local responder said
    it would check on a price it had (and the local responder, passing over follow-ups naming
    nothing, took "My number is 555-0134" for its subject). A caller telling their name,
    number or address answers the agent and goes on with the subject.
    """
    await ingest(pool, ORG, AGENT, "prices.md", b"A teeth cleaning costs $95. A whitening "
                 b"session costs $250 and takes an hour.")
    await ingest(pool, ORG, AGENT, "hours.md", b"We open at eight, Monday to Friday.")
    async with running_brain(bus, pool, [LocalResponder()]):
        await open_call(bus, "c-name")
        said = ["Do you do teeth whitening?", "Yes please", "My name is John Smith",
                "My number is 555-0134", "How much will it be?"]
        for number, text in enumerate(said, 1):
            await user_says(bus, "c-name", f"t{number}", text)
            await recorder.wait("turn.completed", "c-name", count=number)
        retrieved = recorder.of("knowledge.retrieved", "c-name")
        answer = " ".join(e.text for e in recorder.of("agent.say", "c-name")
                          if e.turn_id == "t5")
    assert retrieved[4].query.startswith("Do you do teeth whitening?"), retrieved[4].query
    assert answer == "A whitening session costs $250 and takes an hour.", answer


async def test_an_agent_speaking_another_language_searches_a_turn_by_its_own_words(
        bus, pool, recorder) -> None:
    """A Spanish-speaking dental agent: "¿Cuánto cuesta una limpieza?" — "¿Aceptan tarjetas?" —
    "¿Qué horario tienen?".

    The follow-up rule's words are English: to it every Spanish word names something and no
    Spanish question is a clause, so each short question was a fragment going on with the one
    before. "¿Aceptan tarjetas?" was searched behind the cleaning's price (the prices passage
    first, payments at 0.06) and "¿Qué horario tienen?" behind three questions. A turn for an
    agent of another language is searched by its own words, with the subject only if they
    find nothing.
    """
    await ingest(pool, ORG, AGENT, "precios.md", b"Una limpieza dental cuesta 95 euros. "
                 b"El blanqueamiento cuesta 250 euros.")
    await ingest(pool, ORG, AGENT, "horario.md", b"Nuestro horario: abrimos de lunes a "
                 b"viernes de ocho a cinco.")
    await ingest(pool, ORG, AGENT, "pagos.md", b"Aceptamos tarjetas Visa y Mastercard.")
    spanish = msgspec.structs.replace(SETTINGS, language="es-ES")

    async def agents(org_id: str, agent_id: str) -> AgentSettings:
        return spanish

    async with running_brain(bus, pool, [LocalResponder()], agents=agents):
        await open_call(bus, "c-es")
        said = ["¿Cuánto cuesta una limpieza?", "¿Aceptan tarjetas?", "¿Qué horario tienen?"]
        for number, text in enumerate(said, 1):
            await user_says(bus, "c-es", f"t{number}", text)
            await recorder.wait("turn.completed", "c-es", count=number)
        retrieved = recorder.of("knowledge.retrieved", "c-es")
    assert [r.query for r in retrieved] == said
    assert [len(r.chunk_ids) for r in retrieved] == [1, 1, 1]
    assert len({r.chunk_ids[0] for r in retrieved}) == 3


async def test_local_responder_answers_after_a_turn_pointing_back_about_its_subject(
        bus, pool, recorder) -> None:
    """"Do you do teeth whitening?" — "Great, I'd like to book one" — "How much will it be?".

    The brain searched the price question with the whitening one in front ("book one" points
    back), but the local responder took the turn before it for its subject, a follow-up naming
    a phrase ("book"), and said it would check on the price. A turn pointing back goes on with
    the subject before it, for the local responder too.
    """
    await ingest(pool, ORG, AGENT, "prices.md", b"A teeth cleaning costs $95. A whitening "
                 b"session costs $250.")
    async with running_brain(bus, pool, [LocalResponder()]):
        await open_call(bus, "c-book")
        said = ["Do you do teeth whitening?", "Great, I'd like to book one",
                "How much will it be?"]
        for number, text in enumerate(said, 1):
            await user_says(bus, "c-book", f"t{number}", text)
            await recorder.wait("turn.completed", "c-book", count=number)
        answer = " ".join(e.text for e in recorder.of("agent.say", "c-book")
                          if e.turn_id == "t3")
    assert answer == "A whitening session costs $250.", answer


def test_the_subject_a_follow_up_carries_is_bounded() -> None:
    """The last turn that was no follow-up and the latest follow-ups since (a revised turn
    passed over, keys not counted); a long run of follow-ups keeps only the latest few."""
    def ended(turn_id: str, text: str, **fields: str) -> TurnUserEnded:
        return TurnUserEnded(org_id=ORG, call_id="c", turn_id=turn_id, text=text, **fields)

    conversation = fold("c", [
        ended("t1", "Do you do teeth whitening?"), ended("t2", "How much?"),
        ended("k1", "1#", reason="dtmf"), ended("t3", "And how long?"),
        ended("t4", "For kids?"), ended("t5", "Also weekends?"), ended("t6", "Is it safe?")])
    assert conversation.previous_words["t2"] == "Do you do teeth whitening?"
    assert conversation.previous_words["t3"] == "Do you do teeth whitening? How much?"
    assert conversation.previous_words["t6"] == (
        "Do you do teeth whitening? And how long? For kids? Also weekends?")
    revised = fold("c", [ended("t1", "Do you do teeth whitening?"), ended("t2", "How much"),
                         ended("t3", "How much is it?", revises="t2"),
                         ended("t4", "And how long?")])
    assert revised.previous_words["t3"] == "Do you do teeth whitening?"
    assert revised.previous_words["t4"] == "Do you do teeth whitening? How much is it?"
    new_subject = fold("c", [ended("t1", "Do you do teeth whitening?"), ended("t2", "How much?"),
                             ended("t3", "What time do you open on Monday?"),
                             ended("t4", "Which days?")])
    assert new_subject.previous_words["t4"] == "What time do you open on Monday?"


async def test_a_newer_user_turn_supersedes_the_running_one(bus, pool, emulator,
                                                            recorder) -> None:
    emulator.tokens_per_second = 10
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        emulator.script(ScriptedReply(text="Let me think about that for a while, " * 10),
                        ScriptedReply(text="Sure, Friday works."))
        await open_call(bus, "c5")
        await user_says(bus, "c5", "t1", "I want to book.")
        await recorder.wait("turn.started", "c5")
        await user_says(bus, "c5", "t2", "Actually, Friday please.")
        completed = await recorder.wait("turn.completed", "c5", count=2)
        by_turn = {c.turn_id: c for c in completed}
        assert by_turn["t1"].cancelled and not by_turn["t2"].cancelled
        t2 = [e.text for e in recorder.of("agent.say", "c5") if e.turn_id == "t2"]
        assert " ".join(t2) == "Sure, Friday works."
    finally:
        await worker.stop()
        await llm.aclose()


async def test_a_turn_of_keys_is_read_back_and_retrieves_no_knowledge(bus, pool,
                                                                       recorder) -> None:
    """Keys pressed ("1234#", turn.user_ended with reason dtmf) were taken for words: knowledge
    was retrieved for "1234#" and the local responder answered it as a question. The keys are
    now read back, with no retrieval or intent for them; the caller's next words retrieve."""
    await ingest(pool, ORG, AGENT, "codes.md", b"# Codes\n\nThe door code is 1234. "
                 b"A teeth cleaning costs $95.")
    worker = BrainWorker(services(bus, pool, [LocalResponder()]))
    await worker.start()
    try:
        await open_call(bus, "c-keys")
        await bus.publish(TurnUserEnded(org_id=ORG, call_id="c-keys", turn_id="k1",
                                        text="1234#", reason="dtmf"))
        await recorder.wait("turn.completed", "c-keys")
        said = " ".join(e.text for e in recorder.of("agent.say", "c-keys") if e.turn_id == "k1")
        assert said == "You pressed 1 2 3 4, then pound."
        assert recorder.of("knowledge.retrieved", "c-keys") == []
        assert recorder.of("intent.detected", "c-keys") == []

        await user_says(bus, "c-keys", "t1", "How much is a teeth cleaning?")
        await recorder.wait("turn.completed", "c-keys", count=2)
        said = " ".join(e.text for e in recorder.of("agent.say", "c-keys") if e.turn_id == "t1")
        assert "$95" in said, said
        retrieved, = recorder.of("knowledge.retrieved", "c-keys")
        assert retrieved.turn_id == "t1"
    finally:
        await worker.stop()


def test_a_turn_of_keys_reaches_the_model_as_keypad_input() -> None:
    conversation = fold("c", [
        TurnUserEnded(org_id=ORG, call_id="c", turn_id="t1", text="I want to check my order."),
        AgentSay(org_id=ORG, call_id="c", turn_id="t1", seq=0,
                 text="Please type the order number, then press pound.", last=True),
        TurnUserEnded(org_id=ORG, call_id="c", turn_id="k1", text="1234#", reason="dtmf")])
    assert [m.text for m in conversation.llm_messages()] == [
        "I want to check my order.", "Please type the order number, then press pound.",
        "[keypad] 1234#"]
    assert (conversation.latest_user_turn, conversation.latest_spoken_turn) == ("k1", "t1")


def test_fold_keeps_only_heard_text_and_numbers_tool_rounds() -> None:
    events: list[Event] = [
        TurnUserEnded(org_id=ORG, call_id="c", turn_id="t1", text="Book me in."),
        AgentSay(org_id=ORG, call_id="c", turn_id="t1", seq=0, text="Checking."),
        ToolRequested(org_id=ORG, call_id="c", turn_id="t1", tool_call_id="x", name="book"),
        ToolCompleted(org_id=ORG, call_id="c", tool_call_id="x", name="book", result="ok"),
        AgentSay(org_id=ORG, call_id="c", turn_id="t1", seq=1, text="Done, you're booked."),
        AgentSay(org_id=ORG, call_id="c", turn_id="t1", seq=1, text="Done, you're booked."),
        AgentSay(org_id=ORG, call_id="c", turn_id="t1", seq=2, text="Anything else?",
                 last=True),
        AgentSpeechInterrupted(org_id=ORG, call_id="c", turn_id="t1",
                               played_text="Checking. Done, you're"),
    ]
    conversation = fold("c", events)
    turn = conversation.turn("t1")
    assert turn.round_starts == [0, 1] and turn.next_seq == 3 and turn.interrupted
    kinds = [type(m).__name__ for m in conversation.llm_messages()]
    assert kinds == ["UserMessage", "AssistantMessage", "ToolUse", "ToolResult",
                     "AssistantMessage"]
    assert [conversation.llm_messages()[i].text for i in (1, 4)] == ["Checking.", "Done, you're"]


def test_an_interruption_after_a_tool_round_cuts_each_round_to_what_was_heard_of_it() -> None:
    """Media's played text runs over every round of the turn's speech (and the tool filler, if it
    was said). All of it was put where round 0's text was, before the tool use, and round 1's
    text was deleted: the model read itself saying "You're booked for" before booking. Now each
    round keeps what was heard of its own text, in its place."""
    def say(seq: int, text: str, *, filler: bool = False) -> AgentSay:
        return AgentSay(org_id=ORG, call_id="c", turn_id="t1", seq=seq, text=text,
                        filler_after_ms=1500 if filler else 0)

    def heard(played: str, *, first_round: tuple[AgentSay, ...]) -> list[tuple[str, str]]:
        conversation = fold("c", [
            TurnUserEnded(org_id=ORG, call_id="c", turn_id="t1", text="Friday at ten?"),
            *first_round, say(len(first_round), "One moment.", filler=True),
            ToolRequested(org_id=ORG, call_id="c", turn_id="t1", tool_call_id="x",
                          name="book"),
            ToolCompleted(org_id=ORG, call_id="c", tool_call_id="x", name="book", result="ok"),
            say(len(first_round) + 1, "You're booked for Friday at ten."),
            say(len(first_round) + 2, "Anything else?"),
            AgentSpeechInterrupted(org_id=ORG, call_id="c", turn_id="t1", played_text=played)])
        return [(type(m).__name__, getattr(m, "text", "")) for m in conversation.llm_messages()]

    check = (say(0, "Let me check"), say(1, "the calendar."))
    asked, use, result = ("UserMessage", "Friday at ten?"), ("ToolUse", ""), ("ToolResult", "")
    assert heard("Let me check the calendar. One moment. You're booked for",
                 first_round=check) == [
        asked, ("AssistantMessage", "Let me check the calendar."), use, result,
        ("AssistantMessage", "You're booked for")]
    # The filler was not said (the tool was quick).
    assert heard("Let me check the calendar. You're booked for Friday at ten. Anything",
                 first_round=check) == [
        asked, ("AssistantMessage", "Let me check the calendar."), use, result,
        ("AssistantMessage", "You're booked for Friday at ten. Anything")]
    # Cut off in round 0: round 1 was never heard.
    assert heard("Let me", first_round=check) == [
        asked, ("AssistantMessage", "Let me"), use, result]
    assert heard("", first_round=check) == [asked, use, result]
    # A round 0 that said nothing before its tool call.
    assert heard("One moment. You're booked", first_round=()) == [
        asked, use, result, ("AssistantMessage", "You're booked")]


def test_a_revised_user_turn_replaces_the_words_it_revises_unless_an_answer_was_heard() -> None:
    def ended(turn_id: str, text: str, revises: str = "") -> TurnUserEnded:
        return TurnUserEnded(org_id=ORG, call_id="c", turn_id=turn_id, text=text,
                             revises=revises)

    def cut(turn_id: str, heard: str) -> AgentSpeechInterrupted:
        return AgentSpeechInterrupted(org_id=ORG, call_id="c", turn_id=turn_id,
                                      played_text=heard)

    said = AgentSay(org_id=ORG, call_id="c", turn_id="t1", seq=0, text="Sorry, say again?")
    unheard = fold("c", [ended("t1", "I would like"), said, cut("t1", ""),
                         ended("t2", "I would like to book Friday.", revises="t1")])
    assert [m.text for m in unheard.llm_messages()] == ["I would like to book Friday."]
    heard = fold("c", [ended("t1", "I would like"), said, cut("t1", "Sorry,"),
                       ended("t2", "I would like to book Friday.", revises="t1")])
    assert [m.text for m in heard.llm_messages()] == [
        "I would like", "Sorry,", "I would like to book Friday."]
    assert heard.latest_user_turn == "t2"


def test_what_the_agent_said_after_the_caller_spoke_comes_before_their_words() -> None:
    """A request must end with the caller's words (or tool results), never with agent text a
    model continues. A clause of the turn before (sent as the caller began their next turn)
    or an idle prompt (fired as they spoke) can be stored after their turn.user_ended: it goes
    before their words, with its own utterance, in the order it was said."""
    def ended(turn_id: str, text: str) -> TurnUserEnded:
        return TurnUserEnded(org_id=ORG, call_id="c", turn_id=turn_id, text=text)

    def say(turn_id: str, seq: int, text: str) -> AgentSay:
        return AgentSay(org_id=ORG, call_id="c", turn_id=turn_id, seq=seq, text=text)

    late_clause = fold("c", [ended("t1", "What are your hours?"), say("t1", 0, "Eight to five."),
                             ended("t2", "And Saturdays?"), say("t1", 1, "Closed Sundays.")])
    assert [(m.__struct_config__.tag, m.text) for m in late_clause.llm_messages()] == [
        ("user", "What are your hours?"), ("assistant", "Eight to five. Closed Sundays."),
        ("user", "And Saturdays?")]
    unanswered = fold("c", [ended("t1", "What are your hours?"), ended("t2", "Hello?"),
                            say("t1", 0, "Eight to five.")])
    assert [(m.__struct_config__.tag, m.text) for m in unanswered.llm_messages()] == [
        ("user", "What are your hours?"), ("assistant", "Eight to five."), ("user", "Hello?")]
    idle = fold("c", [say("t0", 0, "Hi!"), ended("t1", "Book me in."), say("t1", 0, "Which day?"),
                      ended("t2", "Um, Friday."), say("i0", 0, "Are you still there?")])
    assert [(m.__struct_config__.tag, m.text) for m in idle.llm_messages()] == [
        ("assistant", "Hi!"), ("user", "Book me in."), ("assistant", "Which day?"),
        ("assistant", "Are you still there?"), ("user", "Um, Friday.")]


def test_clauses_stored_after_the_interruption_are_not_heard_text() -> None:
    # The brain publishes on its own connection: clauses it sent before the interruption reached
    # it are stored after agent.speech.interrupted. Media drops them; the caller never heard them.
    def say(seq: int, text: str) -> AgentSay:
        return AgentSay(org_id=ORG, call_id="c", turn_id="t1", seq=seq, text=text)

    asked = TurnUserEnded(org_id=ORG, call_id="c", turn_id="t1", text="What are your hours?")
    cut = AgentSpeechInterrupted(org_id=ORG, call_id="c", turn_id="t1",
                                 played_text="Our hours are")
    late = fold("c", [asked, say(0, "Our hours are nine to five."), cut,
                      say(1, "On Saturdays we open at ten.")])
    assert [m.text for m in late.llm_messages()] == ["What are your hours?", "Our hours are"]
    assert late.turn("t1").next_seq == 2  # still numbered: a re-run would not reuse seq 1

    unanswered = fold("c", [asked, AgentSpeechInterrupted(org_id=ORG, call_id="c", turn_id="t1",
                                                          played_text=""),
                            say(0, "On Saturdays we open at ten."),
                            TurnUserEnded(org_id=ORG, call_id="c", turn_id="t2",
                                          text="What are your hours on Saturday?",
                                          revises="t1")])
    assert [m.text for m in unanswered.llm_messages()] == ["What are your hours on Saturday?"]


async def test_a_turn_with_no_words_is_completed_without_asking_the_model(
        bus, pool, emulator, recorder) -> None:
    """A turn.user_ended whose text is blank (an older ConversationRelay bridge made one from a
    prompt of nothing) was answered: its blank message left out, the request ended with the
    agent's last words, which Anthropic takes as a prefill to go on with (newer models refuse
    it). It is now completed at once, nothing said, no model asked."""
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    async with running_brain(bus, pool, [llm]):
        await open_call(bus, "c-blank")
        await recorder.wait("agent.say", "c-blank")  # the greeting
        await user_says(bus, "c-blank", "t1", "  ")
        done, = await recorder.wait("turn.completed", "c-blank")
        assert done.turn_id == "t1" and not done.cancelled
        assert [e.turn_id for e in recorder.of("agent.say", "c-blank")] == ["t0"]
        assert emulator.requests == []
        emulator.script(ScriptedReply(text="We open at eight."))
        await user_says(bus, "c-blank", "t2", "When do you open?")  # the call goes on
        await recorder.wait("turn.completed", "c-blank", count=2)
        assert conversation(emulator.requests[-1])[-1] == {"role": "user",
                                                           "content": "When do you open?"}


async def test_no_second_filler_after_the_model_said_it_itself(bus, pool, emulator,
                                                               recorder) -> None:
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        emulator.script(ScriptedReply(text="One moment.", tool_uses=(ScriptedToolUse(
            name="book_appointment", input={"day": "Friday", "time": "10:00"}, id="toolu_9"),)))
        await open_call(bus, "c9")
        await user_says(bus, "c9", "t1", "Can I come Friday at ten?")
        await recorder.wait("tool.requested", "c9")
        says = [e for e in recorder.of("agent.say", "c9") if e.turn_id == "t1"]
        assert [(s.text, s.filler_after_ms) for s in says] == [("One moment.", 0)]
    finally:
        await worker.stop()
        await llm.aclose()


def test_a_tool_request_stored_twice_is_one_tool_use_in_its_round() -> None:
    """A unit of work redelivered past JetStream's 2-minute duplicate window publishes its
    tool.requested again, under the same tool call id, and the store keeps both. The fold took
    the copy for another call: two tool uses with one id went to the model (which refuses a
    request with a tool use answered twice or not at all) and the copy moved the round on."""
    request = ToolRequested(org_id=ORG, call_id="c", turn_id="t1", tool_call_id="x",
                            name="book", arguments={"day": "Friday"})
    conversation = fold("c", [
        TurnUserEnded(org_id=ORG, call_id="c", turn_id="t1", text="Book me in."),
        request,
        ToolCompleted(org_id=ORG, call_id="c", tool_call_id="x", name="book", result="ok"),
        msgspec.structs.replace(request, id=str(uuid.uuid4())),  # the copy, stored later
    ])
    turn = conversation.turn("t1")
    assert turn.requested_in == {"x": 0} and not turn.waiting_for_tools
    assert [type(m).__name__ for m in conversation.llm_messages()] == [
        "UserMessage", "ToolUse", "ToolResult"]


async def test_the_turns_knowledge_stays_in_front_of_the_model_after_a_tool_result(
        bus, pool, emulator, recorder) -> None:
    """A caller asks to book and what it costs: the model books first, then answers the price.

    Before, the round after the tool's outcome was sent without the knowledge retrieved for the
    caller's words ("Answer only from the knowledge given"), so the price was no longer there.
    """
    await ingest(pool, ORG, AGENT, "prices.md", b"# Prices\n\nA teeth cleaning costs $95.")
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    async with running_brain(bus, pool, [llm]):
        emulator.script(
            ScriptedReply(text="Let me book that.", tool_uses=(ScriptedToolUse(
                name="book_appointment", input={"day": "Friday"}, id="toolu_kb"),)),
            ScriptedReply(text="You're booked for Friday, and a cleaning costs $95."))
        await open_call(bus, "c-kb")
        await user_says(bus, "c-kb", "t1", "Can I book a teeth cleaning Friday, and how much "
                                           "is a teeth cleaning?")
        await recorder.wait("tool.requested", "c-kb")
        assert "$95" in turn_context(emulator.requests[-1])
        await bus.publish(ToolCompleted(org_id=ORG, call_id="c-kb", tool_call_id="toolu_kb",
                                        name="book_appointment", result={"booked": True}))
        await recorder.wait("turn.completed", "c-kb")
        assert len(emulator.requests) == 2
        assert "$95" in turn_context(emulator.requests[-1])  # after the tool result
        assert len(recorder.of("knowledge.retrieved", "c-kb")) == 1


async def test_a_follow_up_question_is_answered_from_what_its_subject_found(
        bus, pool, emulator, recorder) -> None:
    """"Do you do teeth whitening?" — "Yes…" — "How much is it?".

    Before, the follow-up's knowledge was searched with its own words only: "how much is it"
    finds nothing, the prompt said nothing relevant was found, and the model declined a price
    it had been shown one turn earlier. Short words are now searched with the caller's
    previous turn's, and knowledge.retrieved names that search and what went in.
    """
    await ingest(pool, ORG, AGENT, "whitening.md",
                 b"Teeth whitening: a whitening session takes an hour and costs $300.")
    await ingest(pool, ORG, AGENT, "hours.md", b"We open at eight, Monday to Friday.")
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    async with running_brain(bus, pool, [llm]):
        emulator.script(ScriptedReply(text="Yes, we do whitening."),
                        ScriptedReply(text="It costs $300."))
        await open_call(bus, "c-follow")
        await user_says(bus, "c-follow", "t1", "Do you do teeth whitening?")
        await recorder.wait("turn.completed", "c-follow")
        await user_says(bus, "c-follow", "t2", "How much is it?")
        await recorder.wait("turn.completed", "c-follow", count=2)
        context = turn_context(emulator.requests[-1])
        assert "$300" in context and "nothing relevant" not in context
        first, second = recorder.of("knowledge.retrieved", "c-follow")
        assert second.chunk_ids == first.chunk_ids[:1] and len(second.chunk_ids) == 1
        assert second.query == "Do you do teeth whitening? How much is it?"

        # A question of its own is searched with its own words only.
        emulator.script(ScriptedReply(text="We open at eight."))
        await user_says(bus, "c-follow", "t3", "What time do you open on Monday?")
        await recorder.wait("turn.completed", "c-follow", count=3)
        third = recorder.of("knowledge.retrieved", "c-follow")[2]
        assert third.query == "What time do you open on Monday?"
        assert "$300" not in turn_context(emulator.requests[-1])
