"""A call's conversation as a fold of its events: the only state the brain has.

Any brain instance can answer any turn because everything it needs is in the call's events:
what the caller said (``turn.user_ended``), what the agent said (``agent.say`` clauses — but
after ``agent.speech.interrupted`` only the part the caller actually heard), the tools the agent
called and their outcomes. Tool calls split an agent turn into *rounds*: round 0 answers the
caller, round *n* continues after the *n*-th tool outcome. Clause numbers (``seq``) run on
across rounds; a round re-run after a crash goes on after the clauses it already said
(``next_seq``), and a clause repeated with the same number carries the same event id and is
dropped as a duplicate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from parley.brain.llm.base import AssistantMessage, Message, ToolResult, ToolUse, UserMessage
from parley.common.events import (
    AgentSay,
    AgentSpeechInterrupted,
    CallEnded,
    CallRequested,
    CallStreamStarted,
    Event,
    ToolCompleted,
    ToolDenied,
    ToolFailed,
    ToolRequested,
    TurnCompleted,
    TurnUserEnded,
)


@dataclass
class AgentTurn:
    """What the agent did in one turn so far."""

    turn_id: str
    says: list[AgentSay] = field(default_factory=list)
    round_starts: list[int] = field(default_factory=lambda: [0])  # first seq of each round
    tools: dict[str, str] = field(default_factory=dict)  # tool_call_id → name
    results: set[str] = field(default_factory=set)  # tool_call_ids with an outcome
    completed: bool = False
    interrupted: bool = False
    spoken_last: bool = False  # a clause with last=True went out

    @property
    def round(self) -> int:
        """The round now due: one per tool outcome received."""
        return len(self.round_starts) - 1

    @property
    def next_seq(self) -> int:
        """The seq the next clause gets."""
        return self.says[-1].seq + 1 if self.says else 0

    @property
    def waiting_for_tools(self) -> bool:
        """Some tool the agent called has no outcome yet."""
        return bool(set(self.tools) - self.results)


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
    greeted: bool = False
    ended: bool = False
    events: int = 0

    def turn(self, turn_id: str) -> AgentTurn:
        """The agent's side of ``turn_id`` (created empty)."""
        found = self.turns.get(turn_id)
        if found is None:
            found = self.turns[turn_id] = AgentTurn(turn_id)
        return found

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
                last = self.messages[-1] if self.messages else None
                if event.revises and isinstance(last, UserMessage):
                    self.messages[-1] = UserMessage(text=event.text)  # nothing heard between
                else:
                    self.messages.append(UserMessage(text=event.text))
            case AgentSay():
                turn = self.turn(event.turn_id)
                if event.seq < turn.next_seq:
                    return  # a duplicate
                turn.says.append(event)
                turn.spoken_last = turn.spoken_last or event.last
                if event.turn_id == "t0":
                    self.greeted = True
                if event.text.strip() and not turn.interrupted:
                    # After the interruption only what was heard counts: a clause stored after
                    # it (sent before the brain learnt of it) was dropped by media, unplayed.
                    self._say(event.turn_id, event.text.strip())
            case AgentSpeechInterrupted():
                turn = self.turn(event.turn_id)
                turn.interrupted = True
                self._replace_said(event.turn_id, event.played_text.strip())
            case ToolRequested():
                turn = self.turn(event.turn_id)
                turn.tools[event.tool_call_id] = event.name
                self.messages.append(ToolUse(id=event.tool_call_id, name=event.name,
                                             arguments=dict(event.arguments)))
            case ToolCompleted() | ToolFailed() | ToolDenied():
                self._tool_outcome(event)
            case TurnCompleted():
                self.turn(event.turn_id).completed = True
            case CallEnded():
                self.ended = True

    def _say(self, turn_id: str, text: str) -> None:
        last = self.messages[-1] if self.messages else None
        if isinstance(last, _TurnText) and last.turn_id == turn_id:
            self.messages[-1] = _TurnText(turn_id=turn_id, text=f"{last.text} {text}")
        else:
            self.messages.append(_TurnText(turn_id=turn_id, text=text))

    def _replace_said(self, turn_id: str, heard: str) -> None:
        texts = [i for i, m in enumerate(self.messages)
                 if isinstance(m, _TurnText) and m.turn_id == turn_id]
        for index in reversed(texts[1:]):
            del self.messages[index]
        if texts:
            if heard:
                self.messages[texts[0]] = _TurnText(turn_id=turn_id, text=heard)
            else:
                del self.messages[texts[0]]

    def _tool_outcome(self, event: ToolCompleted | ToolFailed | ToolDenied) -> None:
        owner = next((t for t in self.turns.values() if event.tool_call_id in t.tools), None)
        if owner is None or event.tool_call_id in owner.results:
            return
        owner.results.add(event.tool_call_id)
        owner.round_starts.append(owner.next_seq)
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
        self.messages.append(result)

    def llm_messages(self) -> tuple[Message, ...]:
        """The conversation for the model: agent text as plain assistant messages."""
        return tuple(AssistantMessage(text=m.text) if isinstance(m, _TurnText) else m
                     for m in self.messages)


class _TurnText(AssistantMessage, frozen=True, kw_only=True, tag="assistant"):
    """Agent text that remembers its turn (so a barge-in can cut it back)."""

    turn_id: str


def fold(call_id: str, events: list[Event]) -> Conversation:
    """The conversation after ``events`` (the call's, in order)."""
    conversation = Conversation(call_id)
    for event in events:
        conversation.apply(event)
    return conversation
