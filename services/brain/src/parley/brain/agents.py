"""An agent's settings and tools as the brain reads them: from Postgres, kept for a while.

Kept per (org, agent): an agent id looked up under another org finds nothing (the default
settings, no tools), and that miss must not become what the agent's own org's calls get.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from psycopg_pool import AsyncConnectionPool

from parley.brain.llm.base import ToolSpec
from parley.common.configuration.models import AgentSettings
from parley.common.configuration.repository import get_agent
from parley.common.tools import agent_tool_specs


class AgentLookups:
    """``settings`` and ``tools`` of an agent, each kept ``keep_s`` after it was read."""

    def __init__(self, pool: AsyncConnectionPool[Any], *, keep_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pool, self._keep_s, self._clock = pool, keep_s, clock
        self._settings: dict[tuple[str, str], tuple[float, AgentSettings]] = {}
        self._tools: dict[tuple[str, str], tuple[float, list[ToolSpec]]] = {}

    async def settings(self, org_id: str, agent_id: str) -> AgentSettings:
        """The agent's settings (the defaults for no agent, or one not of ``org_id``)."""
        key = (org_id, agent_id)
        hit = self._settings.get(key)
        if hit is not None and self._clock() - hit[0] < self._keep_s:
            return hit[1]
        async with self._pool.connection() as conn:
            agent = await get_agent(conn, agent_id, org_id=org_id) if agent_id else None
        settings = agent.settings if agent is not None else AgentSettings()
        self._settings[key] = (self._clock(), settings)
        return settings

    async def tools(self, org_id: str, agent_id: str) -> list[ToolSpec]:
        """What the model is offered for the agent: the built-ins it may use, its HTTP tools."""
        if not agent_id:
            return []
        key = (org_id, agent_id)
        hit = self._tools.get(key)
        if hit is not None and self._clock() - hit[0] < self._keep_s:
            return hit[1]
        async with self._pool.connection() as conn:
            specs = await agent_tool_specs(conn, org_id, agent_id)
        found = [ToolSpec(name=s.name, description=s.description, input_schema=s.parameters)
                 for s in specs]
        self._tools[key] = (self._clock(), found)
        return found
