"""The built-in tools every agent is offered, as the model sees them."""

from __future__ import annotations

from .definitions import ToolSpec

E164 = r"^\+[1-9][0-9]{6,14}(?!\n)$"  # (?!\n): $ also matches before a final newline

END_CALL = ToolSpec(
    name="end_call", builtin=True,
    description="Hang up the call. Use it after saying goodbye, when the caller is done.",
    parameters={"type": "object", "properties": {}, "additionalProperties": False})

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
    description="Schedule a call back to the caller (or another number) at a given time.",
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
    for spec in (END_CALL, TRANSFER_CALL, SEND_DTMF, LOOKUP_KNOWLEDGE, SCHEDULE_CALLBACK)
}
