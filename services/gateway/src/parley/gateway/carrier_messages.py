"""Decoding a carrier socket's messages, tolerant of events the protocol does not (yet) define.

Carriers add events to their socket protocols over time (Twilio added ``dtmf`` to Media
Streams after launch; Plivo's own code reads a ``stop`` its protocol page does not list). The
sockets are signature-checked at upgrade, so such a message comes from the carrier itself, and
closing the socket on it would hang up every live call at once. A JSON object whose event
(``event``, or ``type`` for ConversationRelay) is a string we do not know therefore decodes to
:class:`UnknownMessage`, which the session ignores: counted in
``parley_gateway_unknown_messages_total{protocol,event}`` and logged once per socket. A message
of an event we do know that is malformed, an event that is not a string, text that is not JSON
and binary frames still close the socket.
"""

from __future__ import annotations

import re
import weakref
from typing import Any, Generic, TypeVar, get_args

import msgspec

from parley.common.metrics import Metrics

from .close_codes import CloseCode, ProtocolViolation

M = TypeVar("M")

# The event label's values: a carrier that sent names made up per message (ids in them) would
# otherwise grow the metric without bound. Names are cut and reduced to [A-Za-z0-9_] (event
# names are identifiers), and past MAX_EVENT_LABELS distinct ones a gateway counts the rest
# under "other".
EVENT_LABEL_CHARS = 32
MAX_EVENT_LABELS = 16
OTHER = "other"
_NOT_LABEL = re.compile(r"[^A-Za-z0-9_]")
_labels_seen: weakref.WeakKeyDictionary[Metrics, set[str]] = weakref.WeakKeyDictionary()


class UnknownMessage(msgspec.Struct, frozen=True):
    """A well-formed message of an event the protocol does not define; ``event`` as sent."""

    event: str


class CarrierDecoder(Generic[M]):
    """Decodes one protocol's messages (a tagged union of Structs) built once, like msgspec's.

    ``decode`` returns a message of the union, or :class:`UnknownMessage`; anything else raises
    the :class:`ProtocolViolation` naming what is wrong.
    """

    def __init__(self, messages: Any, *, tag_field: str) -> None:
        self._decoder: msgspec.json.Decoder[M] = msgspec.json.Decoder(messages, strict=False)
        # Only on the error path: is it an object whose tag is a string (any other fields)?
        self._tagged = msgspec.json.Decoder(msgspec.defstruct("Tagged", [(tag_field, str)]))
        self._tag_field = tag_field
        self.known = frozenset(str(kind.__struct_config__.tag) for kind in get_args(messages))

    def decode(self, data: str) -> M | UnknownMessage:
        """Parse one message; an unknown event's is :class:`UnknownMessage`."""
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            event = self._unknown_event(data)
            if event is not None:
                return UnknownMessage(event)
            raise ProtocolViolation(CloseCode.INVALID_MESSAGE, f"invalid message: {exc}") from None
        except msgspec.DecodeError:
            raise ProtocolViolation(CloseCode.UNSUPPORTED_DATA, "message is not JSON") from None

    def _unknown_event(self, data: str) -> str | None:
        try:
            tagged = self._tagged.decode(data)
        except msgspec.ValidationError:
            return None
        except msgspec.DecodeError:  # msgspec checks the tag before it has read all the JSON
            raise ProtocolViolation(CloseCode.UNSUPPORTED_DATA, "message is not JSON") from None
        event: str = getattr(tagged, self._tag_field)
        return None if event in self.known else event


def event_label(metrics: Metrics, event: str) -> str:
    """``event`` as the metric's label: cut, reduced to [A-Za-z0-9_], or "other" past the cap."""
    label = _NOT_LABEL.sub("_", event[:EVENT_LABEL_CHARS]) or OTHER
    seen = _labels_seen.setdefault(metrics, set())
    if label == OTHER or label in seen:
        return label
    if len(seen) >= MAX_EVENT_LABELS:
        return OTHER
    seen.add(label)
    return label
