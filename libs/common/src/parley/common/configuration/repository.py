"""Reads and writes of configuration; every write emits its config event via the outbox.

Functions take an open connection and run in one transaction each, so a change and its event
commit together.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import msgspec
import phonenumbers
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from .. import events as ev
from .models import Agent, AgentSettings, ApiKey, Org, PhoneNumber
from .outbox import emit

API_KEY_PREFIX = "pk"
# What a key is given when its scopes are not named: the org's calls and its agents' knowledge
# (tools:approve, for the people who approve sensitive tool calls, is only ever asked for).
DEFAULT_SCOPES = ("calls:write", "calls:read", "knowledge:read", "knowledge:write")


class ConfigurationError(ValueError):
    """A configuration change that cannot be made (unknown org, bad number, duplicate…)."""


def normalize_e164(number: str) -> str:
    """``+15551234567`` from any parseable form with a country code; raise if invalid."""
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException as exc:
        raise ConfigurationError(f"{number!r} is not a phone number: {exc}") from exc
    if not phonenumbers.is_possible_number(parsed):
        raise ConfigurationError(f"{number!r} is not a possible phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


async def create_org(conn: AsyncConnection[Any], org_id: str, name: str, *,
                     actor: str = "") -> Org:
    """Create a tenant."""
    if not ev.is_token(org_id):
        raise ConfigurationError(f"org id {org_id!r} must be letters, digits, _ or -")
    async with conn.transaction():
        cursor = await conn.execute(
            "INSERT INTO orgs (org_id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING "
            "RETURNING created_at", (org_id, name))
        row = await cursor.fetchone()
        if row is None:
            raise ConfigurationError(f"org {org_id!r} already exists")
        await emit(conn, ev.OrgCreated(org_id=org_id, name=name, actor=actor))
    return Org(org_id=org_id, name=name, created_at=row[0])


async def list_orgs(conn: AsyncConnection[Any]) -> list[Org]:
    """Every org."""
    cursor = await conn.execute(
        "SELECT org_id, name, allow_private_tool_targets, created_at FROM orgs ORDER BY org_id")
    return [Org(org_id=r[0], name=r[1], allow_private_tool_targets=r[2], created_at=r[3])
            for r in await cursor.fetchall()]


async def create_agent(conn: AsyncConnection[Any], org_id: str, name: str,
                       settings: AgentSettings | None = None, *, agent_id: str | None = None,
                       actor: str = "") -> Agent:
    """Create an agent in an org."""
    settings = settings or AgentSettings()
    agent_id = agent_id or f"ag_{secrets.token_hex(6)}"
    if not ev.is_token(agent_id):
        raise ConfigurationError(f"agent id {agent_id!r} must be letters, digits, _ or -")
    data = msgspec.to_builtins(settings)
    async with conn.transaction():
        await _require_org(conn, org_id)
        cursor = await conn.execute(
            "INSERT INTO agents (agent_id, org_id, name, settings) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING RETURNING created_at", (agent_id, org_id, name, Jsonb(data)))
        row = await cursor.fetchone()
        if row is None:
            raise ConfigurationError(f"agent {agent_id!r} already exists")
        await emit(conn, ev.AgentCreated(org_id=org_id, agent_id=agent_id, name=name,
                                         settings=data, actor=actor))
    return Agent(agent_id=agent_id, org_id=org_id, name=name, settings=settings,
                 created_at=row[0], updated_at=row[0])


async def update_agent(conn: AsyncConnection[Any], org_id: str, agent_id: str,
                       changes: dict[str, Any], *, actor: str = "") -> Agent:
    """Change some settings (validated as a whole) of an org's agent."""
    async with conn.transaction():
        agent = await get_agent(conn, agent_id, org_id=org_id, for_update=True)
        if agent is None:
            raise ConfigurationError(f"agent {agent_id!r} not found in org {org_id!r}")
        merged = {**msgspec.to_builtins(agent.settings), **changes}
        try:
            settings = msgspec.convert(merged, AgentSettings)
        except msgspec.ValidationError as exc:
            raise ConfigurationError(f"invalid agent settings: {exc}") from exc
        await conn.execute(
            "UPDATE agents SET settings = %s, updated_at = now() WHERE agent_id = %s",
            (Jsonb(msgspec.to_builtins(settings)), agent_id))
        await emit(conn, ev.AgentUpdated(org_id=org_id, agent_id=agent_id, changes=changes,
                                         actor=actor))
    agent.settings = settings
    return agent


async def get_agent(conn: AsyncConnection[Any], agent_id: str, *, org_id: str | None = None,
                    for_update: bool = False) -> Agent | None:
    """One live agent; scoped to the org when given."""
    query = ("SELECT agent_id, org_id, name, settings, created_at, updated_at FROM agents "
             "WHERE agent_id = %s AND deleted_at IS NULL")
    params: list[Any] = [agent_id]
    if org_id is not None:
        query += " AND org_id = %s"
        params.append(org_id)
    cursor = await conn.execute(query + (" FOR UPDATE" if for_update else ""), params)
    row = await cursor.fetchone()
    return None if row is None else _agent(row)


async def list_agents(conn: AsyncConnection[Any], org_id: str) -> list[Agent]:
    """An org's live agents."""
    cursor = await conn.execute(
        "SELECT agent_id, org_id, name, settings, created_at, updated_at FROM agents "
        "WHERE org_id = %s AND deleted_at IS NULL ORDER BY created_at", (org_id,))
    return [_agent(row) for row in await cursor.fetchall()]


