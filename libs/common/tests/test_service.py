"""The service shell's start-up settling."""

from __future__ import annotations

import gc

from parley.common.service import settle


def walked(obj: object) -> bool:
    """Whether a collection would walk ``obj`` (it is in one of the collector's generations)."""
    return any(candidate is obj for candidate in gc.get_objects())


def test_settle_moves_what_is_loaded_out_of_the_collectors_reach() -> None:
    loaded = [[n] for n in range(1000)]  # what a start-up keeps for good (lists are tracked)
    assert walked(loaded[0])
    try:
        before = gc.get_freeze_count()
        settle()
        assert gc.get_freeze_count() >= before + len(loaded)
        assert not walked(loaded[0])  # never walked again
    finally:
        gc.unfreeze()
