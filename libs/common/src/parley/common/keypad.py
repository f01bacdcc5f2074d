"""Key presses as caller input: the digits a caller types become a caller turn.

"Enter your order number, then press pound": a phone agent must hear keys as well as words.
Whoever hears the call gathers them: media on the call's audio clock (milliseconds of inbound
audio, as the turn detector uses), the gateway's ConversationRelay bridge on the wall clock.
Both end the turn the same way, as ``turn.user_ended`` with reason ``dtmf`` and the keys pressed
as its text ("1234#"); the brain answers it like any other turn.

A turn of keys ends ``timeout_ms`` after the last key (the caller stopped typing), at once on
the agent's ``end_key`` (kept in the text: "#" alone can mean "repeat that"), and at once at
:data:`MAX_KEYS`, so a stuck key cannot hold a turn open for ever. ``AgentSettings.keypad_input``
off: keys are not input (they still interrupt the agent in interruption mode ``dtmf`` or
``any``, and still show the caller is there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .configuration.models import AgentSettings

MAX_KEYS = 32  # longer than any account or card number a caller is asked for


@dataclass(frozen=True)
class KeypadSettings:
    """Per-agent keypad input (``AgentSettings.keypad_*``)."""

    enabled: bool = True
    timeout_ms: int = 2000  # after the last key, the turn ends
    end_key: str = "#"  # ends the turn at once ("" none)

    @classmethod
    def of(cls, settings: AgentSettings) -> KeypadSettings:
        """An agent's keypad settings."""
        return cls(enabled=settings.keypad_input, timeout_ms=settings.keypad_timeout_ms,
                   end_key=settings.keypad_end_key)


class Keypad:
    """The keys of the caller turn being typed. One per call; times in ms on the owner's clock."""

    def __init__(self, settings: KeypadSettings | None = None) -> None:
        self.settings = settings or KeypadSettings()
        self._keys: list[str] = []
        self._last_ms = 0

    @property
    def pending(self) -> str:
        """The keys typed so far in the open turn ("" when none)."""
        return "".join(self._keys)

    @property
    def due_ms(self) -> int | None:
        """When the open turn ends if no other key comes (None: no turn open)."""
        return self._last_ms + self.settings.timeout_ms if self._keys else None

    def press(self, key: str, now_ms: int) -> str | None:
        """A key: the turn's keys if it ends with it, else None (and nothing when input is off)."""
        if not self.settings.enabled or not key:
            return None
        self._keys.append(key)
        self._last_ms = now_ms
        if key == self.settings.end_key or len(self._keys) >= MAX_KEYS:
            return self._take()
        return None

    def poll(self, now_ms: int) -> str | None:
        """The turn's keys once its timeout has passed since the last key, else None."""
        due = self.due_ms
        if due is None or now_ms < due:
            return None
        return self._take()

    def drop(self, keys: str) -> None:
        """Forget ``keys``, typed first, as another ended their turn; keep the keys after them.

        (A media successor reading the call's past: the predecessor's turn of keys can be
        stored after keys the caller typed next.) Keys that do not begin with them: all go.
        """
        if self.pending.startswith(keys):
            del self._keys[:len(keys)]
        else:
            self._keys.clear()

    def clear(self) -> None:
        """Forget the keys typed (the call ended, or its owner changed)."""
        self._keys.clear()

    def _take(self) -> str:
        keys = "".join(self._keys)
        self._keys.clear()
        return keys
