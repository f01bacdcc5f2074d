"""JSON logs, one object per line, with call context, trace ids and secrets redacted.

``configure_logging`` installs the formatter on the root logger once at start-up. Code then logs
with the standard library and wraps work in ``log_context(call_id=..., org_id=...)`` so every line
inside carries those fields, including lines from concurrent tasks, which each see their own.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

from opentelemetry import trace

__all__ = ["JsonFormatter", "configure_logging", "log_context", "redact"]

_context: ContextVar[Mapping[str, Any]] = ContextVar(
    "parley_log_context", default=MappingProxyType({})
)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_SECRET_WORDS = frozenset({"password", "passwd", "secret", "token", "authorization", "signature"})
_SECRET_IN_TEXT = re.compile(
    r"(?P<key>\b\w*(?:password|passwd|secret|token|api[_-]?key|authorization|signature))"
    r"(?P<sep>['\"]?\s*[:=]\s*['\"]?)(?P<scheme>(?:bearer|basic)\s+)?(?P<value>[^\s'\",;&}]+)",
    re.IGNORECASE,
)
_URL_PASSWORD = re.compile(r"(?P<prefix>\b[a-zA-Z][\w+.-]*://[^:/@\s]*:)[^@\s/]+@")
MASK = "***"


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (e.g. ``call_id``, ``org_id``) to every log line emitted inside the block."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def redact(value: Any, key: str = "") -> Any:
    """Return ``value`` with secrets masked: secret-looking keys and URL passwords in text."""
    if key and _is_secret_key(key):
        return MASK
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, Mapping):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(item) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    # Anything else would be rendered with str(); a repr can embed a DSN, so redact that text.
    return _redact_text(str(value))


def _is_secret_key(key: str) -> bool:
    # Split camelCase and separators into words so "input_tokens" (a count) is not masked
    # while "access_token", "apiKey" and "X-Signature" are.
    parts = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower())
    joined = "_".join(parts)
    return bool(_SECRET_WORDS.intersection(parts)) or "apikey" in parts or "api_key" in joined


def _redact_text(text: str) -> str:
    text = _URL_PASSWORD.sub(rf"\g<prefix>{MASK}@", text)
    return _SECRET_IN_TEXT.sub(rf"\g<key>\g<sep>\g<scheme>{MASK}", text)


class JsonFormatter(logging.Formatter):
    """Format records as single-line JSON objects for the log pipeline."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one JSON line."""
        created = datetime.fromtimestamp(record.created, tz=UTC)
        entry: dict[str, Any] = {
            "ts": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_context.get())
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRIBUTES and name not in entry:
                entry[name] = value
        return json.dumps(redact(entry), default=str, ensure_ascii=False)


CHATTY_LIBRARIES = ("httpx", "httpx2", "httpcore")  # quiet below WARNING unless level is DEBUG


class _ParleyHandler(logging.StreamHandler[TextIO]):
    """Marks the handler we own so reconfiguring replaces it instead of stacking another."""


def configure_logging(
    service: str, *, level: str = "INFO", stream: TextIO | None = None
) -> logging.Handler:
    """Send root-logger records as JSON lines to ``stream`` (stderr by default).

    Calling it again replaces the handler it installed before; other handlers (e.g. pytest's
    capture) are left alone. Returns the installed handler.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ParleyHandler):
            root.removeHandler(handler)
            handler.close()
    handler = _ParleyHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter(service))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # HTTP clients inside vendor SDKs log a line per request at INFO (the anthropic SDK's
    # "HTTP Request: POST …/v1/messages 200 OK"): one per LLM turn, 2 % of the brain's CPU.
    chatty = logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(chatty)
    return handler
