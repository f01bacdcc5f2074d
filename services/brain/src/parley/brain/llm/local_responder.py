"""The offline default "LLM": intent rules plus answers lifted verbatim from the knowledge base.

Deterministic (tool-call ids aside, see below) and free, so a call works with no API keys and
tests are exact. For the caller's latest words it picks an intent (:func:`classify_intent`) and
answers:

- keys the caller pressed (a keypad message, :mod:`.keypad`) → what they pressed, read back
  ("You pressed 1 2 3 4, then pound."): the responder knows no more of what keys mean;
- greeting → a short greeting; thanks → "you're welcome";
- goodbye → a goodbye sentence, then the ``end_call`` tool;
- asking for a human → a sentence, then ``transfer_call`` to the agent's first transfer number:
  the first of the numbers ``transfer_call``'s ``to`` is pinned to (the brain offers it so to an
  agent with ``transfer_numbers``, and not at all to one without). Without it, it says someone
  will follow up instead;
- a request that matches one of the agent's tools by name and description (``book an
  appointment`` → ``book_appointment``) → that tool, with arguments extracted best effort
  (:func:`extract_arguments`); when required ones are missing it asks for them once;
- a question (or anything else with content words) → knowledge retrieval: the one or two
  sentences of the retrieved chunks that share the most words with the question, and its
  subject if it names one (a sentence sharing only "cost" with "How much does a root canal
  cost?" is about another subject). A follow-up that names no subject ("How much does it
  cost?" after "Do you do whitening?") takes the caller's previous turn's, and only a sentence
  naming all of it answers. When no chunk scores ``min_score`` or no sentence shares a content
  word (and the subject), it says it will check and follow up: it never makes up or
  misattributes a fact.

When the conversation ends with a tool result, it phrases a reply from that result (a failed
``transfer_call``: it cannot transfer now, someone will follow up — it never calls a tool in
reply to a tool result, so a refused transfer is not tried again in a loop). A result whose
body says it failed (``ok`` or ``success`` false, an ``error``, a failed ``status``) is a
failure, never "All set"; so is not one that answers no (a field ``false``:
``{"available": false}``), which is read out as what was found, as is a plain-text result
(free text: "Sorry, no slots Friday" cannot be told from a confirmation). Text comes
out a few words per :class:`TextDelta` (so clause streaming downstream is exercised), then a
:class:`Done` with zero usage and the chosen ``intent``.

Tool-call ids are random (``local_<uuid hex>``), as a model's are: an id names its tool call in
the tools journal and in the approval API across all of an org's calls, so it must never
repeat. Tests that want exact ids inject ``new_tool_call_id``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from .base import (
    AssistantMessage,
    Done,
    LlmEvent,
    LlmRequest,
    TextDelta,
    ToolCall,
    ToolResult,
    ToolSpec,
    ToolUse,
    UserMessage,
)
from .clauses import split_sentences
from .intents import (
    Intent,
    classify_intent,
    content_words,
    extract_arguments,
    is_small_talk,
    match_tool,
)
from .keypad import pressed_keys

__all__ = ["Intent", "LocalResponder", "RetrievedChunk", "Retrieve", "answer_from_chunks",
           "classify_intent", "content_words", "extract_arguments", "match_tool", "read_back"]


class RetrievedChunk(Protocol):
    """A knowledge passage as retrieval returns it (``parley.brain.knowledge.Chunk`` fits)."""

    @property
    def id(self) -> str:
        """The chunk's id."""
        ...

    @property
    def text(self) -> str:
        """The passage."""
        ...

    @property
    def score(self) -> float:
        """Relevance in [0, 1]."""
        ...


Retrieve = Callable[[str], Awaitable[Sequence[RetrievedChunk]]]

DECLINE = "I'm not sure about that, so let me check and follow up with you."
_ASK_DETAILS = "Sure, I can help with that. Could you tell me"
_PRICE = re.compile(r"\b(how much|cost|costs|price|prices|fee|fees|charge|expensive|cheap)\b")
# Words that ask something of a subject (its price, hours, how long it takes), not name it: a
# sentence sharing only these with the question is about another subject ("A cleaning costs
# $95." shares "cost" with "How much does a root canal cost?").
_ASPECT_WORDS = content_words(
    "cost costs price prices fee fees charge charges charged pay paying paid expensive cheap "
    "cheaper hour hours open opening opened close closes closed closing time times long take "
    "takes") | {"$", "closed"}
_PRICE_WORDS = content_words("cost", expand=True)


