"""Which agent turns ConversationRelay has finished playing, from what Twilio reports.

Twilio synthesises and plays the agent's text itself, so the gateway has no marks to echo. With
``events="speaker-events tokens-played"`` on ``<ConversationRelay>`` it sends ``info`` messages:
``tokensPlayed`` with the text it has just played, and ``agentSpeaking`` "on"/"off" when its
speech starts and stops. A turn has played out once its last token has been sent, every
character of its text has been reported played (``tokensPlayed``), and Twilio is not speaking
(its latest ``agentSpeaking`` is "off", or it never sent one). The three together hold whichever
of the two reports comes last, and a pause between two of the turn's clauses is no end: its
later words are not yet reported.

Text is compared on letters and digits only (case folded), so Twilio's spacing and chunking do
not matter; a report that matches none of the queued text is ignored. The welcome greeting,
which Twilio says on its own, is queued by the relay (:meth:`RelayPlayback.greeting`) and
finishes too: by its reports, or once Twilio's speech stops, since Twilio has all of its text
from the start (no pause waits for more of it), and whether it reports on it is undocumented.
A report
that matches further on than expected means the ones before it were lost: what precedes it
has played too (Twilio plays turns in order). A report may span the end of one turn and the
start of the next. A turn whose reports never cover its text does not finish here; the tools
service then stops waiting after its own timeout.

An interruption is of the turn Twilio was saying (:meth:`RelayPlayback.playing`), which need
not be the last one sent. An interrupted turn never finishes, and nothing more of it is
followed: the brain cancels it only once it learns of the interruption, so clauses of it still
come, and the relay does not send them (:meth:`RelayPlayback.cut_off`). Followed, their text,
never played, would take the reports of a later turn that says the same words. A new utterance
of the turn (``t3.1``, after a failed hand-off) is another id and is followed as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

from parley.common.words import normalize_words


def spoken_characters(text: str) -> str:
    """What the comparison looks at: ``text``'s words run together, without apostrophes.

    The words as :func:`normalize_words` has them (lower case, NFC, combining marks kept), so
    text Twilio reports in another Unicode form, or with ’ for ', still matches what was sent.
    """
    return normalize_words(text).replace(" ", "").replace("'", "")


@dataclass
class _Turn:
    text: str = ""  # spoken characters sent
    unplayed: str = ""  # spoken characters sent and not yet reported played
    said_something: bool = False
    last_sent: bool = False
    whole: bool = False  # Twilio has all of it (the greeting): its speech stopping ends it


class RelayPlayback:
    """One ConversationRelay session's agent turns, from text sent to text played."""

    def __init__(self) -> None:
        self._turns: dict[str, _Turn] = {}  # in the order they were sent, which Twilio plays
        self._cut_off: set[str] = set()  # turns the caller interrupted
        self.agent_speaking = False

    @property
    def all_played(self) -> bool:
        """Whether every turn sent has played out (or was cut off)."""
        return not self._turns

    def sent(self, turn_id: str, token: str, *, last: bool) -> list[str]:
        """A text token of ``turn_id`` went to Twilio; returns the turns that finished."""
        if turn_id in self._cut_off:
            return []
        turn = self._turns.setdefault(turn_id, _Turn())
        characters = spoken_characters(token)
        turn.text += characters
        turn.unplayed += characters
        turn.said_something = turn.said_something or bool(characters)
        turn.last_sent = turn.last_sent or last
        if turn.last_sent and not turn.said_something:
            del self._turns[turn_id]  # nothing was said, so nothing will play or finish
            return []
        return self._finished()

    def greeting(self, turn_id: str, text: str) -> None:
        """Twilio says ``text`` on its own (the welcome greeting), before any text we send."""
        self.sent(turn_id, text, last=True)
        if turn_id in self._turns:
            self._turns[turn_id].whole = True

    def played(self, text: str) -> list[str]:
        """Twilio reports ``text`` played (``tokensPlayed``); returns the turns that finished.

        Everything sent up to the end of the earliest place the text matches has played: the
        text may run from one turn's end into the next's (a report spanning both), and what
        precedes it played before (its report lost).
        """
        characters = spoken_characters(text)
        if not characters:
            return []
        turns = list(self._turns.values())
        found = "".join(turn.unplayed for turn in turns).find(characters)
        if found < 0:
            return []
        end = found + len(characters)  # in the unplayed text of the turns, run together
        for turn in turns:
            if end <= 0:
                break
            played = min(end, len(turn.unplayed))
            turn.unplayed = turn.unplayed[played:]
            end -= played
        return self._finished()

    def speaking(self, on: bool) -> list[str]:
        """Twilio's ``agentSpeaking`` went on or off; returns the turns that finished."""
        self.agent_speaking = on
        if not on:
            for turn in self._turns.values():
                if turn.whole:
                    turn.unplayed = ""
        return self._finished()

    def playing(self, heard: str = "") -> str:
        """The turn Twilio is saying (or is to say next); "" once all text sent was played.

        ``heard``: what Twilio says the caller heard of it (an ``interrupt``'s
        ``utteranceUntilInterrupt``), which begins that turn's text: the turn it begins is it
        (the earliest such not played in full, else the latest). An earlier turn whose text
        Twilio's reports never covered ("$95", reported as "ninety five dollars") is then not
        taken for it.

        Otherwise the earliest whose text is not all reported played: a later one (``t3.1``
        after a hand-off refused at once) can already be queued behind it. A turn whose text
        sent so far has played and whose next clause is still to come is not it: a newer
        caller turn may have superseded it, and then its last clause never comes.
        """
        if heard_characters := spoken_characters(heard):
            heard_in = [turn_id for turn_id, turn in self._turns.items()
                        if turn.text.startswith(heard_characters)]
            if heard_in:
                return next((turn_id for turn_id in heard_in if self._turns[turn_id].unplayed),
                            heard_in[-1])
        return next((turn_id for turn_id, turn in self._turns.items() if turn.unplayed), "")

    def interrupted(self, turn_id: str) -> None:
        """The caller interrupted ``turn_id``: nothing sent so far plays out, nor what follows.

        Twilio stops its speech; what of ``turn_id`` comes later is not sent (:meth:`cut_off`).
        """
        self._cut_off.add(turn_id)
        self._turns.clear()
        self.agent_speaking = False

    def cut_off(self, turn_id: str) -> bool:
        """Whether the caller interrupted ``turn_id`` (its later clauses are not to be sent)."""
        return turn_id in self._cut_off

    def _finished(self) -> list[str]:
        if self.agent_speaking:
            return []
        done = [turn_id for turn_id, turn in self._turns.items()
                if turn.last_sent and not turn.unplayed]
        for turn_id in done:
            del self._turns[turn_id]
        return done
