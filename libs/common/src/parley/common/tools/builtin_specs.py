"""The built-in tools, as the model sees them.

Every agent is offered them all but ``transfer_call``, which only an agent with
``transfer_numbers`` is offered, its ``to`` pinned to those numbers (:func:`offered_builtins`).
``end_call`` is offered without the ``reason`` the tools service also accepts (the brain's own
hang-up on a silent caller gives "idle").
"""

from __future__ import annotations

from collections.abc import Sequence

from ..configuration.models import E164_PATTERN as E164
from .definitions import ToolSpec

END_CALL = ToolSpec(
    name="end_call", builtin=True,
    description="Hang up the call. Use it after saying goodbye, when the caller is done.",
    parameters={"type": "object", "properties": {}, "additionalProperties": False})

# What the tools service accepts for end_call: also ``reason`` "idle", with which the brain hangs
# up on a caller silent for the agent's idle_hangup_s (caller.idle), so call.ended says why. The
# model is offered END_CALL, without it.
END_CALL_ACCEPTED = ToolSpec(
    name=END_CALL.name, builtin=True, description=END_CALL.description,
    parameters={"type": "object", "additionalProperties": False,
                "properties": {"reason": {"enum": ["idle"]}}})

TRANSFER_CALL = ToolSpec(
    name="transfer_call", builtin=True,
    description="Transfer the caller to another phone number (cold transfer: you leave the "
                "call). Tell the caller before you transfer.",
    parameters={"type": "object", "required": ["to"], "additionalProperties": False,
                "properties": {"to": {"type": "string", "pattern": E164,
                                      "description": "E.164 number, e.g. +14155550123"}}})

SEND_DTMF = ToolSpec(
    name="send_dtmf", builtin=True,
    description="Press phone keys (DTMF), e.g. to navigate a phone menu. 'w' waits 0.5 s.",
    parameters={"type": "object", "required": ["digits"], "additionalProperties": False,
                "properties": {"digits": {"type": "string",
                                          "pattern": r"^[0-9*#wW]{1,64}(?!\n)$"}}})

LOOKUP_KNOWLEDGE = ToolSpec(
    name="lookup_knowledge", builtin=True,
    description="Search the business's knowledge base (policies, prices, hours, FAQs) and "
                "return the most relevant passages.",
    parameters={"type": "object", "required": ["query"], "additionalProperties": False,
                "properties": {"query": {"type": "string", "minLength": 1, "maxLength": 1000}}})

SCHEDULE_CALLBACK = ToolSpec(
    name="schedule_callback", builtin=True,
    description="Schedule a call back to the caller at a given time, at most 30 days ahead. "
                "Another number only if this agent allows it.",
    parameters={"type": "object", "required": ["when"], "additionalProperties": False,
                "properties": {
                    "when": {"type": "string",
                             "description": "ISO 8601 date-time with a UTC offset, "
                                            "e.g. 2030-01-31T15:00:00-05:00"},
                    "number": {"type": "string", "pattern": E164,
                               "description": "E.164 number; the caller's when omitted"},
                    "note": {"type": "string", "maxLength": 2000}}})

BUILTIN_SPECS: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in (END_CALL_ACCEPTED, TRANSFER_CALL, SEND_DTMF, LOOKUP_KNOWLEDGE,
                 SCHEDULE_CALLBACK)
}
"""Every built-in by name, with the general schemas the tools service validates against."""


def transfer_call_to(numbers: Sequence[str]) -> ToolSpec:
    """``transfer_call`` for an agent allowed ``numbers``: ``to`` is one of them (an enum)."""
    return ToolSpec(
        name="transfer_call", builtin=True,
        description=f"{TRANSFER_CALL.description} Only the listed numbers can be dialled.",
        parameters={"type": "object", "required": ["to"], "additionalProperties": False,
                    "properties": {"to": {"type": "string", "enum": list(dict.fromkeys(numbers)),
                                          "description": "E.164 number to transfer to"}}})


def offered_builtins(transfer_numbers: Sequence[str]) -> dict[str, ToolSpec]:
    """The built-ins offered to an agent whose ``transfer_numbers`` are these.

    Without transfer numbers the agent is not offered ``transfer_call`` at all (the tools
    service would refuse every target anyway); with them, the model picks among them.
    """
    offered = {END_CALL.name: END_CALL,
               TRANSFER_CALL.name: transfer_call_to(transfer_numbers)}
    return {name: offered.get(name, spec) for name, spec in BUILTIN_SPECS.items()
            if name != TRANSFER_CALL.name or transfer_numbers}
