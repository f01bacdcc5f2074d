"""The service shell's start-up settling."""

from __future__ import annotations

import gc

from parley.common.service import settle


def test_settle_moves_what_is_loaded_out_of_the_collectors_reach() -> None:
    loaded = [{"config": n} for n in range(1000)]  # what a start-up keeps for good
    try:
        before = gc.get_freeze_count()
        settle()
        assert gc.get_freeze_count() >= before + len(loaded)
        assert not any(loaded[0] is obj for obj in gc.get_objects())  # never walked again
    finally:
        gc.unfreeze()
