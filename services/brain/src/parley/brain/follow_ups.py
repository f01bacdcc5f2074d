"""Whether a caller's turn goes on with the subject before it: a *follow-up*.

A follow-up's knowledge is searched with the subject's words in front of its own (the worker,
its warm-up, the fold's :func:`~parley.brain.conversation.carried_subject`), and the offline
local responder answers it about that subject. All of them decide by :func:`is_follow_up`,
which imports nothing of the brain (the local responder is imported by ``parley.brain.llm``,
which the conversation imports: a module of either would make a cycle).

A turn is a follow-up when it refers back, or when it names nothing of its own:

- it has a word that points back (:data:`REFERRING`: "How much is *it*?", "What would *that*
  treatment cost me?", "Can I book *one*?", "How do I get *there*?"; not an existential "is
  there", nor "one" counting a thing, "one hour");
- or it tells the caller's particulars the agent asked for (:data:`PARTICULARS`: "My name is
  John Smith", "My phone number is 555-0134"), an answer going on with the subject: a name is
  no subject to search the next turn's question with ("How much will it be?");
- or it names no subject: every word is a function, question, filler or aspect word
  (:data:`NAMES_NOTHING`: "How much do you charge?", "How long?", "When?");
- or it is a fragment, no clause of its own (no auxiliary, no "I"/"you"/"we":
  :data:`CLAUSE`), that opens like one going on ("And Mastercard?", "What about Amex?", "Or
  on Saturday?", "Also weekends?") or names at most :data:`FOLLOW_UP_WORDS` words ("Which
  days?", "For kids?", "Weekends too?").

A word adding to what was said (:data:`ADDING`: also, too, as well) names nothing, but does not
make a clause naming its own subject a follow-up: "Also, do you handle emergencies?" and "Do
you serve the suburbs too?" ask about emergencies and the suburbs, and searched behind a fee
question their passage came second to the fee's.

So "Do you take Visa?" (a clause naming "visa", pointing at nothing) starts a subject of its
own, "And Mastercard?" goes on in its frame (searched with it: "Do you take Visa? And
Mastercard?"), and "And do you do deep cleanings?" (a clause of its own, naming its subject)
is no follow-up though it opens with "and". A word names a subject if it is none of those few
lists' and not a number; a word the lists miss counts as naming something (a turn is then taken
for a subject of its own, which is searched by its own words: what a missed follow-up costs is
the fallback search with the subject when its own words find nothing). Best effort by design:
no parser, no model, a word list small enough to read.
"""

from __future__ import annotations

import re

__all__ = ["FOLLOW_UPS_CARRIED", "FOLLOW_UP_WORDS", "is_follow_up", "refers_back",
           "tells_particulars"]

# A fragment naming at most this many words goes on with the subject ("Which days?").
FOLLOW_UP_WORDS = 3
# Follow-ups in a row whose words a later follow-up still carries, after their subject's.
FOLLOW_UPS_CARRIED = 3

# Words pointing back at what was said ("that" with a noun too: "that treatment").
REFERRING = frozenset(
    "it its it's that that's this these those they they're them their one ones there".split())
# Words adding to what was said, naming nothing ("as well": "as" and "well" name nothing too).
ADDING = frozenset("also too either instead".split())
# Words making a clause of its own: auxiliaries and modals, and the caller or agent as subject.
CLAUSE = frozenset("""
do does did is are was were am can could will would should shall may might must have has had
don't doesn't didn't isn't aren't wasn't can't won't wouldn't couldn't shouldn't haven't
i you we i'm you're we're i'd i'll i've you've we've what's where's when's how's who's
""".split())
# What a caller tells of themselves: "my <particular> is …" ("my phone number is", "my name's").
PARTICULARS = frozenset("name number phone email address surname birth birthday postcode zip"
                        .split())
