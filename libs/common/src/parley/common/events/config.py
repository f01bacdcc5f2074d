"""Configuration events: the audit trail of who changed what.

Configuration lives in ordinary tables; each change writes one of these through an outbox row in
the same transaction, so there is no dual write.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .envelope import AgentEvent, OrgEvent


class OrgCreated(OrgEvent, frozen=True, kw_only=True, tag="org.created"):
    """A tenant was created."""

    name: str
    actor: str = ""


class AgentCreated(AgentEvent, frozen=True, kw_only=True, tag="agent.created"):
    """An agent was created."""

    name: str
    settings: dict[str, Any] = msgspec.field(default_factory=dict)
    actor: str = ""


class AgentUpdated(AgentEvent, frozen=True, kw_only=True, tag="agent.updated"):
    """An agent's settings changed; ``changes`` holds the new values."""

    changes: dict[str, Any] = msgspec.field(default_factory=dict)
    actor: str = ""


class AgentDeleted(AgentEvent, frozen=True, kw_only=True, tag="agent.deleted"):
    """An agent was deleted."""

    actor: str = ""


class ApiKeyCreated(OrgEvent, frozen=True, kw_only=True, tag="api_key.created"):
    """An API key was issued (its secret is never in an event)."""

    key_id: str
    name: str = ""
    scopes: list[str] = msgspec.field(default_factory=list)
    actor: str = ""


class ApiKeyRevoked(OrgEvent, frozen=True, kw_only=True, tag="api_key.revoked"):
    """An API key was revoked."""

    key_id: str
    actor: str = ""


class NumberAssigned(OrgEvent, frozen=True, kw_only=True, tag="number.assigned"):
    """A phone number now routes to an agent."""

    number: str
    agent_id: str
    carrier: str = "twilio"
    actor: str = ""


class KnowledgeIngested(AgentEvent, frozen=True, kw_only=True, tag="knowledge.ingested"):
    """A document was chunked into the agent's knowledge."""

    document_id: str
    source: str
    chunks: int
    actor: str = ""


class SecuritySignatureRejected(OrgEvent, frozen=True, kw_only=True,
                                tag="security.signature_rejected"):
    """A webhook or socket arrived with a bad or missing signature and was refused.

    ``count`` is how many refused requests the event stands for. The gateway audits the first
    refusal from a source for a reason at once (``count`` 1) and folds the ones that follow
    within its interval into one more event at the interval's end, whose ``count`` says how
    many it folded; ``path`` is then that of the first folded request. Requests are folded
    only with others claiming the same called number, whose org is ``org_id``, so an org's
    count is of refusals aimed at its own numbers; ``org_id`` is ``unknown`` for a number no
    org has, and for the refusals folded together once the gateway tracks all it can (their
    ``reason`` says so). Events recorded before this field existed decode as 1, which is what
    each of them stood for.
    """

    path: str
    carrier: str
    remote: str = ""
    reason: str = ""
    count: int = 1
