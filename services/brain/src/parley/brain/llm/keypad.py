"""Key presses in the conversation a model reads.

A caller's turn of keys (``turn.user_ended`` with reason ``dtmf``, see
:mod:`parley.common.keypad`) has the keys as its text: "1234#". Given to a model as it is, that
reads as something the caller *said*. The fold writes it as a user message marked as keypad
input (:func:`keypad_message`); a model understands the mark, and the local responder, which
sees only the message text, recognises it (:func:`pressed_keys`).
"""

from __future__ import annotations

__all__ = ["KEYPAD_MARK", "keypad_message", "pressed_keys"]

KEYPAD_MARK = "[keypad]"  # no recogniser writes brackets: spoken words never start with it


def keypad_message(keys: str) -> str:
    """The user message for a turn of key presses: ``"[keypad] 1234#"``."""
    return f"{KEYPAD_MARK} {keys.strip()}"


def pressed_keys(text: str) -> str | None:
    """The keys of a :func:`keypad_message`; None for a message of words."""
    if not text.startswith(f"{KEYPAD_MARK} "):
        return None
    return text.removeprefix(KEYPAD_MARK).strip()