def answer_from_chunks(question: str, chunks: Sequence[RetrievedChunk], *, previous: str = "",
                       min_score: float = 0.05, max_sentences: int = 2) -> str | None:
    """One or two sentences of ``chunks`` that answer ``question``, verbatim; ``None`` if none.

    Sentences are ranked by the question's content words (with a few synonyms) they share, plus
    a bonus when a price question meets a sentence with a number; a sentence sharing no word
    never answers. A question that names a subject (words besides what it asks of it: "root
    canal" in "How much does a root canal cost?") is answered only by a sentence that names it
    too: one sharing only "cost" is about something else. A question naming none ("What are
    your hours?") is answered as before. A second sentence is added only if it is nearly as
    relevant as the first.

    A follow-up that names no subject ("How much does it cost?") asks about the subject of the
    caller's ``previous`` turn ("Do you do whitening?"): only a sentence naming every word of
    it answers (for "teeth whitening", "A teeth cleaning costs $95." names half of it and is
    another service's price). A price asked of no subject in either turn is not answered: any
    price would be a guess at what "it" is.
    """
    wants_price = bool(_PRICE.search(question.lower()))
    # ("How much is it?" has no content word, but asks a price)
    asked = content_words(question, expand=True) or (_PRICE_WORDS if wants_price else set())
    if not asked:
        return None
    subject = asked - _ASPECT_WORDS
    whole_subject = False
    if not subject:
        subject = _subject_of(previous)
        if not subject and wants_price:
            return None
        whole_subject = bool(subject)
        asked = asked | subject
    ranked: list[tuple[float, int, str]] = []
    order = 0
    for chunk in chunks:
        if chunk.score < min_score:
            continue
        for sentence in split_sentences(" ".join(chunk.text.split())):
            order += 1
            words = content_words(sentence)
            shared = len(asked & words)
            if not shared or (subject and not subject & words) or (
                    whole_subject and not subject <= words):
                continue
            bonus = 0.5 if wants_price and re.search(r"[$\d]", sentence) else 0.0
            ranked.append((shared + bonus + chunk.score / 10, order, sentence))
    if not ranked:
        return None
    ranked.sort(key=lambda item: (-item[0], item[1]))
    best = ranked[0][0]
    chosen = [item for item in ranked[:max_sentences] if item[0] >= 0.75 * best]
    return " ".join(sentence for _, _, sentence in sorted(chosen, key=lambda item: item[1]))


