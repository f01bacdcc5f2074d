"""What a tool is: the spec offered to the model, and how an HTTP tool reaches its endpoint.

A :class:`ToolSpec` (name, description, JSON Schema of the arguments) is all the model sees. An
:class:`HttpTool` adds where and how to call: method and URL (``{argument}`` placeholders are
filled from the arguments, URL-quoted), header templates whose ``{secret:<name>}`` placeholders
are resolved from the org's secrets at call time, a timeout, a retry policy, whether a human
must approve each call, and how much of the response the model may read.

Retries are for transient failures only — a 5xx answer, a timeout, a connection error — and,
because a timed-out POST may still have taken effect, they happen for idempotent methods (GET,
HEAD, OPTIONS, PUT, DELETE) unless the tool's author sets ``retry.retry_unsafe_methods`` for
an endpoint known to be idempotent. Every request carries ``Idempotency-Key: <tool_call_id>``
so endpoints that support it can deduplicate.

A parameters schema is self-contained: each ``$ref`` must resolve inside it (``#/$defs/…``, an
anchor, an embedded ``$id``). Nothing is ever fetched — a remote ``$ref`` would let a tool's
author make the tools service request any URL — so a definition whose refs point elsewhere is
refused, and validation of arguments never leaves the schema.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Literal

import jsonschema  # type: ignore[import-untyped]
import msgspec
import referencing
import referencing.jsonschema
from referencing.exceptions import Unresolvable

from .patterns import bounded

HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}(?!\n)$"  # (?!\n): $ also matches before a final newline
ToolName = Annotated[str, msgspec.Meta(pattern=TOOL_NAME_PATTERN)]
SECRET_PLACEHOLDER = re.compile(r"\{secret:([A-Za-z0-9_.-]{1,128})\}")
EMPTY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
# No documents and no retrieve function: a $ref outside the schema itself is Unresolvable
# (jsonschema's default registry would fetch it over the network).
NOTHING_REMOTE: referencing.Registry[Any] = referencing.Registry()


class ToolDefinitionError(ValueError):
    """A tool definition that cannot be used (bad schema, URL, name…)."""


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What the model is offered: ``name``, ``description`` and ``parameters`` (JSON Schema).

    The shape maps one-to-one onto LLM tool APIs (Anthropic ``input_schema``, OpenAI
    ``function.parameters``).
    """

    name: ToolName
    description: str
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: dict(EMPTY_OBJECT_SCHEMA))
    sensitive: bool = False
    builtin: bool = False


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How often a transient failure is retried, with exponential backoff between attempts."""

    attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    backoff_initial_s: Annotated[float, msgspec.Meta(ge=0, le=30)] = 0.2
    backoff_max_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 2.0
    retry_unsafe_methods: bool = False


class HttpTool(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An agent's tool that calls an HTTP endpoint of the customer."""

    name: ToolName
    description: str
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: dict(EMPTY_OBJECT_SCHEMA))
    method: HttpMethod = "POST"
    url: str
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    sensitive: bool = False
    approval_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 60.0
    max_response_bytes: Annotated[int, msgspec.Meta(ge=64, le=10_000_000)] = 16_384

    def spec(self) -> ToolSpec:
        """The part offered to the model."""
        return ToolSpec(name=self.name, description=self.description,
                        parameters=self.parameters, sensitive=self.sensitive)

    def secret_names(self) -> set[str]:
        """Names of the org secrets the header templates refer to."""
        return {name for value in self.headers.values()
                for name in SECRET_PLACEHOLDER.findall(value)}

    def worst_case_s(self) -> float:
        """An upper bound on one call's duration: every attempt timing out, full backoff."""
        r = self.retry
        return r.attempts * self.timeout_s + (r.attempts - 1) * r.backoff_max_s

    def may_retry(self) -> bool:
        """Whether transient failures of this tool's method are retried."""
        return self.method in IDEMPOTENT_METHODS or self.retry.retry_unsafe_methods

    def fingerprint(self) -> str:
        """A stable hash of what decides the request this tool sends (hex SHA-256).

        A human approves a sensitive call as the tool is defined when they are asked; the call
        runs only if this is unchanged by then. It covers the name, method, URL and header
        templates (where the call goes and what it carries), the parameters schema (which
        arguments are let into the URL and body), the sensitivity, and how often a request may
        be sent again (``retry.attempts``, ``retry.retry_unsafe_methods``). Not the
        description, timeouts, backoff, approval deadline or response cap: they change nothing
        sent. Keys are sorted, so the order jsonb stores them in does not matter; secret
        values are not part of it (a rotated token is the same call).
        """
        decisive = {"name": self.name, "method": self.method, "url": self.url,
                    "headers": self.headers, "parameters": self.parameters,
                    "sensitive": self.sensitive, "retry_attempts": self.retry.attempts,
                    "retry_unsafe_methods": self.retry.retry_unsafe_methods}
        return hashlib.sha256(msgspec.json.encode(decisive, order="sorted")).hexdigest()