async def assign_number(conn: AsyncConnection[Any], org_id: str, number: str, agent_id: str, *,
                        carrier: str = "twilio", actor: str = "") -> PhoneNumber:
    """Route an E.164 number to one of the org's agents (re-assigning within the org is fine)."""
    number = normalize_e164(number)
    if carrier not in ("twilio", "plivo"):
        raise ConfigurationError(f"carrier must be twilio or plivo, not {carrier!r}")
    async with conn.transaction():
        if await get_agent(conn, agent_id, org_id=org_id) is None:
            raise ConfigurationError(f"agent {agent_id!r} not found in org {org_id!r}")
        cursor = await conn.execute(
            "INSERT INTO numbers (number, org_id, agent_id, carrier) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (number) DO UPDATE SET agent_id = excluded.agent_id, "
            "carrier = excluded.carrier WHERE numbers.org_id = excluded.org_id RETURNING number",
            (number, org_id, agent_id, carrier))
        if await cursor.fetchone() is None:
            raise ConfigurationError(f"{number} belongs to another org")
        await emit(conn, ev.NumberAssigned(org_id=org_id, number=number, agent_id=agent_id,
                                           carrier=carrier, actor=actor))
    return PhoneNumber(number=number, org_id=org_id, agent_id=agent_id,
                       carrier=carrier)  # type: ignore[arg-type]


async def find_number(conn: AsyncConnection[Any], number: str) -> PhoneNumber | None:
    """Who answers calls to this number."""
    try:
        number = normalize_e164(number)
    except ConfigurationError:
        return None
    cursor = await conn.execute(
        "SELECT number, org_id, agent_id, carrier FROM numbers WHERE number = %s", (number,))
    row = await cursor.fetchone()
    return None if row is None else PhoneNumber(number=row[0], org_id=row[1], agent_id=row[2],
                                                carrier=row[3])


async def list_numbers(conn: AsyncConnection[Any], org_id: str) -> list[PhoneNumber]:
    """An org's numbers."""
    cursor = await conn.execute(
        "SELECT number, org_id, agent_id, carrier FROM numbers WHERE org_id = %s ORDER BY 1",
        (org_id,))
    return [PhoneNumber(number=r[0], org_id=r[1], agent_id=r[2], carrier=r[3])
            for r in await cursor.fetchall()]


async def create_api_key(conn: AsyncConnection[Any], org_id: str, *, name: str = "",
                         scopes: list[str] | None = None, actor: str = "") -> tuple[ApiKey, str]:
    """Issue a key; returns it with the full secret token, which is never stored or shown again.

    Without ``scopes`` the key gets :data:`DEFAULT_SCOPES`.
    """
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    scopes = scopes or list(DEFAULT_SCOPES)
    async with conn.transaction():
        await _require_org(conn, org_id)
        await conn.execute(
            "INSERT INTO api_keys (key_id, org_id, name, secret_hash, scopes) "
            "VALUES (%s, %s, %s, %s, %s)", (key_id, org_id, name, _hash(secret), scopes))
        await emit(conn, ev.ApiKeyCreated(org_id=org_id, key_id=key_id, name=name,
                                          scopes=scopes, actor=actor))
    return (ApiKey(key_id=key_id, org_id=org_id, name=name, scopes=scopes),
            f"{API_KEY_PREFIX}_{key_id}_{secret}")


async def verify_api_key(conn: AsyncConnection[Any], token: str) -> ApiKey | None:
    """The live key a presented token belongs to, or None (constant-time comparison).

    Keys are printable ASCII; anything else (a header's undecodable bytes, which aiohttp reads
    as surrogates, or a NUL) is no key, and Postgres could not even take it as a parameter.
    """
    if not (token.isascii() and token.isprintable()):
        return None
    prefix, _, rest = token.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != API_KEY_PREFIX or not key_id or not secret:
        return None
    cursor = await conn.execute(
        "SELECT key_id, org_id, name, scopes, created_at, secret_hash FROM api_keys "
        "WHERE key_id = %s AND revoked_at IS NULL", (key_id,))
    row = await cursor.fetchone()
    if row is None or not hmac.compare_digest(bytes(row[5]), _hash(secret)):
        return None
    return ApiKey(key_id=row[0], org_id=row[1], name=row[2], scopes=list(row[3]),
                  created_at=row[4])


async def revoke_api_key(conn: AsyncConnection[Any], org_id: str, key_id: str, *,
                         actor: str = "") -> None:
    """Revoke a key of the org."""
    async with conn.transaction():
        cursor = await conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = %s AND org_id = %s "
            "AND revoked_at IS NULL RETURNING key_id", (key_id, org_id))
        if await cursor.fetchone() is None:
            raise ConfigurationError(f"no live key {key_id!r} in org {org_id!r}")
        await emit(conn, ev.ApiKeyRevoked(org_id=org_id, key_id=key_id, actor=actor))


def _hash(secret: str) -> bytes:
    # The secret is 256 random bits, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(secret.encode()).digest()


async def _require_org(conn: AsyncConnection[Any], org_id: str) -> None:
    cursor = await conn.execute("SELECT 1 FROM orgs WHERE org_id = %s", (org_id,))
    if await cursor.fetchone() is None:
        raise ConfigurationError(f"org {org_id!r} does not exist")


def _agent(row: Any) -> Agent:
    return Agent(agent_id=row[0], org_id=row[1], name=row[2],
                 settings=msgspec.convert(row[3], AgentSettings), created_at=row[4],
                 updated_at=row[5])
