"""Configuration (orgs, agents, numbers, API keys) with config events through an outbox."""

from .models import Agent, AgentSettings, ApiKey, Org, PhoneNumber
from .outbox import OutboxRelay, emit
from .repository import (
    ConfigurationError,
    assign_number,
    create_agent,
    create_api_key,
    create_org,
    find_number,
    get_agent,
    list_agents,
    list_numbers,
    list_orgs,
    normalize_e164,
    revoke_api_key,
    update_agent,
    verify_api_key,
)

__all__ = [
    "Agent", "AgentSettings", "ApiKey", "ConfigurationError", "Org", "OutboxRelay",
    "PhoneNumber", "assign_number", "create_agent", "create_api_key", "create_org", "emit",
    "find_number", "get_agent", "list_agents", "list_numbers", "list_orgs", "normalize_e164",
    "revoke_api_key", "update_agent", "verify_api_key",
]
