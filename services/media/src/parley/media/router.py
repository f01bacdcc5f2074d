"""Choosing a speech provider, and falling back to the next one when it fails.

Each provider has a :class:`ProviderHealth` shared by every call in the process: a circuit
breaker (consecutive failures open it; a probe after ``reset_timeout`` closes it again), and
exponentially weighted error rate and latency (to open a stream), combined into a score. A stream
that opens has not succeeded yet: the session counts a success when it delivers (its first
result or audio) or ends cleanly, and a failure when it breaks. Counted on open, a provider that
took every socket and then stalled or failed every stream never opened its breaker. A
:class:`ProviderRouter` holds one kind's providers (STT or TTS) and, per call, walks the call's
chain (e.g. ``deepgram → whisper``) skipping providers whose breaker is open. Opening a stream
retries transient errors with backoff; permanent ones (4xx: bad key, bad request) move on at once,
as does a provider with no room for another stream (a local model at its limit), which is not
counted against its health. A permanent error counts once against the provider's health, whether
it came at the open or from a stream (the session counts the latter), unless it is
``call_specific``: a refusal of the call's own request (a language Deepgram has no model for, a
model Cartesia sunset for it) by a provider that answered. Counted, twenty Italian calls on a
sunset model opened the breaker and switched every other call to the fallback. The call that
got a permanent error passes ``refused``: its providers that failed it permanently are not
tried again for that call (a misconfigured encoding or a sunset model is refused again, however
often it is asked), while other calls go on with the breaker deciding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from parley.common.resilience import CircuitBreaker, retry_policy
from parley.media.providers.base import ProviderBusy, ProviderError

log = logging.getLogger(__name__)

P = TypeVar("P")
S = TypeVar("S")


class ProviderHealth:
    """Breaker plus error-rate and latency EWMAs for one provider."""

    def __init__(self, name: str, *, failure_threshold: int = 3, reset_timeout_s: float = 30.0,
                 alpha: float = 0.2) -> None:
        self.name = name
        self.breaker = CircuitBreaker(f"provider:{name}", failure_threshold=failure_threshold,
                                      reset_timeout=reset_timeout_s)
        self.alpha = alpha
        self.error_rate = 0.0
        self.latency_s = 0.0

    def opened(self, latency_s: float) -> None:
        """A stream opened in ``latency_s``: no verdict yet (it may still stall or fail)."""
        self.latency_s += self.alpha * (latency_s - self.latency_s)

    def success(self) -> None:
        """A stream did its job: it delivered (its first result or audio) or ended cleanly."""
        self.breaker.record_success()
        self.error_rate *= 1 - self.alpha

    def failure(self, error: ProviderError | None = None) -> None:
        """The provider failed a call (with ``error``): counted unless the call's own refusal."""
        if error is not None and not error.counted:
            return
        self.breaker.record_failure()
        self.error_rate += self.alpha * (1 - self.error_rate)

    @property
    def available(self) -> bool:
        """Whether the breaker lets calls through (a half-open breaker lets a probe through)."""
        return self.breaker.state.value != "open"

    @property
    def score(self) -> float:
        """0 (useless) … 1 (healthy and instant)."""
        return (1 - self.error_rate) / (1 + self.latency_s)


class AllProvidersFailed(ProviderError):
    """Every provider in the chain failed or is unavailable."""


class ProviderRouter(Generic[P]):
    """One kind of provider (``stt`` or ``tts``) by name, with health and fallback."""

    def __init__(self, kind: str, providers: dict[str, P], default_chain: Sequence[str], *,
                 open_attempts: int = 2, retry_initial_s: float = 0.1) -> None:
        unknown = [name for name in default_chain if name not in providers]
        if unknown or not default_chain:
            raise ValueError(f"{kind} chain {list(default_chain)} names unknown providers "
                             f"{unknown}; configured: {sorted(providers)}")
        self.kind = kind
        self.providers = providers
        self.default_chain = list(default_chain)
        self.health = {name: ProviderHealth(name) for name in providers}
        self.open_attempts = open_attempts
        self.retry_initial_s = retry_initial_s

    def chain(self, preferred: str = "") -> list[str]:
        """The call's chain: the agent's preferred provider first if configured, then defaults."""
        names = list(self.default_chain)
        if preferred in self.providers:
            names = [preferred, *[n for n in names if n != preferred]]
        return names

    async def open(self, chain: Sequence[str], opener: Callable[[P], Awaitable[S]], *,
                   after: str = "", refused: set[str] | None = None) -> tuple[str, S]:
        """Open a stream on the first usable provider of ``chain`` (after ``after``, if given).

        Providers with an open breaker are tried last, only if no other one opens (a probe is
        better than no provider at all). Transient open errors are retried with backoff; a
        permanent one moves on at once. ``refused`` (the call's providers that failed it
        permanently) are skipped, and one that fails to open with a permanent error is added
        to it (a full one is not: it may have room later).
        """
        names = list(chain)
        if after in names:
            names = names[names.index(after) + 1:]
        skipped = [n for n in names if refused and n in refused]
        names = [n for n in names if n not in skipped]
        usable = ([n for n in names if self.health[n].available]
                  + [n for n in names if not self.health[n].available])
        last: ProviderError | None = None
        for name in usable:
            provider = self.providers[name]
            started = time.monotonic()
            try:
                async for attempt in retry_policy(
                        attempts=self.open_attempts, initial=self.retry_initial_s,
                        maximum=1.0, retry_on=(ProviderError,),
                        is_transient=lambda exc: not getattr(exc, "permanent", False)):
                    with attempt:
                        stream = await opener(provider)
            except ProviderBusy as exc:  # healthy, only full: not held against it
                log.warning("%s provider %s has no room: %s", self.kind, name, exc)
                last = exc
                continue
            except ProviderError as exc:
                self.health[name].failure(exc)
                log.warning("%s provider %s failed to open: %s", self.kind, name, exc)
                if exc.permanent and refused is not None:
                    refused.add(name)
                last = exc
                continue
            self.health[name].opened(time.monotonic() - started)
            return name, stream
        gone = f"; refused this call for good: {skipped}" if skipped else ""
        raise AllProvidersFailed(self.kind, f"no {self.kind} provider could open "
                                 f"(tried {usable}{gone}); last error: {last}")
