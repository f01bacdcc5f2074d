"""Read the TwiML a gateway answers with, as Twilio would execute it.

Only what the test kit acts on is modelled: ``<Connect><Stream>`` (with ``<Parameter>``s and the
``<Connect action>``), ``<Pause>``, ``<Redirect>`` and ``<Hangup>``/``<Reject>``; any other verb is
kept as :class:`OtherVerb` so callers can log it. The TwiML comes from our own gateway in tests
and development, so the standard library's XML parser is adequate.

A ``<Stream url>`` Twilio would not connect to is refused, as Twilio refuses it (error 31922):
Media Streams use ``wss`` only (``ws`` is let through for a local gateway without TLS), and the
URL takes no query string: values for the socket go in ``<Parameter>``s.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from urllib.parse import urlsplit


class TwimlError(ValueError):
    """The document is not TwiML Twilio would accept."""


@dataclass(frozen=True)
class ConnectStream:
    """``<Connect [action]><Stream url><Parameter name value/>…</Stream></Connect>``."""

    url: str
    parameters: dict[str, str] = field(default_factory=dict)
    action: str | None = None
    method: str = "POST"


@dataclass(frozen=True)
class Pause:
    """``<Pause length>``: silence for ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class Redirect:
    """``<Redirect method>url</Redirect>``: fetch more TwiML."""

    url: str
    method: str = "POST"


@dataclass(frozen=True)
class Hangup:
    """``<Hangup/>`` or ``<Reject/>``: end the call."""


@dataclass(frozen=True)
class OtherVerb:
    """A verb the test kit does not act on (``<Say>``, ``<Play>``, …)."""

    tag: str
    text: str = ""


Verb = ConnectStream | Pause | Redirect | Hangup | OtherVerb


def parse_twiml(document: str | bytes) -> list[Verb]:
    """The verbs of a ``<Response>``, in order; raises :class:`TwimlError` if it is not TwiML."""
    try:
        root = ElementTree.fromstring(document)
    except ElementTree.ParseError as error:
        raise TwimlError(f"not XML: {error}") from error
    if root.tag != "Response":
        raise TwimlError(f"root element is <{root.tag}>, expected <Response>")
    return [_verb(element) for element in root]


def _verb(element: ElementTree.Element) -> Verb:
    match element.tag:
        case "Connect":
            streams = [child for child in element if child.tag == "Stream"]
            if len(streams) != 1:
                other = [child.tag for child in element]
                return OtherVerb("Connect", f"nouns: {', '.join(other) or 'none'}")
            stream = streams[0]
            url = stream.get("url")
            if not url:
                raise TwimlError("<Stream> without a url")
            _check_stream_url(url)
            parameters = {
                parameter.get("name", ""): parameter.get("value", "")
                for parameter in stream if parameter.tag == "Parameter"
            }
            return ConnectStream(url, parameters, element.get("action"),
                                 element.get("method", "POST").upper())
        case "Pause":
            return Pause(float(element.get("length", "1")))
        case "Redirect":
            url = (element.text or "").strip()
            if not url:
                raise TwimlError("<Redirect> without a URL")
            return Redirect(url, element.get("method", "POST").upper())
        case "Hangup" | "Reject":
            return Hangup()
        case tag:
            return OtherVerb(tag, (element.text or "").strip())


def _check_stream_url(url: str) -> None:
    """Refuse a ``<Stream url>`` Twilio would not connect to (its error 31922)."""
    parts = urlsplit(url)
    if parts.scheme not in ("wss", "ws"):
        raise TwimlError(f"<Stream url={url!r}>: Twilio error 31922, Media Streams connect "
                         "over wss only")
    if parts.query or url.endswith("?"):
        raise TwimlError(f"<Stream url={url!r}>: Twilio error 31922, the url takes no query "
                         "string (pass values as <Parameter>s)")


def first_stream(verbs: list[Verb]) -> ConnectStream:
    """The ``<Connect><Stream>`` of a response; :class:`TwimlError` if there is none."""
    for verb in verbs:
        if isinstance(verb, ConnectStream):
            return verb
    raise TwimlError("no <Connect><Stream> in the TwiML: "
                     + ", ".join(type(verb).__name__ for verb in verbs))
