"""Request and response bodies of the calls API (msgspec Structs), and their validation.

Decoding errors become problems that name the field at fault: malformed JSON is a 400, a body
of the wrong shape (missing, unknown or mistyped field) a 422 with ``field`` set. Free-form JSON
the event store keeps (``context``, ``metadata``) must be storable as Postgres ``jsonb``: no NUL
character in any key or string, and at most :data:`MAX_JSON_DEPTH` levels of nesting.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, TypeVar

import msgspec
import phonenumbers

from parley.common.events.envelope import Token
from parley.common.problems import Problem
from parley.common.request_bodies import decode_json

T = TypeVar("T")

# ASCII digits only, matched whole (fullmatch: `$` would let a trailing newline through).
E164 = re.compile(r"\+[1-9][0-9]{1,14}")
MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32  # levels of objects/arrays in a free-form field (the field itself is one)


class PlaceCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/calls``: have an agent call a number from one of the org's numbers."""

    agent_id: Token
    to: str
    from_: str = msgspec.field(name="from")
    context: dict[str, Any] = msgspec.field(default_factory=dict)
    metadata: dict[str, Annotated[str, msgspec.Meta(max_length=1024)]] = msgspec.field(
        default_factory=dict)


class CallCreated(msgspec.Struct, kw_only=True):
    """The answer to ``POST /v1/calls``."""

    call_id: str
    status: str = "dialing"


class CallView(msgspec.Struct, kw_only=True):
    """``GET /v1/calls/{id}``: one call as the ``calls`` read model has it."""

    call_id: str
    agent_id: str
    direction: str
    from_: str = msgspec.field(name="from")
    to: str
    carrier: str
    carrier_call_id: str
    state: str
    answered_by: str = ""
    end_reason: str = ""
    failure_reason: str = ""
    requested_at: datetime | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    duration_s: float | None = None
    turns: int = 0


_FIELD_AT = re.compile(r"at `\$\.(?P<field>[A-Za-z_][A-Za-z0-9_]*)")
_FIELD_NAMED = re.compile(r"field `(?P<field>[^`]+)`")
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def decode_body(body: bytes, kind: type[T]) -> T:
    """Decode a JSON body into ``kind`` or raise the 400/422 Problem naming what is wrong."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decode_json(body, decoder)  # malformed JSON or not UTF-8: the 400 problem
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _FIELD_AT.search(message) or _FIELD_NAMED.search(message)
        field = match["field"] if match else ""
        raise invalid(field, message) from None
    except RecursionError:
        raise invalid("", f"the body is nested too deeply (at most {MAX_JSON_DEPTH} levels "
                      "in context)") from None


def invalid(field: str, detail: str) -> Problem:
    """A 422 problem about one field of the request body (``field`` is empty if none)."""
    extra = {"field": field} if field else {}
    prefix = f"{field}: " if field and not detail.startswith(field) else ""
    return Problem(422, "Unprocessable Content", prefix + detail, kind="invalid-request",
                   extra=extra)


def storable(value: Any, field: str) -> None:
    """Raise the 422 naming ``field`` if the event store could not keep ``value`` as jsonb.

    Postgres refuses a NUL character in jsonb (the recorder would dead-letter the call's
    call.requested), and deep nesting costs recursion in every reader, so both are refused here.
    """
    pending: list[tuple[Any, int, str]] = [(value, 1, field)]
    while pending:
        item, depth, path = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise invalid(field, f"{path[:200]} contains a NUL character (\\u0000)")
            continue
        if isinstance(item, dict | list) and depth > MAX_JSON_DEPTH:
            raise invalid(field, f"{path[:200]} is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in key:
                    raise invalid(field, f"a key in {path[:200]} contains a NUL character "
                                  "(\\u0000)")
                pending.append((child, depth + 1, f"{path}.{key}"))
        elif isinstance(item, list):
            pending.extend((child, depth + 1, f"{path}[{index}]")
                           for index, child in enumerate(item))


def e164(value: str, field: str) -> str:
    """``value`` as a valid E.164 number (``+14155550100``); a 422 naming ``field`` if not.

    Strict on purpose: a formatted or national number is refused rather than guessed at. The
    number returned (to the carrier, the events and the self-call check) is phonenumbers' own
    E.164 rendering of it, never the raw input.
    """
    if not E164.fullmatch(value):
        raise invalid(field, f"{value!r} is not an E.164 number (like +14155550100)")
    try:
        parsed = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        raise invalid(field, f"{value!r} is not a phone number: {exc}") from None
    if not phonenumbers.is_valid_number(parsed):
        raise invalid(field, f"{value} is not a valid phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