class LocalResponder:
    """An :class:`~parley.brain.llm.base.LlmProvider` that needs no model and no network.

    ``retrieve`` looks up knowledge for a question (none: every question is declined politely).
    "A human, please" goes where the offered ``transfer_call`` allows (the agent's settings).
    """

    name = "local"
    cost = 0.0
    supports_tools = True

    def __init__(self, *, retrieve: Retrieve | None = None,
                 greeting: str = "Hi! How can I help you today?", min_score: float = 0.05,
                 words_per_delta: int = 3, clock: Callable[[], float] = time.monotonic,
                 new_tool_call_id: Callable[[], str] = lambda: f"local_{uuid.uuid4().hex}"
                 ) -> None:
        self.retrieve = retrieve
        self.greeting = greeting
        self.min_score = min_score
        self.words_per_delta = words_per_delta
        self._clock = clock
        self._new_tool_call_id = new_tool_call_id

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmEvent]:
        """Reply to the conversation in ``request``: text in word groups, tool calls, Done."""
        started = self._clock()
        text, call, intent = await self._reply(request)
        if request.prefill:  # already said: only what follows it, if it is this reply's start
            said = request.prefill.strip()
            text = text.strip()[len(said):] if text.strip().startswith(said) else ""
        ttft_ms = (self._clock() - started) * 1000
        for piece in _pieces(text, self.words_per_delta):
            yield TextDelta(text=piece)
            await asyncio.sleep(0)  # let the consumer speak the first clause meanwhile
        if call is not None:
            yield call
        yield Done(stop_reason="tool_use" if call else "end_turn", ttft_ms=ttft_ms,
                   intent=intent.value)

    async def _reply(self, request: LlmRequest) -> tuple[str, ToolCall | None, Intent]:
        messages = request.messages
        if messages and isinstance(messages[-1], ToolResult):
            return _phrase_tool_result(messages), None, Intent.TOOL
        said = request.last_user_text
        keys = pressed_keys(said)
        if keys:
            return read_back(keys), None, Intent.KEYPAD
        call_id = self._new_tool_call_id()
        pending = _pending_tool(messages, request.tools)
        if pending is not None:
            tool, earlier = pending
            return self._use_tool(tool, f"{earlier} {said}", call_id, ask=False)
        intent, _ = classify_intent(said, request.tools)
        previous = _previous_caller_text(messages)
        if intent is Intent.OTHER and previous and _PRICE.search(said.lower()):
            intent = Intent.QUESTION  # "How much is it?": a price follow-up, no content word
        match intent:
            case Intent.GREETING:
                if is_small_talk(said):
                    return "I'm doing well, thanks! How can I help you today?", None, intent
                return self.greeting, None, intent
            case Intent.THANKS:
                return "You're welcome! Is there anything else I can help with?", None, intent
            case Intent.GOODBYE:
                return ("Thanks for calling. Goodbye!",
                        ToolCall(id=call_id, name="end_call", arguments={}), intent)
            case Intent.HUMAN:
                number = _transfer_number(request.tools)
                if number is None:
                    return ("I can't transfer you right now, but someone from our team will "
                            "follow up with you.", None, intent)
                return ("Of course. Let me transfer you to someone on our team.",
                        ToolCall(id=call_id, name="transfer_call", arguments={"to": number}),
                        intent)
            case Intent.TOOL if (matched := match_tool(said, request.tools)) is not None:
                return self._use_tool(matched, said, call_id, ask=True)
            case Intent.QUESTION:
                return await self._answer(said, request.knowledge, previous), None, intent
            case _:
                return "Sorry, could you say that again?", None, intent

    def _use_tool(self, tool: ToolSpec, said: str, call_id: str,
                  *, ask: bool) -> tuple[str, ToolCall | None, Intent]:
        arguments = extract_arguments(said, tool)
        missing = [k for k in tool.input_schema.get("required", []) if k not in arguments]
        if missing and ask:
            wanted = [k.replace("_", " ") for k in missing]
            listed = " and ".join([", ".join(wanted[:-1]), wanted[-1]] if len(wanted) > 1
                                  else wanted)
            return f"{_ASK_DETAILS} the {listed}?", None, Intent.TOOL
        if missing:
            return ("Sorry, I didn't catch everything I need for that. Someone from our team "
                    "will follow up with you.", None, Intent.TOOL)
        return "One moment.", ToolCall(id=call_id, name=tool.name, arguments=arguments), Intent.TOOL

    async def _answer(self, question: str, prepared: Sequence[RetrievedChunk] | None = None,
                      previous: str = "") -> str:
        if prepared is not None:  # the brain retrieved for this turn already
            chunks: Sequence[RetrievedChunk] = prepared
        elif self.retrieve is None:
            return DECLINE
        else:  # a follow-up is searched with its subject's words, as the brain does
            follow_up = previous and not content_words(question, expand=True) - _ASPECT_WORDS
            chunks = await self.retrieve(f"{previous} {question}" if follow_up else question)
        return answer_from_chunks(question, chunks, previous=previous,
                                  min_score=self.min_score) or DECLINE


_KEY_NAMES = {"#": "pound", "*": "star"}


def read_back(keys: str) -> str:
    """The keys a caller pressed, read back: "You pressed 1 2 3 4, then pound" for ``1234#``.

    Digits one by one (a code, not a number); a closing ``#`` or ``*`` after the others, as the
    key that ended the entry.
    """
    spoken = [_KEY_NAMES.get(key, key) for key in keys]
    if len(spoken) > 1 and keys[-1] in _KEY_NAMES:
        return f"You pressed {' '.join(spoken[:-1])}, then {spoken[-1]}."
    return f"You pressed {' '.join(spoken)}."


def _pending_tool(messages: Sequence[Any],
                  tools: Sequence[ToolSpec]) -> tuple[ToolSpec, str] | None:
    """The tool we asked details for in the previous turn, and what the caller said before."""
    if len(messages) < 3 or not isinstance(messages[-1], UserMessage):
        return None
    asked, before = messages[-2], messages[-3]
    if not (isinstance(asked, AssistantMessage) and asked.text.startswith(_ASK_DETAILS)
            and isinstance(before, UserMessage)):
        return None
    tool = match_tool(before.text, tools)
    return (tool, before.text) if tool is not None else None


def _previous_caller_text(messages: Sequence[Any]) -> str:
    """The caller's words in the turn before their latest ("" when none, or keys pressed)."""
    spoken = [m.text for m in messages if isinstance(m, UserMessage)]
    if len(spoken) < 2 or pressed_keys(spoken[-2]):
        return ""
    return str(spoken[-2])


def _subject_of(text: str) -> set[str]:
    """What ``text`` names besides what it asks of it (no synonyms: each must be named)."""
    return content_words(text) - _ASPECT_WORDS if text else set()


