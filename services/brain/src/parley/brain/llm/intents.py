"""Cheap intent rules for a caller's words: what they want, which tool, which arguments.

:func:`classify_intent` is fast enough to run on every partial transcript (the brain warms up
with it); :func:`match_tool` and :func:`extract_arguments` let the offline responder act on "book
me in Tuesday at 3 pm" without a model. All of it is best effort by design: a model, when one
is configured, does this better; these rules keep a call useful without one.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from typing import Any

from .base import ToolSpec

__all__ = ["Intent", "classify_intent", "content_words", "extract_arguments", "is_small_talk",
           "match_tool"]

class Intent(enum.StrEnum):
    """What the caller wants, as far as simple rules can tell."""

    GREETING = "greeting"
    GOODBYE = "goodbye"
    HUMAN = "human"
    THANKS = "thanks"
    TOOL = "tool"
    QUESTION = "question"
    OTHER = "other"
    KEYPAD = "keypad"  # keys pressed, not words (a keypad message; never classified from words)


_BUILTINS = frozenset({"end_call", "transfer_call", "send_dtmf", "lookup_knowledge"})
_STOPWORDS = frozenset("""
a an the and or but if so to of for in on at by with from as about into than then there here
is are was were be been being am do does did doing have has had having can could would will
shall should may might must i me my mine you your yours we us our ours it its they them their
he she his her this that these those what which who whom whose when where why how much many
any some all just please tell know like want need get got okay ok yes no not hi hello hey um
uh well really also very too something anything im id ill ive youre dont thanks thank
""".split())
# Words a caller uses for a thing, folded to the word the knowledge or tool is likely to use.
_SYNONYMS = {"cost": {"price", "fee", "charge", "$"}, "price": {"cost", "fee", "charge", "$"},
             "expensive": {"cost", "price", "$"}, "cheap": {"cost", "price", "$"},
             "fee": {"cost", "price", "charge", "$"}, "pay": {"cost", "price", "$"},
             "hour": {"open", "close", "closed"}, "open": {"hour", "close"},
             "close": {"hour", "open"}, "located": {"address", "locat"},
             "address": {"locat", "street"}, "schedule": {"book"}, "make": {"book"},
             "reserve": {"book"}, "set": {"book"}, "arrange": {"book"}, "appt": {"appointment"},
             "visit": {"appointment"}, "check": {"lookup", "find"}, "find": {"lookup"}}
_HUMAN_NOUN = re.compile(r"\b(human|real person|live person|person|operator|agent|representative"
                         r"|rep|someone|somebody|receptionist|manager|staff)\b")
_HUMAN_VERB = re.compile(r"\b(speak|talk|transfer|connect|put me through|get me|give me)\b")
_WH_START = re.compile(r"^(how|what|whats|what's|when|where|why|who|which)\b")
_GOODBYE = re.compile(r"\b(bye|goodbye|good bye|see you|talk to you later|that's all|that is all"
                      r"|that's it|thats all|thats it|nothing else|hang up"
                      r"|have a (good|great|nice) (day|one|night|evening|weekend))\b")
_SMALL_TALK = re.compile(r"\b(how are you|how's it going|how are things)\b")
_GREETING = re.compile(r"^(hi|hello|hey|hiya|howdy|good (morning|afternoon|evening))\b")
_THANKS = re.compile(r"^(ok(ay)? )?(thanks|thank you|great thanks|cheers)\b")
_QUESTION_START = re.compile(
    r"^(how|what|whats|what's|when|where|why|who|which|do|does|did|can|could|is|are|will"
    r"|would|should|may)\b|\b(tell me|wondering|want to know|like to know|looking for)\b")
_WORD = re.compile(r"[a-z0-9$']+")
# What a caller greeting in the same breath says they call about ("Hi, I'm calling about teeth
# whitening", "Hello, cleaning prices please"); not their name ("Hi, this is John").
_PURPOSE = re.compile(r"\b(calling (about|regarding|for)|asking about|interested in|prices?|"
                      r"costs?|rates?|need|want|would like|looking for)\b")


def _stem(word: str) -> str:
    word = word.removesuffix("'s").replace("'", "")
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    for suffix, keep in (("ing", 4), ("ed", 3), ("ion", 5)):
        if word.endswith(suffix) and len(word) - len(suffix) >= keep:
            return word[:-len(suffix)]
    return word


def content_words(text: str, *, expand: bool = False) -> set[str]:
    """The stems of ``text``'s meaningful words; ``expand`` adds a few everyday synonyms."""
    words = {_stem(w) for w in _WORD.findall(text.lower()) if w.replace("'", "") not in _STOPWORDS}
    words -= _STOPWORDS  # "what's" is "what"
    words.discard("")
    if expand:
        for word in list(words):
            words |= _SYNONYMS.get(word, set())
    return words


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9$' ]+", " ", text.lower().replace("’", "'")).split())


