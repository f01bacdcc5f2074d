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
- a question (or anything else with content words) → knowledge retrieval: for each thing
  the question names (:func:`subject_phrases`: "deep cleanings and fillings" is two), the
  sentence of the retrieved chunks that names its head noun and shares the most words with
  the question, unless the sentence makes it another thing's ("A teeth cleaning costs $95."
  does not answer "a deep cleaning"; a sentence sharing only "cost" with "How much does a
  root canal cost?" is about another subject). A follow-up that names no subject ("How much
  does it cost?" after "Do you do whitening?") takes the caller's previous turn's (after a
  follow-up naming nothing itself, the subject that one went on with). A thing
  asked together with others ("cleanings and root canals") that no sentence answers is owned
  up to after the answers ("I don't have the details on root canals here, so let me check…"),
  not dropped. When no chunk scores ``min_score`` or no sentence answers, it says it will
  check and follow up: it never makes up or misattributes a fact.

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

from parley.brain.follow_ups import (
    FOLLOW_UPS_CARRIED,
    is_follow_up,
    refers_back,
    tells_particulars,
)

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
           "classify_intent", "content_words", "extract_arguments", "match_tool", "read_back",
           "subject_phrases"]


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
    """Sentences of ``chunks`` that answer ``question``, verbatim; ``None`` if none.

    The question's subject is read as phrases (:func:`subject_phrases`): "How much are deep
    cleanings and fillings?" asks about "deep cleaning" and "filling". A sentence answers a
    phrase when it names the phrase's head ("cleaning", "cleanings") and does not make it
    another thing's: a word of its own right before the head ("A teeth cleaning costs $95.")
    answers only if the sentence also names every modifier the question gave ("deep"). So
    "teeth whitening" is answered by "A whitening session costs $250." (nothing else's
    whitening) and "Cigna insurance" by "We accept most dental insurance plans, including
    Delta Dental and Cigna.", but "deep cleaning" by no teeth cleaning's price. Each phrase
    gets the sentence sharing most of the question's words (a few synonyms; a price question
    prefers a sentence with a number); a phrase no sentence answers is left out ("…for my
    daughter"), unless it was asked together with others ("cleanings and root canals": "and",
    "or", commas) and another of them is answered: then a sentence after the answers says it
    will check on it. When none is answered, ``None``. With a single phrase a second sentence
    is added if it is nearly as relevant as the first.

    A thing may be said by another name (:data:`_ALIASES`: "Amex" is "American Express"), and
    a word hyphened to the next in a sentence is part of that compound, no head of its own
    ("checks" are not the "check" of a "check-up").

    A question naming no subject ("What are your hours?") is answered by the sentences sharing
    most of its words. A follow-up that names none, or only a generic word ("How much does it
    cost?", "What would that treatment cost me?") asks about the
    subject of the caller's ``previous`` turn ("Do you do whitening?"), read the same way. A
    price asked of no subject in either turn is not answered: any price would be a guess at
    what "it" is.
    """
    wants_price = bool(_PRICE.search(question.lower()))
    # ("How much is it?" has no content word, but asks a price)
    asked = content_words(question, expand=True) or (_PRICE_WORDS if wants_price else set())
    if not asked:
        return None
    groups = _subject_groups(question)
    if previous and all(phrase[-1] in _GENERIC_HEADS for group in groups for phrase, _ in group):
        # names nothing, or only a generic word ("What would that treatment cost me?")
        groups = _subject_groups(previous)
        asked = asked | {word for group in groups for phrase, _ in group for word in phrase}
    phrases = [phrase for group in groups for phrase, _ in group]
    # (a thing said by another name: "Amex" is answered by "American Express")
    asked = asked | {word for phrase in phrases for alias in _ALIASES.get(phrase, ())
                     for word in alias}
    if not phrases and wants_price:
        return None
    sentences: list[tuple[list[str | None], float, str]] = []
    for chunk in chunks:
        if chunk.score < min_score:
            continue
        for sentence in split_sentences(" ".join(chunk.text.split())):
            words = content_words(sentence)
            if not asked & words:
                continue
            bonus = 0.5 if wants_price and re.search(r"[$\d]", sentence) else 0.0
            score = len(asked & words) + bonus + chunk.score / 10
            sentences.append((_phrase_tokens(sentence, compounds=True), score, sentence))
    # (index in the passages' order, score) of the sentences answering each phrase
    answering = [[(i, score) for i, (tokens, score, _) in enumerate(sentences)
                  if _answers(phrase, tokens)] for phrase in phrases] if phrases else [
        [(i, score) for i, (_, score, _) in enumerate(sentences)]]
    chosen: set[int] = set()
    answered: set[tuple[str, ...]] = set()
    for at, ranked in enumerate(answering):
        ranked.sort(key=lambda item: (-item[1], item[0]))
        if not ranked:
            continue
        if phrases:
            answered.add(phrases[at])
        per_phrase = max_sentences if len(answering) == 1 else 1
        chosen |= {i for i, score in ranked[:per_phrase] if score >= 0.75 * ranked[0][1]}
    if not chosen:
        return None
    return " ".join([*(sentences[i][2] for i in sorted(chosen)),
                     *filter(None, [_unanswered(groups, answered)])])


