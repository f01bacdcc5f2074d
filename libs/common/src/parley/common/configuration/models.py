"""Configuration records: orgs, agents and their settings, phone numbers, API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from ..events.envelope import Token

Pipeline = Literal["cascading", "managed", "realtime"]
InterruptionMode = Literal["none", "dtmf", "speech", "any"]
Sensitivity = Literal["low", "medium", "high"]
MachinePolicy = Literal["hangup", "leave_message", "continue"]

# An E.164 number as ``+`` and 7 to 15 digits. (?!\n): $ also matches before a final newline.
E164_PATTERN = r"^\+[1-9][0-9]{6,14}(?!\n)$"
E164Number = Annotated[str, msgspec.Meta(pattern=E164_PATTERN)]
# The start of E.164 numbers: "+" and up to 15 digits.
CallbackPrefix = Annotated[str, msgspec.Meta(pattern=r"^\+[0-9]{0,15}(?!\n)$")]

# What a caller says to show they are listening, not taking the turn. Spellings are matched
# loosely (media normalises "OK", "Uh huh", "Mhm", "mm-hm" to these), so one of each is enough.
DEFAULT_BACKCHANNELS = ("uh-huh", "mm-hmm", "okay", "right", "yeah", "yep", "sure", "i see",
                        "got it", "hmm", "mm")


class AgentSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How an agent talks and behaves on a call. New settings get defaults."""

    prompt: str = "You are a helpful phone agent. Keep answers short."
    greeting: str = "Hello! How can I help you today?"
    voice: str = ""
    language: str = "en-US"
    pipeline: Pipeline = "cascading"
    # What may cut the agent off: the caller's speech (speech), keys (dtmf), both (any) or
    # nothing (none). A caller turn that does not cut the agent's turn off waits until that
    # turn has played: in mode speech a key pressed over "For sales press 1, for support
    # press 2" goes out once the menu has played to its end. An agent whose prompts are menus
    # should use dtmf or any, so that an early key cuts the menu short.
    interruption_mode: InterruptionMode = "speech"
    interruption_sensitivity: Sensitivity = "medium"
    backchannels: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_BACKCHANNELS))
    endpointing_ms: Annotated[int, msgspec.Meta(ge=100, le=5000)] = 600
    max_duration_s: Annotated[int, msgspec.Meta(ge=10, le=4 * 3600)] = 1800
    # A reply not begun this long into the turn (the model slow, or a provider failing over):
    # the agent says a filler ("One moment."), then another, different one after each further
    # this long of silence (a few at most). 0: no filler; None: the brain's (1200 ms unless
    # PARLEY_FILLER_AFTER_MS says otherwise).
    filler_after_ms: Annotated[int, msgspec.Meta(ge=0, le=10000)] | None = None
    idle_prompt_s: Annotated[float, msgspec.Meta(ge=0)] = 8.0
    idle_hangup_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    # What the agent says to a caller silent for idle_prompt_s, and before it hangs up at
    # idle_hangup_s (in the agent's language: no model writes them). Words, not only spaces,
    # which would be said as nothing (a silent goodbye, then the hang-up).
    idle_prompt: Annotated[str, msgspec.Meta(max_length=500, pattern=r"\S")] = (
        "Are you still there?")
    idle_goodbye: Annotated[str, msgspec.Meta(max_length=500, pattern=r"\S")] = (
        "I haven't heard anything for a while, so I'll end the call now. Goodbye!")
    # Key presses as caller input (parley.common.keypad): a turn of keys ends this long after
    # the last key, or at once on the end key ("" none). Off: keys only interrupt (mode dtmf).
    keypad_input: bool = True
    keypad_timeout_ms: Annotated[int, msgspec.Meta(ge=300, le=10000)] = 2000
    keypad_end_key: Literal["#", "*", ""] = "#"
    machine_policy: MachinePolicy = "hangup"
    voicemail_message: str = ""
    record: bool = True
    providers: dict[str, str] = msgspec.field(default_factory=dict)
    # Where the built-in transfer_call may send a caller (a cold transfer: the org pays the
    # onward leg). Empty: the agent is not offered transfer_call and the tools service refuses
    # it, so a caller cannot talk the model into dialling a premium-rate or foreign number.
    transfer_numbers: list[E164Number] = msgspec.field(default_factory=list)
    # Whom the built-in schedule_callback may book a call back to (the gateway dials it when it
    # is due, at the org's expense): the caller's own number always; another number only if it
    # starts with one of these prefixes ("+1415"; "+" alone allows any). Empty: the caller's only.
    callback_number_prefixes: list[CallbackPrefix] = msgspec.field(default_factory=list)


class Org(msgspec.Struct, kw_only=True):
    """A tenant."""

    org_id: Token
    name: str
    allow_private_tool_targets: bool = False
    created_at: datetime | None = None


class Agent(msgspec.Struct, kw_only=True):
    """An AI phone agent of an org."""

    agent_id: Token
    org_id: Token
    name: str
    settings: AgentSettings
    created_at: datetime | None = None
    updated_at: datetime | None = None


class PhoneNumber(msgspec.Struct, kw_only=True):
    """An E.164 number routed to an agent."""

    number: str
    org_id: str
    agent_id: str
    carrier: Literal["twilio", "plivo"] = "twilio"


class ApiKey(msgspec.Struct, kw_only=True):
    """An API key's public part (the secret is shown once, at creation, and stored hashed)."""

    key_id: str
    org_id: str
    name: str = ""
    scopes: list[str] = msgspec.field(default_factory=list)
    created_at: datetime | None = None
    revoked_at: datetime | None = None
