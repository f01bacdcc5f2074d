"""The demo org and its receptionist, created idempotently before the services start.

Run again, it updates rather than duplicates: the agent's settings are rewritten, the number is
re-assigned, the ``book_appointment`` tool is replaced (its URL has this run's port) and the
knowledge file is re-ingested under the same name, which keeps the stored copy if it is unchanged
and replaces it otherwise.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import msgspec
import psycopg

from parley.common import configuration as cfg
from parley.common.tools.repository import add_tool
from parley.devkit.infra import InfraError

ORG_ID = "bright-smile"
ORG_NAME = "Bright Smile Dental"
AGENT_ID = "receptionist"
AGENT_NUMBER = "+14155550100"
CALLER_NUMBER = "+14155550123"
KNOWLEDGE_FILE = "clinic.md"

SETTINGS = cfg.AgentSettings(
    prompt=("You are the friendly receptionist of Bright Smile Dental. Answer from the clinic's "
            "knowledge only, in one or two short sentences. Book appointments with the "
            "book_appointment tool. When the caller says goodbye, say goodbye and end the call."),
    greeting="Thanks for calling Bright Smile Dental! How can I help you today?",
    record=False,  # the demo writes its own stereo WAV; there is no carrier to record
)


def book_appointment(url: str) -> dict[str, Any]:
    """The tool definition. Not sensitive: the demo runs with nobody to approve it."""
    return {
        "name": "book_appointment", "description": "Book a dental appointment",
        "url": url, "method": "POST", "sensitive": False, "timeout_s": 5,
        "parameters": {"type": "object", "required": ["day"], "properties": {
            "day": {"type": "string", "description": "day of the appointment"},
            "time": {"type": "string", "description": "time of the appointment"}}},
    }


def knowledge_text() -> bytes:
    """The clinic's knowledge file, shipped inside this package."""
    return resources.files(__package__).joinpath(KNOWLEDGE_FILE).read_bytes()


async def set_up_clinic(database_url: str, *, booking_url: str) -> None:
    """Create or refresh the demo org, agent, number, tool and knowledge."""
    try:
        from parley.brain.knowledge import ingest
    except ImportError as exc:  # the devkit does not depend on the brain; the workspace has it
        raise InfraError("parley demo needs the parley-brain package installed") from exc
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        try:
            await cfg.create_org(conn, ORG_ID, ORG_NAME, actor="demo")
        except cfg.ConfigurationError:
            pass  # created by an earlier run
        # The booking endpoint is on loopback, which tools refuse unless the org allows it.
        await conn.execute("UPDATE orgs SET allow_private_tool_targets = true WHERE org_id = %s",
                           (ORG_ID,))
        if await cfg.get_agent(conn, AGENT_ID, org_id=ORG_ID) is None:
            await cfg.create_agent(conn, ORG_ID, "Receptionist", SETTINGS, agent_id=AGENT_ID,
                                   actor="demo")
        else:
            await cfg.update_agent(conn, ORG_ID, AGENT_ID, msgspec.to_builtins(SETTINGS),
                                   actor="demo")
        await cfg.assign_number(conn, ORG_ID, AGENT_NUMBER, AGENT_ID, actor="demo")
        await add_tool(conn, ORG_ID, AGENT_ID, book_appointment(booking_url), replace=True)
        await ingest(conn, ORG_ID, AGENT_ID, KNOWLEDGE_FILE, knowledge_text(), actor="demo")
