"""How fast an org may place outbound calls: a token bucket per org, in this instance.

A placed call costs the org money at the carrier, so a leaked API key or an integrator's loop
gone wrong must not dial without bound. Each org has a bucket of ``burst`` calls refilled at
``rate_per_s``; a call takes one, and with none left ``POST /v1/calls`` answers 429 with
``Retry-After`` and dials nothing. Orgs have separate buckets, so one org's campaign never holds
back another's calls.

The buckets live in this process: with N gateway instances behind a load balancer an org may
place up to N times the limit. That still bounds a runaway loop, and it keeps a shared store
(and its round trip, and a failure mode) off the path of every call; see docs/architecture.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: datetime


class CallRateLimiter:
    """Token buckets by org; ``rate_per_s`` 0 means no limit."""

    def __init__(self, *, rate_per_s: float, burst: int, clock: Callable[[], datetime]) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    @property
    def unlimited(self) -> bool:
        """True when no limit is configured."""
        return self.rate_per_s <= 0

    def take(self, org_id: str) -> float:
        """Take a token for one call: 0 if taken, else the seconds until one is available.

        A refusal takes nothing, so retrying after that delay succeeds (unless someone else
        from the org took the token first).
        """
        if self.unlimited:
            return 0.0
        now = self.clock()
        bucket = self._buckets.get(org_id)
        if bucket is None:
            bucket = self._buckets[org_id] = _Bucket(tokens=float(self.burst), updated=now)
        else:
            # A wall clock stepped back (NTP, a VM restored) refills nothing for the step, and
            # the refill goes on from now: left in the future, ``updated`` would freeze the
            # bucket until the clock caught up with it, every 429 saying "retry in 1 s".
            elapsed = max(0.0, (now - bucket.updated).total_seconds())
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate_per_s)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate_per_s

    def give_back(self, org_id: str) -> None:
        """Return the token a call took that was not dialled after all (never past the burst)."""
        bucket = self._buckets.get(org_id)
        if bucket is not None and not self.unlimited:
            bucket.tokens = min(float(self.burst), bucket.tokens + 1.0)


def retry_after_header(delay_s: float) -> str:
    """``Retry-After`` in whole seconds (what HTTP allows), rounded up, at least 1."""
    return str(max(1, math.ceil(delay_s)))
