"""Every tool use the model sees is answered right after it, whatever came in between.

The caller may speak while a tool is out (an approval that takes a minute, a slow HTTP tool, a
hand-off refused after the caller interrupted it): their turn is folded in before the outcome.
Anthropic's API (and OpenAI's) refuse a history whose tool_use is not followed at once by its
tool_result, which would fail the caller's turn on every provider but the local responder.
"""

from __future__ import annotations

from parley.brain.conversation import fold
from parley.brain.llm.anthropic_llm import to_anthropic_messages
from parley.brain.llm.base import ToolResult, ToolUse
from parley.common.events import (
    AgentSay,
    AgentSpeechInterrupted,
    Event,
    ToolCompleted,
    ToolRequested,
    TurnCompleted,
    TurnUserEnded,
)

from .conftest import ORG


def _events(*, outcome: bool) -> list[Event]:
    events: list[Event] = [
        TurnUserEnded(org_id=ORG, call_id="c", turn_id="t1", text="Refund my last order."),
        AgentSay(org_id=ORG, call_id="c", turn_id="t1", seq=0, text="Let me check."),
        ToolRequested(org_id=ORG, call_id="c", turn_id="t1", tool_call_id="toolu_r",
                      name="refund", arguments={"order": "42"}),
        # The refund waits for a person's approval; the caller speaks meanwhile.
        TurnUserEnded(org_id=ORG, call_id="c", turn_id="t2", text="Hello? Are you there?"),
        AgentSay(org_id=ORG, call_id="c", turn_id="t2", seq=0, text="Yes, still checking.",
                 last=True),
        TurnCompleted(org_id=ORG, call_id="c", turn_id="t2"),
    ]
    if outcome:
        events.append(ToolCompleted(org_id=ORG, call_id="c", tool_call_id="toolu_r",
                                    name="refund", result={"ok": True}))
    return events


def _check_pairs(messages: list[dict]) -> None:
    """Anthropic's rule: the tool uses of a message are all answered in the very next one."""
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or isinstance(message["content"], str):
            continue
        used = {b["id"] for b in message["content"] if b["type"] == "tool_use"}
        if not used:
            continue
        following = messages[index + 1] if index + 1 < len(messages) else None
        assert following is not None and following["role"] == "user", messages
        answered = {b["tool_use_id"] for b in following["content"]
                    if isinstance(b, dict) and b["type"] == "tool_result"}
        assert used <= answered, messages


def test_a_result_that_came_after_the_callers_next_turn_answers_its_use() -> None:
    conversation = fold("c", _events(outcome=True))
    messages = to_anthropic_messages(conversation.llm_messages())
    _check_pairs(messages)
    [result] = [b for m in messages if not isinstance(m["content"], str)
                for b in m["content"] if b["type"] == "tool_result"]
    assert (result["tool_use_id"], result["content"]) == ("toolu_r", '{"ok": true}')


def test_a_use_still_waiting_for_its_result_is_answered_as_pending() -> None:
    conversation = fold("c", _events(outcome=False))
    items = conversation.llm_messages()
    _check_pairs(to_anthropic_messages(items))
    [pending] = [m for m in items if isinstance(m, ToolResult)]
    assert pending.tool_use_id == "toolu_r" and "not in yet" in pending.content
    assert [m.id for m in items if isinstance(m, ToolUse)] == ["toolu_r"]


def test_a_hand_off_whose_goodbye_the_caller_cut_off_is_not_running() -> None:
    # "#" pressed over "Goodbye!": the turn of keys comes with the interruption, before the
    # tools service's refusal of the end_call is stored. The model must not read the hang-up
    # as under way (it would wait for it, or say goodbye again): it is not going to happen.
    events: list[Event] = [
        TurnUserEnded(org_id=ORG, call_id="c", turn_id="t1", text="That's all, thanks."),
        AgentSay(org_id=ORG, call_id="c", turn_id="t1", seq=0, text="Goodbye!", last=True),
        ToolRequested(org_id=ORG, call_id="c", turn_id="t1", tool_call_id="toolu_e",
                      name="end_call", arguments={}),
        AgentSpeechInterrupted(org_id=ORG, call_id="c", turn_id="t1", played_text="Good"),
        TurnUserEnded(org_id=ORG, call_id="c", turn_id="k1", text="#", reason="dtmf"),
    ]
    messages = fold("c", events).llm_messages()
    [note] = [m for m in messages if isinstance(m, ToolResult)]
    assert note.tool_use_id == "toolu_e" and note.content.startswith("not done")
    # Not interrupted: the hang-up is under way.
    running = fold("c", [e for e in events if not isinstance(e, AgentSpeechInterrupted)])
    [note] = [m for m in running.llm_messages() if isinstance(m, ToolResult)]
    assert note.content.startswith("still running")
