"""The media worker: claims calls, runs their sessions, takes over calls of dead instances.

Calls arrive through the shared durable consumer ``media-claims`` on ``call.stream_started``
(a work queue: each event goes to one instance). The instance creates the call's lease and runs
a :class:`~parley.media.session.CallSession`; a redelivered or duplicate event finds the lease
taken and is acked. A stream that is not ``cascading`` (ConversationRelay does its own speech)
is not media's. The :class:`~parley.media.ownership.Leases` watcher starts sessions for calls
whose owner went silent, resuming from the lease's checkpoint. A lease is renewed from the
moment it is won, while the session starts (settings to read, a recogniser to open).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from nats.aio.msg import Msg
from psycopg_pool import AsyncConnectionPool

from parley.common.bus import ConsumerSettings, DurableConsumer, events_of_type
from parley.common.configuration.models import AgentSettings
from parley.common.configuration.repository import get_agent
from parley.common.events import CallEnded, CallStreamStarted, Event
from parley.common.metrics import Metrics
from parley.media.config import MediaConfig
from parley.media.ownership import LeaseState
from parley.media.providers.base import SttProvider, TtsProvider
from parley.media.router import ProviderRouter
from parley.media.session import CallSession, SessionServices, usage_records

log = logging.getLogger(__name__)


def build_routers(config: MediaConfig) -> tuple[ProviderRouter[SttProvider],
                                                 ProviderRouter[TtsProvider]]:
    """The STT and TTS providers this instance can use, in their default chains."""
    from parley.media.providers.local.piper_tts import PiperTts
    from parley.media.providers.local.whisper_stt import WhisperStt

    stt: dict[str, SttProvider] = {"whisper": WhisperStt(cpu_threads=config.whisper_threads,
                                                       max_streams=config.whisper_max_streams)}
    tts: dict[str, TtsProvider] = {"piper": PiperTts()}
    if config.key("deepgram"):
        from parley.media.providers.deepgram_stt import DeepgramStt

        stt["deepgram"] = DeepgramStt(config.key("deepgram"),
                                      base_url=config.deepgram_url or None)
    if config.key("cartesia"):
        from parley.media.providers.cartesia_tts import CartesiaTts

        options: dict[str, Any] = {"base_url": config.cartesia_url or None}
        if config.cartesia_voice:
            options["voice_id"] = config.cartesia_voice
        tts["cartesia"] = CartesiaTts(config.key("cartesia"), **options)
    return (ProviderRouter("stt", stt, config.chain("stt")),
            ProviderRouter("tts", tts, config.chain("tts")))


class AgentSettingsCache:
    """Agents' settings from Postgres, cached for a short while."""

    def __init__(self, pool: AsyncConnectionPool[Any], ttl_s: float = 30.0) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, AgentSettings]] = {}

    async def get(self, org_id: str, agent_id: str) -> AgentSettings:
        """The agent's settings (defaults if the agent is unknown: the call still gets served)."""
        hit = self._cache.get(agent_id)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        settings = AgentSettings()
        if agent_id:
            async with self.pool.connection() as conn:
                agent = await get_agent(conn, agent_id, org_id=org_id)
            if agent is None:
                log.warning("agent %s of org %s not found; using default settings", agent_id,
                            org_id)
            else:
                settings = agent.settings
        self._cache[agent_id] = (time.monotonic(), settings)
        return settings


class MediaWorker:
    """One media instance's calls."""

    def __init__(self, services: SessionServices, agents: AgentSettingsCache, *,
                 metrics: Metrics | None = None) -> None:
        self.s = services
        self.agents = agents
        self.sessions: dict[str, tuple[CallSession, asyncio.Task[None]]] = {}
        self._consumer = DurableConsumer(services.bus, ConsumerSettings(
            durable="media-claims", filter_subjects=[events_of_type("call.stream_started")],
            ack_wait_s=10.0, max_deliver=5), self._on_stream_started)
        if metrics is not None:
            self._live = metrics.gauge("media_calls", "Calls this instance is serving")
            self._taken = metrics.counter("media_takeovers", "Calls taken over from others")
        else:
            self._live = self._taken = None

    async def start(self) -> None:
        """Start claiming new calls and watching for orphaned ones."""
        await self._consumer.start()
        await self.s.leases.watch(self._take_over)

    async def stop(self) -> None:
        """Stop claiming; hand live calls over to other instances."""
        await self._consumer.stop()
        await self.s.leases.stop()
        for session, _ in list(self.sessions.values()):
            session.stop("shutdown")
        await asyncio.gather(*(task for _, task in self.sessions.values()),
                             return_exceptions=True)
        await self.s.leases.close()

    async def _on_stream_started(self, event: Event, msg: Msg) -> None:
        if not isinstance(event, CallStreamStarted) or event.pipeline != "cascading":
            return
        if event.call_id in self.sessions:
            return
        state = LeaseState(owner=self.s.instance, org_id=event.org_id, agent_id=event.agent_id)
        revision = await self.s.leases.claim(event.call_id, state)
        if revision is None:
            log.info("call %s is already owned; not claiming", event.call_id)
            return
        try:
            # Renewed from now on: the session takes a while to start (settings, a recogniser).
            await self.s.leases.hold(event.call_id, revision, lambda: state, lambda: log.warning(
                "call %s: lost before its session started", event.call_id))
            await self._start(event.call_id, event.org_id, event.agent_id, revision, None)
        except Exception:
            # Nobody serves the call: give the claim up, so the redelivery can claim it again.
            revision = await self.s.leases.let_go(event.call_id) or revision
            await self.s.leases.release(event.call_id, revision)
            raise

    async def _take_over(self, call_id: str, state: LeaseState, revision: int) -> None:
        if call_id in self.sessions:
            return
        events = await self.s.bus.replay_call(call_id, org_id=state.org_id)
        if any(isinstance(e, CallEnded) for e in events):
            # No session to start; what the owner used by its last renewal is recorded still.
            if state.usage is not None:
                for record in usage_records(state.org_id, call_id, state.usage):
                    await self.s.bus.publish(record)
            revision = await self.s.leases.let_go(call_id) or revision  # renewed meanwhile
            await self.s.leases.release(call_id, revision)
            return
        if self._taken is not None:
            self._taken.inc()
        await self._start(call_id, state.org_id, state.agent_id, revision, state)

    async def _start(self, call_id: str, org_id: str, agent_id: str, revision: int,
                     resume: LeaseState | None) -> None:
        settings = await self.agents.get(org_id, agent_id)
        session = CallSession(self.s, call_id=call_id, org_id=org_id, agent_id=agent_id,
                              settings=settings, revision=revision, resume=resume)
        task = asyncio.create_task(self._run(session), name=f"call:{call_id}")
        self.sessions[call_id] = (session, task)

    async def _run(self, session: CallSession) -> None:
        if self._live is not None:
            self._live.inc()
        try:
            await session.run()
        except Exception:
            log.exception("call %s: session crashed", session.call_id)
        finally:
            self.sessions.pop(session.call_id, None)
            if self._live is not None:
                self._live.dec()
            log.info("call %s: media done (%s)", session.call_id, session.end_reason)
