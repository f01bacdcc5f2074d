"""What a ``parley`` command reports as one line (``parley: …``, exit status 1), not a traceback."""

from __future__ import annotations


class CommandError(Exception):
    """A command cannot do what was asked: bad input, a missing server; the message says why."""
