"""Plivo XML the gateway answers with, built with the plivo SDK's ``plivoxml`` elements.

Pure functions of the configuration and the call, so they are unit-testable and shared by the
answer webhook and REST transfers.
"""

from __future__ import annotations

from urllib.parse import urlencode

from plivo import plivoxml

from parley.common.configuration import AgentSettings

from ..config import GatewayConfig

ANSWER_PATH = "/plivo/answer"
HANGUP_PATH = "/plivo/hangup"
RING_PATH = "/plivo/ring"
STREAM_PATH = "/plivo/stream"
STREAM_STATUS_PATH = "/plivo/stream-status"
TRANSFER_PATH = "/plivo/transfer"
CONTENT_TYPE = "audio/x-mulaw;rate=8000"
NOT_IN_SERVICE = "Sorry, this number is not in service. Goodbye."


def callback_url(config: GatewayConfig, path: str, **ids: str) -> str:
    """``<public base><path>?call_id=…`` — our ids ride in every URL we give Plivo."""
    return f"{config.public_base}{path}?{urlencode(ids)}" if ids else config.public_base + path


def stream_xml(config: GatewayConfig, settings: AgentSettings, *, call_id: str) -> str:
    """A bidirectional µ-law ``<Stream>`` to our socket, then a ``<Redirect>`` back to us.

    ``keepCallAlive`` holds the call on the stream while the socket lasts. When it closes,
    Plivo follows the redirect to the answer URL: a call that has ended is hung up there, and a
    still-live one (say, the instance holding its socket died) is reconnected to a new stream —
    the counterpart of Twilio's ``<Connect action>``. Its URL says ``reconnect=1``, since Plivo
    retrying a slow first answer asks the answer URL too, and that is no reconnect.
    ``streamTimeout`` is the agent's maximum call duration, a carrier-side backstop for the
    session's own timer.
    """
    response = plivoxml.ResponseElement()
    response.add(plivoxml.StreamElement(
        callback_url(config, STREAM_PATH, call_id=call_id).replace(
            config.public_base, config.public_ws_base, 1),
        bidirectional=True,
        keepCallAlive=True,
        contentType=CONTENT_TYPE,
        streamTimeout=settings.max_duration_s,
        statusCallbackUrl=callback_url(config, STREAM_STATUS_PATH, call_id=call_id),
        statusCallbackMethod="POST",
    ))
    response.add(plivoxml.RedirectElement(
        callback_url(config, ANSWER_PATH, call_id=call_id, reconnect="1"), method="POST"))
    return str(response.to_string(pretty=False))


def speak_and_hangup(message: str, *, language: str = "en-US") -> str:
    """Say a message, then hang up (unknown number)."""
    response = plivoxml.ResponseElement()
    if message:
        response.add(plivoxml.SpeakElement(message, language=language))
    response.add(plivoxml.HangupElement())
    return str(response.to_string(pretty=False))


def hangup_xml() -> str:
    """Just hang up."""
    response = plivoxml.ResponseElement()
    response.add(plivoxml.HangupElement())
    return str(response.to_string(pretty=False))


def dial_xml(to: str) -> str:
    """Hand the call to ``to`` (a cold transfer)."""
    response = plivoxml.ResponseElement()
    dial = plivoxml.DialElement()
    dial.add(plivoxml.NumberElement(to))
    response.add(dial)
    return str(response.to_string(pretty=False))
