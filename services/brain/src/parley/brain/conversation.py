"""A call's conversation as a fold of its events: the only state the brain has.

Any brain instance can answer any turn because everything it needs is in the call's events:
what the caller said (``turn.user_ended``), what the agent said (``agent.say`` clauses — but
after ``agent.speech.interrupted`` only the part the caller actually heard), the tools the agent
called and their outcomes. Tool calls split an agent turn into *rounds*: round 0 answers the
caller, round *n* continues after the *n*-th tool outcome. Clause numbers (``seq``) run on
across rounds; a round re-run after a crash goes on after the clauses it already said
(``next_seq``), and a clause repeated with the same number carries the same event id and is
dropped as a duplicate.

A *hand-off* (``end_call``, ``transfer_call``) ends the turn: its round closes the speech
(``last``), so the last words play before the call ends or moves, and the turn completes. If
the hand-off fails (the transfer is refused, the gateway does not answer), the turn is taken up
again: the model reads the failure and tells the caller. What it says then is a new utterance,
since the one before is closed (media voices no clause after a turn's last): from the first
outcome of a hand-off's round on, the turn's clauses go out under its next *speech* id
(``t3.1``, numbered from 0), which the fold maps back to the turn. A turn is completed once it
has one ``turn.completed`` more than failed hand-offs. Both hold whatever order the outcome,
the closing clause and the completion are stored in.

*Idle turns* (``i0``, ``i1``…) are the agent's own, not the caller's: the prompt to a caller who
went silent, or the goodbye before hanging up on them, one per ``caller.idle``. What they say is
history like any clause (the model knows it asked); their hang-up is not the model's tool call
and stays out of its messages. The fold counts what the caller did (speech starts, key presses,
turns) so an idle turn the caller has spoken since can be told apart.

The caller's words come last. A request must end with the caller's turn (or a round's tool
results), never with agent text, which Anthropic reads as a prefill to continue (as may an
OpenAI-compatible server): asked to answer "Hello?", the model would go on with the greeting.
What the agent said for another turn can be stored after the caller's turn ended: the greeting
of a brain late to greet (the caller said "Hello?" into the silence), an idle prompt that fired
as they spoke, a clause of the turn before sent as their next turn began. It is history all the
same, said as they spoke or before they were answered, so it goes before their words (with the
rest of its utterance), in the order it was said: only an utterance's own turn, the caller's
words it answers, comes before it. Likewise an idle prompt said while another turn's tool ran
goes before that tool use, with the words the agent said before it: after it, it would come
after the tool's result (moved up to its use) and end the round's request. A deliberate
prefill (clauses a re-run round already said, a clause a speculation prepared) is the
worker's, in :attr:`LlmRequest.prefill`.

A caller's turn of keys (reason ``dtmf``: "1234#") reaches the model marked as keypad input,
``[keypad] 1234#`` (:func:`caller_text`), not as words the caller said.

What a turn's completion reports is folded too, per round: the LLM tokens each round recorded
(``usage.recorded`` with the turn's ``turn_id``, stored before the round's tool requests) and
its response's time to first token (carried by its ``tool.requested``). A completion reports
the rounds since the turn was taken up (:attr:`AgentTurn.rounds_since_taken_up`), whatever
order the completions and failed hand-offs are stored in.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from parley.brain.follow_ups import FOLLOW_UPS_CARRIED, is_follow_up
from parley.brain.llm.base import (
    AssistantMessage,
    Message,
    ToolResult,
    ToolUse,
    Usage,
    UserMessage,
)
from parley.brain.llm.keypad import keypad_message
from parley.brain.usage import LLM_KINDS, add_usage
from parley.common.events import (
    AgentSay,
    AgentSpeechInterrupted,
    CallDtmf,
    CallEnded,
    CallerIdle,
    CallRequested,
    CallStreamStarted,
    Event,
    RequestedCall,
    SpeechStarted,
    ToolCompleted,
    ToolDenied,
    ToolFailed,
    ToolRequested,
    TurnCompleted,
    TurnStarted,
    TurnUserEnded,
    UsageRecorded,
)
from parley.common.words import normalize_words

HAND_OFFS = frozenset({"end_call", "transfer_call"})  # tools that end the turn with the call


# A run of three letters or digits or more (``str.isalnum``'s: a word character, not "_").
_CONTENT_WORD = re.compile(r"[^\W_]{3,}")


def content_words(text: str) -> set[str]:
    """``text``'s words of three letters or more, lower-cased (how close a warm-up's words are).

    One regular expression, not a generator over the text's characters.
    """
    return set(_CONTENT_WORD.findall(text.lower()))


def carried_subject(before: tuple[str, ...], words: str) -> tuple[str, ...]:
    """The words a follow-up after a turn of ``words`` is searched with, as turns' words.

    ``before``: what the turn's own follow-up search carried. A follow-up
    (:func:`~parley.brain.follow_ups.is_follow_up`: it refers back, or names nothing of its
    own) goes on with that subject: its words join the subject's (the last turn that was no
    follow-up) and the follow-ups since, the latest :data:`FOLLOW_UPS_CARRIED` of them; any
    other turn is a subject of its own ("Do you take Visa?"). One turn back only, a follow-up
    to a follow-up ("And how long?" after "How much is it?" after "Do you do teeth
    whitening?") was searched with words that name nothing.
    """
    if not before or not is_follow_up(words):
        return (words,)
    subject, *follow_ups = before
    kept = follow_ups[len(follow_ups) - (FOLLOW_UPS_CARRIED - 1):] if (
        len(follow_ups) >= FOLLOW_UPS_CARRIED) else follow_ups
    return (subject, *kept, words)


@dataclass
class AgentTurn:
    """What the agent did in one turn so far."""

    turn_id: str
    says: list[AgentSay] = field(default_factory=list)
    round_starts: list[int] = field(default_factory=lambda: [0])  # first seq of each round
    tools: dict[str, str] = field(default_factory=dict)  # tool_call_id → name
    requested_in: dict[str, int] = field(default_factory=dict)  # tool_call_id → its round
    results: set[str] = field(default_factory=set)  # tool_call_ids with an outcome
    # Tool calls of a response whose requests are stored in part (the instance died between
    # them): tool_call_id → the call, and a request of the same response stored.
    unrequested: dict[str, tuple[RequestedCall, ToolRequested]] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)  # tool_call_ids that failed or were denied
    latest_outcome: str = ""  # the tool_call_id whose outcome came last (the one that goes on)
    completion_ids: set[uuid.UUID] = field(default_factory=set)  # turn.completed events seen
    started_rounds: set[int] = field(default_factory=set)  # rounds with a turn.started stored
    interrupted: bool = False
    spoken_last: bool = False  # a clause with last=True closed the current speech
    closed: set[str] = field(default_factory=set)  # speeches whose last clause is stored
    new_speech_after: set[int] = field(default_factory=set)  # rounds whose outcome began one
    begun_by: dict[str, int] = field(default_factory=dict)  # tool_call_id → round its outcome began
    # The ids the agent's utterances in this turn go out under: the turn's own, then one per
    # utterance after a failed hand-off (``t3.1``…), each numbered from seq 0.
    speeches: list[str] = field(default_factory=list)
    # Per round, for the turn's completions: the LLM tokens it recorded, and its response's
    # time to first token and the turn's wait for it (from its tool requests).
    round_usage: dict[int, Usage] = field(default_factory=dict)
    round_first_token: dict[int, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.speeches:
            self.speeches.append(self.turn_id)

    @property
    def speech(self) -> str:
        """The id the turn's next clauses go out under."""
        return self.speeches[-1]

    def speech_of(self, round_no: int) -> str:
        """The id round ``round_no``'s clauses went out under.

        A round whose outcome began a new speech is the last of its own: the rounds after it
        go out under the next one.
        """
        return self.speeches[sum(1 for begun in self.new_speech_after if begun < round_no)]

    def next_seq_of(self, speech: str) -> int:
        """The seq the next clause of ``speech`` gets (an earlier speech's included)."""
        return max((say.seq + 1 for say in self.says if say.turn_id == speech), default=0)

    @property
    def round(self) -> int:
        """The round now due: one per tool outcome received."""
        return len(self.round_starts) - 1

    @property
    def next_seq(self) -> int:
        """The seq the next clause of the current speech gets."""
        return self.says[-1].seq + 1 if self.says and self.says[-1].turn_id == self.speech \
            else 0

    @property
    def tools_out(self) -> bool:
        """Some tool the agent requested has no outcome yet (that outcome takes the turn up)."""
        return bool(set(self.tools) - self.results)

    @property
    def waiting_for_tools(self) -> bool:
        """Some tool the agent called has no outcome yet (or is not even requested yet)."""
        return bool(set(self.tools) - self.results or self.unrequested)

    def _hand_off_rounds(self) -> dict[int, bool]:
        """Rounds that called a hand-off → whether one of their hand-offs failed.

        A hand-off not requested yet (its instance died before it) counts: its round is a
        hand-off's all the same, to be closed and completed as one.
        """
        rounds: dict[int, bool] = {}
        for tool_call_id, name in self.tools.items():
            if name in HAND_OFFS:
                round_no = self.requested_in[tool_call_id]
                rounds[round_no] = rounds.get(round_no, False) or tool_call_id in self.failed
        for call, sibling in self.unrequested.values():
            if call.name in HAND_OFFS:
                rounds.setdefault(self.requested_in[sibling.tool_call_id], False)
        return rounds

    def hands_off_in(self, round_no: int) -> bool:
        """Round ``round_no`` called a hand-off."""
        return round_no in self._hand_off_rounds()

    def hand_off_index(self, round_no: int) -> int | None:
        """Which of the turn's hand-offs round ``round_no``'s is (0: the first); None: none.

        The turn's completion after its hand-off number ``i`` is its completion number ``i``:
        each hand-off before it failed and took the turn up again.
        """
        rounds = sorted(self._hand_off_rounds())
        return rounds.index(round_no) if round_no in rounds else None

    def hand_off_done(self, round_no: int) -> bool:
        """Round ``round_no``'s hand-off went through (it completed, none of it failed)."""
        ids = {i for i, name in self.tools.items()
               if name in HAND_OFFS and self.requested_in[i] == round_no}
        return bool(ids) and ids <= self.results - self.failed

    def rounds_up_to_hand_off(self, index: int) -> range:
        """The rounds the completion after hand-off number ``index`` reports."""
        rounds = sorted(self._hand_off_rounds())
        return range(rounds[index - 1] + 1 if index else 0, rounds[index] + 1)

    @property
    def failed_hand_offs(self) -> int:
        """Rounds whose hand-off failed: each takes the turn up again after its completion."""
        return sum(self._hand_off_rounds().values())

    @property
    def rounds_since_taken_up(self) -> range:
        """The rounds the turn's next completion reports, up to the current one.

        From the turn's start, or from the round after its latest failed hand-off: a completion
        reported the rounds before.
        """
        failed = [round_no for round_no, failed in self._hand_off_rounds().items() if failed]
        return range(max(failed) + 1 if failed else 0, self.round + 1)

    @property
    def started_since_taken_up(self) -> bool:
        """A round since the turn was taken up published ``turn.started``: a completion is due.

        Not so after a failed hand-off whose outcome never ran its round (the caller had cut
        the turn off): the completion before it closed what the integrator saw start.
        """
        return any(round_no in self.started_rounds for round_no in self.rounds_since_taken_up)

    def usage_since_taken_up(self) -> Usage:
        """The LLM tokens the rounds since the turn was taken up recorded."""
        return self.usage_of(self.rounds_since_taken_up)

    def usage_of(self, rounds: range) -> Usage:
        """The LLM tokens ``rounds`` recorded."""
        total = Usage()
        for round_no in rounds:
            total = add_usage(total, self.round_usage.get(round_no, Usage()))
        return total

    @property
    def completions(self) -> int:
        """The turn's completions (``turn.completed``: one per time it was taken up)."""
        return len(self.completion_ids)

    @property
    def completed(self) -> bool:
        """The brain is done with the turn (a failed hand-off reopens it until it completes)."""
        return self.completions > self.failed_hand_offs

    @property
    def handed_off(self) -> bool:
        """The latest round called a hand-off and none failed: the call ends or moves on."""
        if not self.requested_in:
            return False
        rounds = self._hand_off_rounds()
        latest = max(self.requested_in.values())
        return latest in rounds and not rounds[latest]


@dataclass
class Conversation:
    """Everything the brain knows about a call."""

    call_id: str
    org_id: str = ""
    agent_id: str = ""
    from_number: str = ""
    to_number: str = ""
    direction: str = ""
    context: dict[str, Any] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)
    turns: dict[str, AgentTurn] = field(default_factory=dict)
    latest_user_turn: str = ""
    latest_spoken_turn: str = ""  # of words, not keys: media numbers the two apart (t<n>, k<n>)
    user_turns: set[str] = field(default_factory=set)  # the caller's turns ended so far
    # The caller's spoken turns' words (not keys): what their knowledge was retrieved for.
    words_of: dict[str, str] = field(default_factory=dict)
    # Spoken turn → the words a follow-up's knowledge is searched with too (see the worker):
    # the subject it goes on with (:func:`carried_subject`) as of the caller's spoken turn
    # before it (the one it revises passed over).
    previous_words: dict[str, str] = field(default_factory=dict)
    # Spoken turn → that subject as turns' words: before it, and for the turn after it.
    subject_before: dict[str, tuple[str, ...]] = field(default_factory=dict)
    subject_after: dict[str, tuple[str, ...]] = field(default_factory=dict)
    greeted: bool = False
    ended: bool = False
    events: int = 0
    speeches: dict[str, str] = field(default_factory=dict)  # later speech id → its turn id
    caller_moves: int = 0  # the caller's speech starts, key presses and turns so far
    idle_turns: dict[str, int] = field(default_factory=dict)  # idle turn → caller_moves then

    def turn(self, turn_id: str) -> AgentTurn:
        """The agent's side of ``turn_id`` (created empty)."""
        found = self.turns.get(turn_id)
        if found is None:
            found = self.turns[turn_id] = AgentTurn(turn_id)
        return found

    def caller_moved_since(self, idle_turn: str) -> bool:
        """Whether the caller spoke or pressed a key after media asked for ``idle_turn``."""
        return self.caller_moves > self.idle_turns.get(idle_turn, self.caller_moves)

    def turn_of(self, speech_id: str) -> AgentTurn:
        """The turn whose utterance ``speech_id`` is (the turn's own id included)."""
        return self.turn(self.speeches.get(speech_id, speech_id))

    def apply(self, event: Event) -> None:
        """Fold one event in."""
        self.events += 1
        match event:
            case CallRequested():
                self.org_id, self.agent_id = event.org_id, event.agent_id
                self.from_number, self.to_number = event.from_number, event.to_number
                self.direction, self.context = event.direction, dict(event.context)
            case CallStreamStarted():
                self.org_id = event.org_id
                self.agent_id = self.agent_id or event.agent_id
            case TurnUserEnded():
                self.latest_user_turn = event.turn_id
                self.user_turns.add(event.turn_id)
                if event.reason != "dtmf":
                    before = self.subject_before.get(event.revises, ()) if event.revises \
                        else self.subject_after.get(self.latest_spoken_turn, ())
                    self.subject_before[event.turn_id] = before
                    self.subject_after[event.turn_id] = carried_subject(before, event.text)
                    self.previous_words[event.turn_id] = " ".join(before)
                    self.latest_spoken_turn = event.turn_id
                    self.words_of[event.turn_id] = event.text
                self.caller_moves += 1
                said = _CallerText(turn_id=event.turn_id, text=caller_text(event))
                last = self.messages[-1] if self.messages else None
                if event.revises and isinstance(last, UserMessage):
                    self.messages[-1] = said  # nothing heard between
                else:
                    self.messages.append(said)
            case AgentSay():
                turn = self.turn_of(event.turn_id)
                if event.last:  # (stored after the next speech began, perhaps: a hand-off's)
                    turn.closed.add(event.turn_id)
                if event.turn_id != turn.speech or event.seq < turn.next_seq:
                    return  # a duplicate (or of an utterance closed before)
                turn.says.append(event)
                turn.spoken_last = turn.spoken_last or event.last
                if event.turn_id == "t0":
                    self.greeted = True
                if event.text.strip() and not turn.interrupted and not event.filler_after_ms:
                    # After the interruption only what was heard counts: a clause stored after
                    # it (sent before the brain learnt of it) was dropped by media, unplayed.
                    self._say(event.turn_id, event.text.strip())
            case AgentSpeechInterrupted():
                turn = self.turn_of(event.turn_id)
                turn.interrupted = True
                self._replace_said(event.turn_id, event.played_text.strip())
            case ToolRequested():
                turn = self.turn_of(event.turn_id)
                if event.tool_call_id in turn.tools:
                    return  # published again past the duplicate window (a late redelivery)
                turn.tools[event.tool_call_id] = event.name
                late = turn.unrequested.pop(event.tool_call_id, None)
                # (requested late, after an outcome of its response perhaps: in its round)
                turn.requested_in[event.tool_call_id] = turn.round if late is None else (
                    turn.requested_in[late[1].tool_call_id])
                for call in event.response_calls:
                    if call.tool_call_id not in turn.tools:
                        turn.unrequested.setdefault(call.tool_call_id, (call, event))
                turn.round_first_token.setdefault(turn.requested_in[event.tool_call_id],
                                                  (event.ttft_ms, event.llm_wait_ms))
                if turn.turn_id not in self.idle_turns:  # an idle hang-up is not the model's
                    self.messages.append(ToolUse(id=event.tool_call_id, name=event.name,
                                                 arguments=dict(event.arguments)))
            case ToolCompleted() | ToolFailed() | ToolDenied():
                self._tool_outcome(event)
            case TurnStarted():
                turn = self.turn(event.turn_id)  # (published as its round begins)
                turn.started_rounds.add(turn.round)
                if event.caller_text:
                    self.reword(event.turn_id, event.caller_text)
            case TurnCompleted():
                self.turn(event.turn_id).completion_ids.add(event.id)
            case UsageRecorded() if event.turn_id and event.kind in LLM_KINDS and (
                    not event.speculative):  # (a dropped speculation is none of its rounds)
                turn = self.turn(event.turn_id)  # (stored in its round, before what ends it)
                turn.round_usage[turn.round] = add_usage(
                    turn.round_usage.get(turn.round, Usage()),
                    Usage(**{LLM_KINDS[event.kind]: int(event.quantity)}))
            case CallerIdle():
                self.idle_turns.setdefault(event.turn_id, self.caller_moves)
            case SpeechStarted() | CallDtmf():
                self.caller_moves += 1
            case CallEnded():
                self.ended = True

    def _say(self, speech_id: str, text: str) -> None:
        """Add what the agent said, before the caller's words it does not answer.

        The caller's turns folded since (their words stored before this clause: it was said as
        they spoke, or before they were answered) stay after it, so a request ends with them.
        So do another turn's tool uses still waiting for their results (an idle prompt said
        while a tool ran): after the use the text would come after its result once the
        result is moved up to it, the last thing of the round's request, a prefill. And the
        results already in of a turn still waiting for others (one of two tools came back):
        they are moved up to their uses all the same.
        """
        turn_id = self.speeches.get(speech_id, speech_id)
        at = len(self.messages)
        while at and (isinstance(before := self.messages[at - 1], _CallerText) and (
                before.turn_id != turn_id) or isinstance(before, ToolUse) and (
                self._owner(before.id) != turn_id) or isinstance(before, ToolResult) and (
                self._waiting_owner(before.tool_use_id, turn_id))):
            at -= 1
        before = self.messages[at - 1] if at else None
        if isinstance(before, _TurnText) and before.turn_id == speech_id:
            self.messages[at - 1] = _TurnText(turn_id=speech_id, text=f"{before.text} {text}")
        else:
            self.messages.insert(at, _TurnText(turn_id=speech_id, text=text))

    def reword(self, turn_id: str, text: str) -> None:
        """Give the caller's turn ``turn_id`` the words the model was asked with.

        A speculation asked with them cased or punctuated otherwise than the turn ended
        (``turn.started``'s ``caller_text``): the history keeps them, so each later request
        begins as that one did.
        """
        for index, message in enumerate(self.messages):
            if isinstance(message, _CallerText) and message.turn_id == turn_id:
                self.messages[index] = _CallerText(turn_id=turn_id, text=text)

    def _waiting_owner(self, tool_call_id: str, turn_id: str) -> bool:
        """The tool call is of another turn than ``turn_id``, one still waiting for tools."""
        owner = next((t for t in self.turns.values() if tool_call_id in t.tools), None)
        return owner is not None and owner.turn_id != turn_id and owner.waiting_for_tools

    def _owner(self, tool_call_id: str) -> str:
        """The turn that made the tool call ("" if none has it)."""
        return next((t.turn_id for t in self.turns.values() if tool_call_id in t.tools), "")

    def _replace_said(self, speech_id: str, heard: str) -> None:
        """Cut the utterance's text to what the caller heard of it, round by round.

        ``heard`` (media's played text) runs over the whole utterance: each round's text in
        order, with the tool filler between two rounds if it was said. Each text message of the
        utterance (a round's, in order) takes as many of the heard words as it has; a filler's
        are passed over (it is not history); a round of which nothing was heard keeps no text.
        """
        words = heard.split()
        fillers = {normalize_words(say.text) for say in self.turn_of(speech_id).says
                   if say.filler_after_ms and say.turn_id == speech_id}
        rounds = [i for i, m in enumerate(self.messages)
                  if isinstance(m, _TurnText) and m.turn_id == speech_id]
        kept: list[str] = []
        for index in rounds:
            words = _past_filler(words, fillers)
            count = len(self.messages[index].text.split())
            kept.append(" ".join(words[:count]))
            words = words[count:]
        for index, text in reversed(list(zip(rounds, kept, strict=True))):
            if text:
                self.messages[index] = _TurnText(turn_id=speech_id, text=text)
            else:
                del self.messages[index]

    def _tool_outcome(self, event: ToolCompleted | ToolFailed | ToolDenied) -> None:
        owner = next((t for t in self.turns.values() if event.tool_call_id in t.tools), None)
        if owner is None or event.tool_call_id in owner.results:
            return
        owner.results.add(event.tool_call_id)
        owner.latest_outcome = event.tool_call_id
        if not isinstance(event, ToolCompleted):
            owner.failed.add(event.tool_call_id)
        requested_in = owner.requested_in[event.tool_call_id]
        if requested_in not in owner.new_speech_after and (
                owner.spoken_last or owner.hands_off_in(requested_in)):
            # The speech is closed, or will be (a hand-off's round closes it, perhaps stored
            # after this outcome): what follows, if anything, is a new utterance.
            owner.new_speech_after.add(requested_in)
            speech = f"{owner.turn_id}.{len(owner.speeches)}"
            owner.speeches.append(speech)
            owner.spoken_last = False
            self.speeches[speech] = owner.turn_id
        owner.round_starts.append(owner.next_seq)
        owner.begun_by[event.tool_call_id] = owner.round
        if isinstance(event, ToolCompleted):
            content = event.result if isinstance(event.result, str) else json.dumps(
                event.result, default=str)
            if event.truncated:
                content += "\n[the tool's response was truncated]"
            result = ToolResult(tool_use_id=event.tool_call_id, content=content)
        elif isinstance(event, ToolFailed):
            result = ToolResult(tool_use_id=event.tool_call_id, content=event.error,
                                is_error=True)
        else:
            result = ToolResult(tool_use_id=event.tool_call_id, is_error=True,
                                content=f"denied by {event.denied_by}: {event.reason}".strip())
        if owner.turn_id not in self.idle_turns:
            self.messages.append(result)

    def llm_messages(self) -> tuple[Message, ...]:
        """The conversation for the model: agent text as plain assistant messages.

        Each tool use is answered right after it, as the APIs require: by its result wherever
        the fold stored it (an outcome can come after the caller's next words: an approval
        that takes a minute, a slow tool), or, while it has none, by a note that it is still
        running.
        """
        results = {m.tool_use_id: m for m in self.messages if isinstance(m, ToolResult)}
        out: list[Message] = []
        unanswered: list[str] = []  # the uses just passed, whose results come next

        def answer() -> None:
            out.extend(results.get(tool_id) or ToolResult(
                tool_use_id=tool_id, content=self._pending_note(tool_id))
                for tool_id in unanswered)
            unanswered.clear()

        for m in self.messages:
            if isinstance(m, ToolUse):
                out.append(m)
                unanswered.append(m.id)
            elif not isinstance(m, ToolResult):
                answer()
                out.append(AssistantMessage(text=m.text) if isinstance(m, _TurnText)
                           else UserMessage(text=m.text) if isinstance(m, _CallerText) else m)
        answer()
        return tuple(out)

    def _pending_note(self, tool_id: str) -> str:
        """What the model reads for a tool use whose outcome is not in yet.

        A hand-off whose last words the caller interrupted does not happen (the tools service
        refuses it once it hears of the interruption), and the caller's turn can be folded in
        before that refusal is: a key pressed over "Goodbye!" ends its turn with the
        interruption. "Still running" there had the model wait for a hang-up that never came,
        or say goodbye again.
        """
        owner = next((t for t in self.turns.values() if tool_id in t.tools), None)
        if owner is not None and owner.interrupted and owner.tools[tool_id] in HAND_OFFS:
            return ("not done: the caller interrupted the words before it, so the call goes "
                    "on; answer what they say")
        return "still running: its result is not in yet"


class _TurnText(AssistantMessage, frozen=True, kw_only=True, tag="assistant"):
    """Agent text that remembers its turn (so a barge-in can cut it back)."""

    turn_id: str


class _CallerText(UserMessage, frozen=True, kw_only=True, tag="user"):
    """The caller's words that remember their turn.

    So what the agent said for another turn, stored after them, can go before them.
    """

    turn_id: str


def _past_filler(words: list[str], fillers: set[str]) -> list[str]:
    """``words`` after a filler they begin with (as normalised words), if any."""
    for filler in fillers:
        size = len(filler.split())
        if size and normalize_words(" ".join(words[:size])) == filler:
            return words[size:]
    return words


def caller_text(event: TurnUserEnded) -> str:
    """What the model reads for a caller's turn: their words, or their keys marked as keypad input.

    A turn of keys (reason ``dtmf``) has the keys as its text; "1234#" on its own would read as
    words the caller said (see :mod:`parley.brain.llm.keypad`).
    """
    return keypad_message(event.text) if event.reason == "dtmf" else event.text


def fold(call_id: str, events: list[Event]) -> Conversation:
    """The conversation after ``events`` (the call's, in order)."""
    conversation = Conversation(call_id)
    for event in events:
        conversation.apply(event)
    return conversation
