"""Recorder settings, from ``PARLEY_*`` environment variables."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from parley.common.config import CommonConfig


class RecorderConfig(CommonConfig, kw_only=True):
    """``PARLEY_RECORDER_BATCH_SIZE`` etc.; see CommonConfig for the shared ones."""

    recorder_batch_size: Annotated[int, msgspec.Meta(ge=1, le=50_000)] = 2000
    # Chaos testing only: SIGKILL the process at this point of the Nth batch.
    recorder_crash_point: Literal["", "after_insert", "after_commit"] = ""
    recorder_crash_after_batches: int = 1