def parse_http_tool(data: dict[str, Any] | bytes) -> HttpTool:
    """Validate a definition (structure, JSON Schema, URL); raise ToolDefinitionError."""
    try:
        tool = (msgspec.json.decode(data, type=HttpTool) if isinstance(data, bytes)
                else msgspec.convert(data, HttpTool))
    except msgspec.ValidationError as exc:
        raise ToolDefinitionError(f"invalid tool definition: {exc}") from exc
    check_schema(tool.parameters)
    if not tool.url.startswith(("http://", "https://")):
        raise ToolDefinitionError(f"tool url must be http(s), not {tool.url!r}")
    _check_headers(tool.headers)
    return tool


HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token (fullmatch)
HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but tab


def _check_headers(headers: dict[str, str]) -> None:
    """Refuse header templates no request could carry (at definition, not at every call)."""
    seen: set[str] = set()
    for name, value in headers.items():
        if not HEADER_NAME.fullmatch(name):
            raise ToolDefinitionError(f"invalid header name {name!r}")
        if HEADER_VALUE_FORBIDDEN.search(value):
            raise ToolDefinitionError(f"header {name!r}: control characters are not allowed")
        if name.lower() in seen:
            raise ToolDefinitionError(f"header {name!r} is given twice (names ignore case)")
        seen.add(name.lower())


def check_schema(schema: dict[str, Any]) -> None:
    """Raise ToolDefinitionError unless ``schema`` is a valid, self-contained object schema."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ToolDefinitionError(f"invalid parameters schema: {exc.message}") from exc
    if schema.get("type") != "object":
        raise ToolDefinitionError('the parameters schema must have "type": "object"')
    _check_references(schema)


def _check_references(schema: dict[str, Any]) -> None:
    """Resolve every ``$ref`` / ``$dynamicRef`` of the schema and its subschemas, locally."""
    specification = referencing.jsonschema.specification_with(
        schema.get("$schema", ""), default=referencing.jsonschema.DRAFT202012)
    root = specification.create_resource(schema)
    pending = [(root, NOTHING_REMOTE.resolver_with_root(root))]
    while pending:
        resource, resolver = pending.pop()
        contents = resource.contents
        for keyword in ("$ref", "$dynamicRef"):
            reference = contents.get(keyword) if isinstance(contents, dict) else None
            if not isinstance(reference, str):
                continue
            try:
                resolver.lookup(reference)
            except Unresolvable as exc:
                raise ToolDefinitionError(
                    f"invalid parameters schema: {keyword} {reference!r} does not resolve "
                    "within the schema (remote references are not fetched)") from exc
        pending.extend((sub, resolver.in_subresource(sub)) for sub in resource.subresources())


def argument_errors(schema: dict[str, Any], arguments: dict[str, Any]) -> list[str]:
    """Every way ``arguments`` break ``schema``, phrased for the model; empty when valid.

    Raise ToolDefinitionError when the schema itself cannot be applied — a ``$ref`` that does
    not resolve (a definition stored before :func:`check_schema` refused those), or refs that
    loop without consuming the arguments.
    """
    validator = bounded(jsonschema.validators.validator_for(schema))(
        schema, registry=NOTHING_REMOTE)
    try:
        errors = sorted(validator.iter_errors(arguments), key=lambda e: list(e.absolute_path))
    except Unresolvable as exc:
        raise ToolDefinitionError(f"a $ref does not resolve: {exc}") from exc
    except RecursionError as exc:
        raise ToolDefinitionError("its $refs loop endlessly") from exc
    return [(f"{'/'.join(str(p) for p in e.absolute_path)}: " if e.absolute_path else "")
            + e.message for e in errors]
