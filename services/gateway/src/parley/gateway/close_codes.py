"""Every WebSocket close code the gateway sends, in one place (Twilio and Plivo sockets alike).

1xxx are RFC 6455 codes; 44xx are ours, for carrier-protocol errors (the 4000-4999 range is
reserved for applications). The reason text sent with each close says what exactly was wrong.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """Why the gateway closed a carrier's socket."""

    NORMAL = 1000  # call over: stop received, hung up, max duration reached
    GOING_AWAY = 1001  # this instance is shutting down; the carrier reconnects elsewhere
    UNSUPPORTED_DATA = 1003  # a binary frame, or text that is not JSON
    POLICY_VIOLATION = 1008  # unknown or ended call, stream id mismatch, replaced by a new stream
    MESSAGE_TOO_BIG = 1009  # a frame over max_frame_bytes (sent by aiohttp's reader)
    INTERNAL_ERROR = 1011  # a bug on our side; the call's other sockets are unaffected
    INVALID_MESSAGE = 4400  # JSON, but not a valid message of the protocol (fields, types)
    # 4401 (an event the protocol does not define) is no longer sent: such a message is
    # ignored and counted (carrier_messages.py); the number is not reused.
    INVALID_PAYLOAD = 4402  # media payload that is not valid base64
    OUT_OF_ORDER = 4403  # sequenceNumber not greater than the previous one
    NOT_STARTED = 4404  # media, mark, dtmf or stop before start/setup
    DUPLICATE_START = 4405  # a second start/setup on the same socket
    # a Twilio start/setup without a stream token issued for its call, unused and unexpired:
    # a captured upgrade replayed, or a stream of a <Connect> already used (replays.py)
    STREAM_TOKEN_REFUSED = 4406
    START_TIMEOUT = 4408  # no start/setup within stream_start_timeout_s of the upgrade
    NO_PONG = 4409  # nothing heard, not even a pong to our ping: the socket is taken for dead
    CARRIER_SILENT = 4410  # a media stream without a message for gateway_carrier_silence_s


class ProtocolViolation(Exception):
    """Close the socket with ``code`` and ``reason`` (at most 123 bytes on the wire)."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(f"{int(code)} {reason}")
        self.code = code
        self.reason = reason

    @property
    def message(self) -> bytes:
        """The close reason, truncated to what a close frame can carry."""
        return close_reason(self.reason)


def close_reason(reason: str) -> bytes:
    """``reason`` as a close frame carries it: at most 123 bytes, cut between characters.

    RFC 6455 requires a close reason to be UTF-8; a character cut in two makes the peer fail
    the frame itself (1007) and never read our code. Reasons can quote the carrier's text.
    """
    return reason.encode()[:123].decode(errors="ignore").encode()


def clean_text(text: str, limit: int = 10_000) -> str:
    """Carrier text made safe for events: no NUL (Postgres jsonb refuses it), bounded length."""
    return text.replace("\x00", "")[:limit]
