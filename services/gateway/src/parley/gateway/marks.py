"""Playback marks: how an outbound frame's ``Parley-Mark`` header names a point in a turn.

The media service puts ``<turn_id>:<seq>`` in the header of the frame after which the mark
belongs; the gateway sends it to the carrier as the mark (Twilio) or checkpoint (Plivo) name
and turns the carrier's echo back into agent.speech.progress with that turn id and seq.
"""

from __future__ import annotations

import re

# A seq as mark_name writes it: ASCII digits (str.isdigit() also takes "²", which int()
# refuses), and few enough for an int64 (int() refuses over 4300 digits).
_SEQ = re.compile(r"[0-9]{1,18}")


def mark_name(turn_id: str, seq: int) -> str:
    """The name a mark carries on the wire."""
    return f"{turn_id}:{seq}"


def parse_mark(name: str) -> tuple[str, int]:
    """``(turn_id, seq)`` from a mark name.

    A name not made by :func:`mark_name` is kept whole as the turn id with seq 0, so foreign
    marks are still reported rather than dropped.
    """
    turn_id, sep, seq = name.rpartition(":")
    if sep and turn_id and _SEQ.fullmatch(seq):
        return turn_id, int(seq)
    return name, 0
