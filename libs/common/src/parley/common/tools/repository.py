"""Tool definitions and secrets in Postgres, and the specs the brain offers the model.

Each function takes an open connection (autocommit or the caller's transaction). Definitions
are stored as JSON (an :class:`HttpTool`), validated on the way in and on the way out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from ..configuration.repository import get_agent
from .builtin_specs import BUILTIN_SPECS, offered_builtins
from .definitions import HttpTool, ToolDefinitionError, ToolSpec, parse_http_tool


async def add_tool(conn: AsyncConnection[Any], org_id: str, agent_id: str,
                   definition: HttpTool | dict[str, Any], *, replace: bool = False) -> HttpTool:
    """Add (or with ``replace``, overwrite) an HTTP tool of an org's agent."""
    tool = parse_http_tool(definition if isinstance(definition, dict)
                           else msgspec.to_builtins(definition))
    if tool.name in BUILTIN_SPECS:
        raise ToolDefinitionError(f"{tool.name!r} is a built-in tool's name")
    cursor = await conn.execute(
        "SELECT 1 FROM agents WHERE agent_id = %s AND org_id = %s AND deleted_at IS NULL",
        (agent_id, org_id))
    if await cursor.fetchone() is None:
        raise ToolDefinitionError(f"agent {agent_id!r} not found in org {org_id!r}")
    conflict = ("DO UPDATE SET definition = excluded.definition, updated_at = now()"
                if replace else "DO NOTHING")
    cursor = await conn.execute(
        "INSERT INTO tools (org_id, agent_id, name, definition) VALUES (%s, %s, %s, %s) "
        f"ON CONFLICT (agent_id, name) {conflict} RETURNING name",
        (org_id, agent_id, tool.name, Jsonb(msgspec.to_builtins(tool))))
    if await cursor.fetchone() is None:
        raise ToolDefinitionError(f"agent {agent_id!r} already has a tool {tool.name!r}")
    return tool


async def get_tool(conn: AsyncConnection[Any], org_id: str, agent_id: str,
                   name: str) -> HttpTool | None:
    """One HTTP tool of an org's agent, or None."""
    cursor = await conn.execute(
        "SELECT definition FROM tools WHERE org_id = %s AND agent_id = %s AND name = %s",
        (org_id, agent_id, name))
    row = await cursor.fetchone()
    return None if row is None else msgspec.convert(row[0], HttpTool)


async def list_tools(conn: AsyncConnection[Any], org_id: str, agent_id: str) -> list[HttpTool]:
    """An org's agent's HTTP tools, by name."""
    cursor = await conn.execute(
        "SELECT definition FROM tools WHERE org_id = %s AND agent_id = %s ORDER BY name",
        (org_id, agent_id))
    return [msgspec.convert(row[0], HttpTool) for row in await cursor.fetchall()]


async def delete_tool(conn: AsyncConnection[Any], org_id: str, agent_id: str, name: str) -> bool:
    """Remove a tool; True if there was one."""
    cursor = await conn.execute(
        "DELETE FROM tools WHERE org_id = %s AND agent_id = %s AND name = %s RETURNING name",
        (org_id, agent_id, name))
    return await cursor.fetchone() is not None


async def agent_tool_specs(conn: AsyncConnection[Any], org_id: str, agent_id: str, *,
                           builtins: Iterable[str] | None = None) -> list[ToolSpec]:
    """Everything to offer the model for this agent: the built-ins, then its HTTP tools.

    ``transfer_call`` is offered only to an agent with ``transfer_numbers``, pinned to them
    (:func:`~parley.common.tools.builtin_specs.offered_builtins`). ``builtins`` limits which
    built-ins are included (default: all the agent is offered).
    """
    agent = await get_agent(conn, agent_id, org_id=org_id)
    offered = offered_builtins(agent.settings.transfer_numbers if agent is not None else [])
    wanted = offered if builtins is None else {
        name: offered[name] for name in builtins if name in offered}
    return [*wanted.values(), *(tool.spec() for tool in await list_tools(conn, org_id, agent_id))]


async def set_secret(conn: AsyncConnection[Any], org_id: str, name: str, value: str) -> None:
    """Create or replace an org secret for ``{secret:<name>}`` header templates."""
    await conn.execute(
        "INSERT INTO tool_secrets (org_id, name, value) VALUES (%s, %s, %s) "
        "ON CONFLICT (org_id, name) DO UPDATE SET value = excluded.value, updated_at = now()",
        (org_id, name, value))


async def get_secrets(conn: AsyncConnection[Any], org_id: str,
                      names: Iterable[str]) -> dict[str, str]:
    """The org's values for the named secrets (absent names are left out)."""
    cursor = await conn.execute(
        "SELECT name, value FROM tool_secrets WHERE org_id = %s AND name = ANY(%s)",
        (org_id, list(names)))
    return {row[0]: row[1] for row in await cursor.fetchall()}


async def allows_private_targets(conn: AsyncConnection[Any], org_id: str) -> bool:
    """The org's ``allow_private_tool_targets`` (False for an unknown org)."""
    cursor = await conn.execute(
        "SELECT allow_private_tool_targets FROM orgs WHERE org_id = %s", (org_id,))
    row = await cursor.fetchone()
    return bool(row and row[0])
