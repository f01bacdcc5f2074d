"""The brain's agent settings and tools, read from Postgres and kept per (org, agent)."""

from __future__ import annotations

import msgspec

from parley.brain.agents import AgentLookups
from parley.common.configuration import AgentSettings, create_agent, create_org

from .conftest import AGENT, ORG, SETTINGS


async def test_another_orgs_miss_is_not_what_the_agents_own_org_gets(pool) -> None:
    desk = msgspec.structs.replace(SETTINGS, transfer_numbers=["+14155550199"])
    async with pool.connection() as conn:
        await create_org(conn, "rival", "Rival Dental")
        await create_agent(conn, ORG, "Front desk", desk, agent_id="desk")
    lookups = AgentLookups(pool, keep_s=30.0)
    # A call of another org naming this agent's id finds no such agent of its own …
    assert await lookups.settings("rival", "desk") == AgentSettings()
    assert "transfer_call" not in [tool.name for tool in await lookups.tools("rival", "desk")]
    # … and the agent's own org still gets its settings and tools, not that miss.
    assert await lookups.settings(ORG, "desk") == desk
    assert "transfer_call" in [tool.name for tool in await lookups.tools(ORG, "desk")]


async def test_settings_are_kept_for_keep_s_then_read_again(pool) -> None:
    now = [0.0]
    lookups = AgentLookups(pool, keep_s=30.0, clock=lambda: now[0])
    assert (await lookups.settings(ORG, AGENT)).greeting == SETTINGS.greeting
    async with pool.connection() as conn:
        await conn.execute("UPDATE agents SET settings = jsonb_set(settings, '{greeting}', "
                           "'\"Hi there!\"') WHERE agent_id = %s", (AGENT,))
        await conn.commit()
    now[0] = 29.0
    assert (await lookups.settings(ORG, AGENT)).greeting == SETTINGS.greeting
    now[0] = 31.0
    assert (await lookups.settings(ORG, AGENT)).greeting == "Hi there!"