# Words that name no thing of their own: a question's generic last word ("a whitening
# session", "Cigna plans") leaves the phrase's head to the word before it…
_GENERIC_HEADS = content_words("session sessions appointment appointments visit visits service "
                               "services treatment treatments procedure procedures plan plans")
# …and verbs of offering are no modifier ("accept Cigna insurance", "We offer cleanings").
_NOT_MODIFIERS = content_words("accept accepts accepted offer offers offered offering provide "
                               "provides provided providing cover covers covered include "
                               "includes including treat treats see fix fixes handle handles "
                               "bring")
# …nor is what a caller says in passing: "Great, whitening then", "cleanings and stuff" ask
# about no "great" or "stuff" (owned up to as a thing asked together with the other).
_IN_PASSING = content_words("yeah yep yup nope sure alright cool great awesome perfect hmm huh "
                            "oh ah wow sorry stuff thing things whatnot whatever everything etc")
_PARTING = _ASPECT_WORDS | _NOT_MODIFIERS | _IN_PASSING
_TOKEN = re.compile(r"[a-z0-9$']+|[^\sa-z0-9$']", re.IGNORECASE)
_BOUND = "\x01"  # stands for a hyphen joining two words of a sentence ("check-up")


def _alias_table(*names: tuple[str, str]) -> dict[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """Each name's phrase (stems) → the phrases of its other names, both ways."""
    table: dict[tuple[str, ...], tuple[tuple[str, ...], ...]] = {}
    for one, other in names:
        a, b = (tuple(stem for stem in _phrase_tokens(name) if stem) for name in (one, other))
        table[a] = (*table.get(a, ()), b)
        table[b] = (*table.get(b, ()), a)
    return table


def _phrase_tokens(text: str, *, compounds: bool = False) -> list[str | None]:
    """``text``'s words in order as stems, ``None`` for each that parts phrases.

    Stopwords, verbs of offering, aspect words, numbers and punctuation part them; a hyphen
    joins ("check-up" is "check up"). With ``compounds`` (a sentence's), a word hyphened to
    the next keeps a trailing "-" ("check-", "up"): part of the compound, never its head.
    """
    return [stem for _, stem in _tokens(text, compounds=compounds)]


def _tokens(text: str, *, compounds: bool = False) -> list[tuple[str, str | None]]:
    """``text``'s tokens as said (case kept) with their :func:`_phrase_tokens` stems."""
    tokens: list[tuple[str, str | None]] = []
    text = re.sub(r"(?<=\w)-(?=\w)", f"{_BOUND} " if compounds else " ", text).replace(
        "\u2019", "'")
    for raw in _TOKEN.findall(text):
        if raw == _BOUND:
            if tokens and tokens[-1][1] is not None:
                tokens[-1] = (tokens[-1][0], f"{tokens[-1][1]}-")
            continue
        word = content_words(raw)
        stem = next(iter(word)) if len(word) == 1 else None
        keep = stem is not None and stem not in _PARTING and not re.search(r"[$\d]", stem)
        tokens.append((raw, stem if keep else None))
    return tokens


# What may stand between two things asked about together ("cleanings and root canals",
# "a cleaning, a filling or a check-up"): the words that join them, and articles.
_JOINING = frozenset({",", "and", "or", "&", "/", "plus", "nor"})
# ("my" is not: "cleanings and my name is…" names no second thing asked about)
_BETWEEN_CONJUNCTS = _JOINING | {"a", "an", "the"}


def _subject_groups(text: str) -> list[list[tuple[tuple[str, ...], str]]]:
    """The things ``text`` names, grouped as asked together: each as (stems, words said).

    Things joined only by "and", "or", commas (and articles) are one group ("cleanings and
    root canals"); a thing parted from the others by any other word is a group of its own
    ("Cigna insurance" and "my daughter" in "…Cigna insurance for my daughter?").
    """
    groups: list[list[tuple[tuple[str, ...], str]]] = []
    seen: set[tuple[str, ...]] = set()
    run: list[tuple[str, str]] = []
    between: list[str] = []  # the tokens since the last run ended
    for raw, stem in [*_tokens(text), ("", None)]:
        if stem is not None:
            run.append((raw, stem))
            continue
        if not run:
            between.append(raw.lower())
            continue
        stems = [s for _, s in run]
        while len(stems) > 1 and stems[-1] in _GENERIC_HEADS:
            stems.pop()
        phrase, said = tuple(stems), " ".join(r for r, _ in run)
        joined = bool(groups) and bool(between) and set(between) <= _BETWEEN_CONJUNCTS and (
            bool(set(between) & _JOINING))
        if phrase not in seen:
            seen.add(phrase)
            if joined:
                groups[-1].append((phrase, said))
            else:
                groups.append([(phrase, said)])
        run, between = [], [raw.lower()] if raw else []
    return groups


def subject_phrases(text: str) -> list[tuple[str, ...]]:
    """The things ``text`` names, each as stems (modifiers first, head noun last).

    A phrase is a run of content words: stopwords ("and", "or", "for my"), punctuation, words
    asking something of a subject (price, hours) and verbs of offering part them. "Do you
    accept Cigna insurance for my daughter?" → ``[("cigna", "insurance"), ("daughter",)]``;
    a generic last word is dropped ("a whitening session" → ``("whiten",)``).
    """
    return [phrase for group in _subject_groups(text) for phrase, _ in group]


def _unanswered(groups: list[list[tuple[tuple[str, ...], str]]],
                answered: set[tuple[str, ...]]) -> str:
    """A sentence owning up to the things asked together with others that went unanswered.

    "How much are cleanings and root canals?" answered for cleanings only must not read as
    the whole answer: "I don't have the details on root canals here, so let me check…". A
    thing asked on its own, or merely mentioned ("…for my daughter"), is left out as before.
    """
    missing = [said for group in groups if len(group) > 1
               for phrase, said in group if phrase not in answered]
    if not missing:
        return ""
    listed = missing[0] if len(missing) == 1 else f"{', '.join(missing[:-1])} or {missing[-1]}"
    return (f"I don't have the details on {listed} here, so let me check and follow up with "
            "you on that.")


def _answers(phrase: tuple[str, ...], tokens: list[str | None]) -> bool:
    """Whether a sentence (its :func:`_phrase_tokens`) answers ``phrase``.

    It names the head (or an everyday synonym: "address" is where it is "located"), and where
    it puts a word of its own right before it ("teeth cleaning"), it names all the phrase's
    modifiers too; or it names the thing by another name (:data:`_ALIASES`), word for word. A
    word hyphened to the next ("check-" of "check-up") is no head.
    """
    *modifiers, head = phrase
    heads = {head} | content_words(head, expand=True)
    named = {token.rstrip("-") for token in tokens if token is not None}
    plain = [token.rstrip("-") if token else None for token in tokens]
    for alias in _ALIASES.get(phrase, ()):
        if any(tuple(plain[at:at + len(alias)]) == alias for at in range(len(plain))):
            return True
    for at, token in enumerate(tokens):
        if token not in heads:
            continue
        own = tokens[at - 1] if at else None
        if own is None or named.issuperset(modifiers):
            return True
    return False


# A thing's other names (a tiny table: common abbreviations a caller says for what a
# passage spells out, or the other way round).
_ALIASES = _alias_table(("amex", "American Express"), ("checkup", "check up"),
                        ("xray", "x ray"))


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
            follow_up = previous and is_follow_up(question)
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
    """The caller's words a follow-up of theirs goes on with ("" when none, or keys pressed).

    Their turn before the latest; but if that one is itself a follow-up naming nothing ("How
    much is it?"), the latest turn before it that names a subject ("Do you do whitening?"),
    past at most :data:`~parley.brain.follow_ups.FOLLOW_UPS_CARRIED` such follow-ups (keys end
    the search; a turn that is no follow-up, :func:`~parley.brain.follow_ups.is_follow_up`,
    too, as the brain's retrieval carries a subject). A turn telling the caller's particulars
    ("My name is John Smith") is passed over: a name is no subject; so is one pointing back
    ("Great, I'd like to book one"): what it names is said of the subject before it.
    """
    spoken = [str(m.text) for m in messages if isinstance(m, UserMessage)][:-1]
    if not spoken or pressed_keys(spoken[-1]):
        return ""
    for text in reversed(spoken[-(FOLLOW_UPS_CARRIED + 1):]):
        if pressed_keys(text):
            break
        if tells_particulars(text) or refers_back(text):
            continue
        if not is_follow_up(text) or any(
                phrase[-1] not in _GENERIC_HEADS for phrase in subject_phrases(text)):
            return text
    return spoken[-1]


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