_TOLD = frozenset({"is", "was"})
_PARTICULAR_WORDS = PARTICULARS | frozenset(f"{word}'s" for word in PARTICULARS)
# Words that open a fragment going on with what was said.
OPENERS = frozenset("and or plus but also".split())
OPENING_PAIRS = frozenset({("what", "about"), ("how", "about"), ("what", "if")})
# Words that name no subject: function words, question words, fillers (verbs of asking and
# offering, interjections) and what is asked of a subject (price, length), generic heads.
NAMES_NOTHING = CLAUSE | REFERRING | ADDING | frozenset("""
a an the and or but if so to of for in on at by with from as about into than then here
me my mine your yours us our ours he she his her him
what which who whom whose when where why how
be been being get got take takes need want like know tell say mean think go let give
offer offers accept provide charge charges cost costs pay price prices fee fees
much many long more less any some all each every other another else
thing things stuff treatment treatments procedure procedures service services session sessions
appointment appointments kind type option options
please okay ok yes yeah no not just well really very again still oh um uh sure right
hi hello hey thanks thank
""".split())
_POINTING_IF = frozenset({"there", "one", "ones"})  # pointing back or not by their neighbours
_BE = frozenset("is are was were be isn't aren't".split())
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def _points_back(words: list[str], at: int) -> bool:
    """Whether ``words[at]``, one of :data:`REFERRING`, points back at what was said."""
    word = words[at]
    after = words[at + 1] if at + 1 < len(words) else ""
    if word == "there":  # "is there…", "there are…" point at nothing
        return (not at or words[at - 1] not in _BE) and after not in _BE
    if word in ("one", "ones"):  # "one hour" counts; "Can I book one?" points back
        return not after or after in NAMES_NOTHING
    return True


def _tells_particulars(words: list[str], at: int) -> bool:
    """Whether ``words[at]``, one of :data:`PARTICULARS` (or with "'s"), is told: "my … is"."""
    told = words[at].endswith("'s") or (at + 1 < len(words) and words[at + 1] in _TOLD)
    return told and "my" in words[max(0, at - 3):at]


def refers_back(text: str) -> bool:
    """Whether a caller's turn of ``text`` has a word pointing back ("I'd like to book *one*").

    What it names ("book") is then said of the subject before it, not a subject of its own.
    """
    words = _WORD.findall(text.lower().replace("\u2019", "'"))
    return any(word in REFERRING and (word not in _POINTING_IF or _points_back(words, at))
               for at, word in enumerate(words))


def tells_particulars(text: str) -> bool:
    """Whether a caller's turn of ``text`` tells their particulars ("My name is John Smith").

    The words it names ("john smith") are no subject a later turn goes on with.
    """
    words = _WORD.findall(text.lower().replace("\u2019", "'"))
    return any(word in _PARTICULAR_WORDS and _tells_particulars(words, at)
               for at, word in enumerate(words))


def is_follow_up(text: str) -> bool:
    """Whether a caller's turn of ``text`` goes on with the subject before it.

    See the module: it points back at what was said, tells the caller's particulars, names
    nothing of its own, or is a
    fragment opening like one going on or naming at most :data:`FOLLOW_UP_WORDS` words. One
    regular expression and a set lookup a word (about a microsecond a turn more than counting
    words did): the fold runs it on every caller turn.
    """
    words = _WORD.findall(text.lower().replace("\u2019", "'"))
    naming = 0
    clause = False
    for at, word in enumerate(words):
        if word in REFERRING and (word not in _POINTING_IF or _points_back(words, at)):
            return True
        if word in _PARTICULAR_WORDS and _tells_particulars(words, at):
            return True
        if word in CLAUSE:
            clause = True
        elif word not in NAMES_NOTHING and not word[0].isdigit():
            naming += 1
    if not naming:
        return True
    if clause:
        return False
    return naming <= FOLLOW_UP_WORDS or words[0] in OPENERS or (
        tuple(words[:2]) in OPENING_PAIRS)