def _transfer_number(tools: Sequence[ToolSpec]) -> str | None:
    """The first number the offered ``transfer_call`` may dial (its ``to`` const or enum).

    None when ``transfer_call`` is not offered or leaves ``to`` open: a number the agent's
    settings do not name would only be refused.
    """
    for tool in tools:
        if tool.name == "transfer_call":
            to = (tool.input_schema.get("properties") or {}).get("to") or {}
            if isinstance(to.get("const"), str):
                return str(to["const"])
            if isinstance(to.get("enum"), list) and to["enum"] and isinstance(to["enum"][0], str):
                return str(to["enum"][0])
    return None


def _phrase_tool_result(messages: Sequence[Any]) -> str:
    # The response's results (it may have called several tools): one that failed is what the
    # caller must hear, whichever came last; with none failed, the last is phrased.
    outcomes = []
    for message in reversed(messages):
        if not isinstance(message, ToolResult):
            break
        name = next((m.name for m in messages if isinstance(m, ToolUse)
                     and m.id == message.tool_use_id), "")
        try:
            body: Any = json.loads(message.content)
        except ValueError:
            body = message.content
        if isinstance(body, dict) and set(body) == {"text"} and isinstance(body["text"], str):
            body = body["text"]  # a body that was not JSON, as the tools service passes it on
        outcomes.append((name, body, message.is_error or _reports_failure(body)))
    name, content, failed = next(
        (outcome for outcome in outcomes if outcome[2] and outcome[0] not in _HAND_OFFS),
        next((outcome for outcome in outcomes if outcome[2]), outcomes[0]))
    if name == "transfer_call" and failed:  # not retried: a refusal would only come again
        return ("I'm sorry, I can't transfer you right now. Someone from our team will follow "
                "up with you.")
    if name in ("end_call", "transfer_call"):
        return ""  # the call is ending or moving on (or would not end): nothing more to say
    if failed:
        return ("I'm sorry, I couldn't complete that just now. Someone from our team will "
                "follow up with you.")
    if isinstance(content, dict):
        status = content.get("status")
        status = " ".join(status.replace("_", " ").split()) if isinstance(status, str) else ""
        pending = bool(status) and status.lower() not in _DONE_STATUSES  # "pending approval"
        # A result that answers no ({"available": false}) is read out, never "All set".
        answered_no = not status and any(value is False for value in content.values())
        opening = (f"I've sent that; the status is {status}." if pending
                   else "Here's what I found:" if answered_no else "All set.")
        for key in ("message", "summary", "detail", "details", "confirmation_message"):
            if isinstance(content.get(key), str) and content[key].strip():
                return f"{opening} {_sentence(content[key])}"
        if status:
            return opening if pending else f"All set: {status}."
        if answered_no:
            facts = [f"{k.replace('_', ' ')} {_spoken(v)}" for k, v in content.items()
                     if isinstance(v, str | int | float)][:3]
            return f"{opening} {', '.join(facts)}."
        facts = [f"{k.replace('_', ' ')} {v}" for k, v in content.items()
                 if isinstance(v, str | int | float) and not isinstance(v, bool)][:3]
        return f"All set: {', '.join(facts)}." if facts else "All set."
    if isinstance(content, str) and content.strip():
        # Free text says nothing the responder can tell success by ("Sorry, no slots Friday"):
        # read out as what came back, never as done.
        return "Here's what I found: " + " ".join(
            _sentence(s) for s in split_sentences(" ".join(content.split()))[:2])
    return "All set."


_HAND_OFFS = frozenset({"end_call", "transfer_call"})
# A status that says the thing was done; any other ("pending_approval", "queued") is read out
# as it is, never as "All set".
_DONE_STATUSES = frozenset({"ok", "success", "succeeded", "confirmed", "booked", "completed",
                            "complete", "done", "scheduled", "created", "sent", "paid"})
_FAILED_STATUSES = frozenset({"error", "failed", "failure", "declined", "rejected", "denied"})


def _reports_failure(content: Any) -> bool:
    """Whether a tool's body says the call failed.

    An API may answer 200 with ``{"success": false}``, an ``error``, or a failed ``status``,
    which the tools service reports as a completed call.
    """
    if not isinstance(content, dict):
        return False
    if content.get("ok") is False or content.get("success") is False:
        return True
    if content.get("error") or content.get("errors"):
        return True
    status = content.get("status")
    return isinstance(status, str) and status.strip().lower() in _FAILED_STATUSES


def _spoken(value: str | int | float) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else str(value)


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if text.endswith((".", "!", "?")) else text + "."


def _pieces(text: str, words: int) -> list[str]:
    tokens = re.findall(r"\S+\s*", text)
    return ["".join(tokens[i:i + words]) for i in range(0, len(tokens), max(words, 1))]
