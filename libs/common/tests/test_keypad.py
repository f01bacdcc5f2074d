"""Key presses gathered into a caller turn (parley.common.keypad)."""

from __future__ import annotations

import pytest

from parley.common.configuration.models import AgentSettings
from parley.common.keypad import MAX_KEYS, Keypad, KeypadSettings


def test_a_turn_of_keys_ends_its_timeout_after_the_last_key() -> None:
    pad = Keypad(KeypadSettings(timeout_ms=2000))
    assert pad.press("1", 100) is None
    assert pad.press("2", 1500) is None
    assert pad.due_ms == 3500
    assert pad.poll(3499) is None  # the caller may still be typing
    assert pad.pending == "12"
    assert pad.poll(3500) == "12"
    assert pad.pending == "" and pad.due_ms is None
    assert pad.poll(10_000) is None  # once


def test_the_end_key_ends_the_turn_at_once_and_is_kept() -> None:
    pad = Keypad(KeypadSettings(end_key="#"))
    assert pad.press("4", 0) is None
    assert pad.press("2", 10) is None
    assert pad.press("#", 20) == "42#"
    assert pad.due_ms is None
    assert pad.press("#", 30) == "#"  # alone it still means something ("repeat that")


@pytest.mark.parametrize("end_key", ["*", ""])
def test_other_end_keys(end_key: str) -> None:
    pad = Keypad(KeypadSettings(end_key=end_key))
    assert pad.press("#", 0) is None  # not this agent's end key: just a key
    if end_key:
        assert pad.press(end_key, 5) == "#*"
    else:
        assert pad.poll(2000) == "#"


def test_a_stuck_key_cannot_hold_a_turn_open() -> None:
    pad = Keypad(KeypadSettings(end_key=""))
    results = [pad.press("5", i * 100) for i in range(MAX_KEYS)]
    assert results[:-1] == [None] * (MAX_KEYS - 1)
    assert results[-1] == "5" * MAX_KEYS


def test_input_off_gathers_nothing() -> None:
    pad = Keypad(KeypadSettings(enabled=False))
    assert pad.press("#", 0) is None
    assert pad.press("1", 0) is None
    assert pad.due_ms is None and pad.poll(99_999) is None


def test_clear_forgets_the_keys() -> None:
    pad = Keypad()
    pad.press("7", 0)
    pad.clear()
    assert pad.poll(99_999) is None


def test_settings_come_from_the_agent() -> None:
    settings = KeypadSettings.of(AgentSettings(keypad_timeout_ms=1500, keypad_end_key="*"))
    assert settings == KeypadSettings(enabled=True, timeout_ms=1500, end_key="*")
    assert not KeypadSettings.of(AgentSettings(keypad_input=False)).enabled
    assert KeypadSettings.of(AgentSettings()) == KeypadSettings()


def test_drop_forgets_the_keys_another_ended_a_turn_with_and_keeps_the_rest() -> None:
    pad = Keypad(KeypadSettings(timeout_ms=1000))
    for n, key in enumerate("123"):
        pad.press(key, n * 100)
    pad.drop("12")
    assert pad.pending == "3" and pad.due_ms == 1200
    pad.drop("9")  # not what was typed first: nothing of it is known to be pending
    assert pad.pending == "" and pad.due_ms is None