def classify_intent(text: str, tools: Sequence[ToolSpec] = ()) -> tuple[Intent, float]:
    """The caller's intent in ``text`` and a confidence in [0, 1] (cheap: fine on partials)."""
    words = _normalise(text)
    if not words:
        return Intent.OTHER, 0.0
    if "human" in words.split() or (_HUMAN_NOUN.search(words)
                                    and (_HUMAN_VERB.search(words) or len(words.split()) <= 4)):
        return Intent.HUMAN, 0.9
    if _GOODBYE.search(words):
        return Intent.GOODBYE, 0.9
    if _SMALL_TALK.search(words):
        return Intent.GREETING, 0.8
    if not _WH_START.search(words) and match_tool(text, tools) is not None:
        return Intent.TOOL, 0.8
    has_content = bool(content_words(text))
    asks = text.rstrip().endswith("?") or bool(_QUESTION_START.search(words))
    if asks and has_content:
        return Intent.QUESTION, 0.8 if text.rstrip().endswith("?") else 0.7
    if greeting := _GREETING.search(words):
        # A greeting, then what the caller calls about: the question ("Hey, how much for a
        # filling?"), not the greeting, is what to answer.
        rest = words[greeting.end():].strip()
        if content_words(rest) and (_QUESTION_START.search(rest) or _PURPOSE.search(rest)):
            return Intent.QUESTION, 0.7
        return Intent.GREETING, 0.9
    if _THANKS.search(words):
        return Intent.THANKS, 0.8
    if has_content:
        return Intent.QUESTION, 0.4
    return Intent.OTHER, 0.3


def match_tool(text: str, tools: Sequence[ToolSpec]) -> ToolSpec | None:
    """The agent tool ``text`` asks for, if one matches well enough (built-ins excluded).

    Every word of the tool's name must be said (allowing everyday synonyms: "make an appointment"
    says ``book_appointment``), or one of them plus two words of its description.
    """
    said = content_words(text, expand=True)
    best: tuple[float, ToolSpec] | None = None
    for tool in tools:
        if tool.name in _BUILTINS:
            continue
        name = {_stem(part) for part in tool.name.lower().split("_")} - _STOPWORDS
        if not name:
            continue
        hits = len(name & said)
        described = len(content_words(tool.description) & said)
        if hits == len(name) or (hits and described >= 2):
            score = hits / len(name) + described / 10
            if best is None or score > best[0]:
                best = (score, tool)
    return best[1] if best else None


_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAY = re.compile(r"\b(today|tomorrow|(next |this )?(" + "|".join(_WEEKDAYS) + r")"
                  r"|\d{4}-\d{2}-\d{2}"
                  r"|(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]* \d{1,2}(st|nd|rd|th)?)"
                  r"\b", re.IGNORECASE)
_TIME = re.compile(r"\b(\d{1,2}(:\d{2})? ?(am|pm|a\.m\.|p\.m\.)|\d{1,2}:\d{2}|noon|midnight)",
                   re.IGNORECASE)
_PHONE = re.compile(r"\+?\d[\d\s().-]{6,}\d")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_NAME = re.compile(r"\b(?i:my name is|this is|i am|i'm)\s+([A-Z][a-z]+(?: [A-Z][a-z]+)?)")
# A count, not part of a time ("9:15", "3 pm") or a phone number.
_NUMBER = re.compile(r"(?<![\d:.])\b\d{1,6}(?:\.\d+)?\b(?![:\d]|\s?(?:am|pm|a\.m|p\.m))",
                     re.IGNORECASE)
_FREE_TEXT_KEYS = frozenset({"reason", "notes", "note", "description", "details", "message",
                             "query", "summary", "request", "topic", "comment", "service"})


def extract_arguments(text: str, tool: ToolSpec) -> dict[str, Any]:
    """Arguments for ``tool`` found in ``text`` — best effort, one rule per kind of property.

    A property is recognised by its name, description and schema: an ``enum`` value said in the
    text; a day ("tuesday", "tomorrow", "2030-01-31", "March 3rd") for date/day properties; a
    time ("10:30", "3 pm") for time ones; both for ``when``/date-time ones; a phone number
    (10 digits become ``+1…``) or an e-mail; a name after "my name is"; the first number for
    numeric properties; and the caller's whole sentence for free-text ones (reason, notes…).
    Properties it cannot find are left out; the tool's own validation has the last word.
    """
    properties = tool.input_schema.get("properties") or {}
    found: dict[str, Any] = {}
    for key, schema in properties.items():
        value = _extract_one(text, key.lower(), schema if isinstance(schema, dict) else {})
        if value is not None:
            found[key] = value
    return found


def _extract_one(text: str, key: str, schema: dict[str, Any]) -> Any:
    hint = f"{key} {schema.get('description', '')} {schema.get('format', '')}".lower()
    kind = schema.get("type")
    if isinstance(schema.get("enum"), list):
        for option in schema["enum"]:
            if isinstance(option, str) and re.search(rf"\b{re.escape(option.lower())}\b",
                                                     text.lower()):
                return option
        return None
    day, clock = _DAY.search(text), _TIME.search(text)
    if any(w in hint for w in ("when", "datetime", "date-time", "slot")):
        parts = [m.group(0) for m in (day, clock) if m]
        return " ".join(parts) or None
    if "date" in hint or "day" in hint:
        return day.group(0) if day else None
    if "time" in hint:
        return clock.group(0) if clock else None
    if "email" in hint:
        email = _EMAIL.search(text)
        return email.group(0) if email else None
    if "phone" in hint or "e.164" in hint or key in ("to", "number"):
        phone = _PHONE.search(text)
        if not phone:
            return None
        digits = re.sub(r"\D", "", phone.group(0))
        return f"+1{digits}" if len(digits) == 10 else f"+{digits}"
    if "name" in key:
        name = _NAME.search(text)
        return name.group(1) if name else None
    if kind in ("integer", "number"):
        number = _NUMBER.search(text)
        if not number:
            return None
        return int(float(number.group(0))) if kind == "integer" else float(number.group(0))
    if kind in (None, "string") and key in _FREE_TEXT_KEYS:
        return text.strip()
    return None


def is_small_talk(text: str) -> bool:
    """Whether ``text`` asks how the agent is ("how are you?")."""
    return bool(_SMALL_TALK.search(_normalise(text)))
