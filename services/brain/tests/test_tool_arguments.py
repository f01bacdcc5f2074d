"""Tool arguments the model garbled go back to it as the call's error: the turn goes on."""

from __future__ import annotations

import pytest

from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.llm.local_responder import LocalResponder
from parley.brain.llm.openai_compat import OpenAICompatLlm
from parley.common.events import ToolFailed
from parley.devkit.emulators.anthropic import ScriptedReply, ScriptedToolUse
from parley.devkit.emulators.openai_compat import ScriptedReply as OpenAIReply
from parley.devkit.emulators.openai_compat import ScriptedToolUse as OpenAIToolUse

from .conftest import ORG, open_call, openai_llm, running_brain, user_says


async def test_garbled_tool_arguments_after_text_reach_the_model_as_the_calls_error(
        bus, pool, emulator, recorder) -> None:
    # "Let me book that." was said, then the model wrote book_appointment's arguments with an
    # unescaped quote. That raised in the provider: after text the turn failed, was redelivered
    # and retried until dropped, and the caller heard silence. Now it is a tool request with
    # arguments_error; the tools service fails it (as arguments breaking the schema), the model
    # reads why, calls again or says so, and the turn ends with its words.
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    async with running_brain(bus, pool, [llm, LocalResponder()]):
        emulator.script(
            ScriptedReply(text="Let me book that.", tool_uses=(ScriptedToolUse(
                name="book_appointment", input='{"day": "Friday", "note": "a "big" one"}',
                id="toolu_bad"),)),
            ScriptedReply(text="Sorry, I could not book that. Which day again?"))
        await open_call(bus, "c-args")
        await user_says(bus, "c-args", "t1", "Book me in Friday")
        requested, = await recorder.wait("tool.requested", "c-args")
        assert (requested.tool_call_id, requested.name, requested.arguments) == (
            "toolu_bad", "book_appointment", {})
        assert requested.arguments_error.startswith("the arguments are not valid JSON")
        error = f"invalid arguments for book_appointment: {requested.arguments_error}. " \
                "Fix them and call the tool again."
        await bus.publish(ToolFailed(org_id=ORG, call_id="c-args", tool_call_id="toolu_bad",
                                     name="book_appointment", error=error))
        done, = await recorder.wait("turn.completed", "c-args")
        assert done.provider == "anthropic"
        says = [s.text for s in recorder.of("agent.say", "c-args") if s.turn_id == "t1"]
        assert says[0] == "Let me book that." and says[-1] == "Which day again?"
        assert not recorder.of("turn.failed", "c-args")
        blocks = [b for m in emulator.requests[-1]["messages"] if isinstance(m["content"], list)
                  for b in m["content"]]
        use, = [b for b in blocks if b["type"] == "tool_use"]
        result, = [b for b in blocks if b["type"] == "tool_result"]
        assert use["id"] == result["tool_use_id"] == "toolu_bad" and use["input"] == {}
        assert result["is_error"] and "not valid JSON" in str(result["content"])


@pytest.mark.parametrize("provider", ["anthropic", "openai_compat"])
async def test_tool_arguments_with_half_an_emoji_are_requested_with_a_replacement_character(
        bus, pool, emulator, openai_emulator, recorder, provider: str) -> None:
    # A model (or a JavaScript-ish server) that cut an emoji in half writes the half as
    # \ud83d: valid JSON, which Python reads into a string UTF-8 cannot encode, so
    # tool.requested could not be published. Each half is read as U+FFFD, as the tools
    # service does for an answer (24815c9).
    arguments = '{"day": "Friday", "note": "see you \\ud83d", "\\udc4b": "hi"}'
    if provider == "anthropic":
        emulator.script(ScriptedReply(text="Let me book that.", tool_uses=(ScriptedToolUse(
            name="book_appointment", input=arguments, id="toolu_half"),)),
            ScriptedReply(text="You're booked."))
        llm: AnthropicLlm | OpenAICompatLlm = AnthropicLlm(api_key="sk-test",
                                                           base_url=emulator.base_url)
    else:
        openai_emulator.script(OpenAIReply(text="Let me book that.", tool_uses=(OpenAIToolUse(
            name="book_appointment", input=arguments, id="toolu_half"),)),
            OpenAIReply(text="You're booked."))
        llm = openai_llm(openai_emulator)
    async with running_brain(bus, pool, [llm]):
        await open_call(bus, "c-half")
        await user_says(bus, "c-half", "t1", "Book me in Friday")
        requested, = await recorder.wait("tool.requested", "c-half")
        assert requested.arguments == {"day": "Friday", "note": "see you \ufffd", "\ufffd": "hi"}
        assert requested.arguments_error == ""


async def test_half_an_emoji_the_server_escaped_in_the_stream_is_requested_with_a_replacement(
        bus, pool, openai_emulator, recorder) -> None:
    # A JavaScript-ish server that cut an emoji in half (a UTF-16 string sliced) and
    # JSON.stringify'd the chunk sends the half as \ud83d in the chunk's JSON: read, the
    # arguments' text holds the half itself, not an escape of it, and tool.requested could not
    # be published (UnicodeEncodeError, the turn redelivered).
    openai_emulator.script(OpenAIReply(text="Let me book that.", tool_uses=(OpenAIToolUse(
        name="book_appointment", input='{"day": "Friday", "note": "see you \ud83d"}',
        id="toolu_half"),)), OpenAIReply(text="You're booked."))
    async with running_brain(bus, pool, [openai_llm(openai_emulator)]):
        await open_call(bus, "c-half-raw")
        await user_says(bus, "c-half-raw", "t1", "Book me in Friday")
        requested, = await recorder.wait("tool.requested", "c-half-raw")
        assert requested.arguments == {"day": "Friday", "note": "see you \ufffd"}
        assert requested.arguments_error == ""


async def test_half_an_emoji_in_a_servers_text_is_said_with_a_replacement_character(
        bus, pool, openai_emulator, recorder) -> None:
    # The same server's text: a reply holding half an emoji (escaped in the chunk's JSON) could
    # not be published as agent.say (UnicodeEncodeError): the turn was redelivered and asked
    # the model again, billed twice, and said nothing the first time.
    openai_emulator.script(OpenAIReply(text="See you Friday \ud83d. Bye now."),
                           OpenAIReply(text="Asked again."))
    async with running_brain(bus, pool, [openai_llm(openai_emulator)]):
        await open_call(bus, "c-half-text")
        await user_says(bus, "c-half-text", "t1", "See you then")
        await recorder.wait("turn.completed", "c-half-text")
        said = [e.text for e in recorder.of("agent.say", "c-half-text") if e.turn_id == "t1"]
        assert " ".join(said) == "See you Friday \ufffd. Bye now."
        assert len(openai_emulator.requests) == 1
