"""Running an HTTP tool: fill the request, call with retries, read a bounded response.

Retried (when the tool's method and policy allow): 5xx, timeouts, connection errors and 429
(rate limited). A 429 or 503 with ``Retry-After`` waits at least that long before the next
attempt, if it is within the policy's ``backoff_max_s``; asking for longer ends the call at once
with an error saying so (the caller is on the phone: the model tells them, or tries later).

The caller passes the session to use — the guarded one (public targets only, see
:mod:`parley.tools.target_guard`) or, for orgs that allow private targets, the open one — and
the org's secrets. Secret values go into request headers only: they are never logged, never
part of an error message and never part of an event.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import msgspec
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    wait_exponential,
)

from parley.common.tools.definitions import (
    HEADER_VALUE_FORBIDDEN,
    SECRET_PLACEHOLDER,
    HttpTool,
)

from .outcomes import ToolError, ToolOutcome, map_strings
from .target_guard import TargetNotAllowed, check_url, refused_target

log = logging.getLogger(__name__)

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
ERROR_BODY_CHARS = 500
DOT_SEGMENTS = frozenset({".", ".."})
TEXT_TYPES = frozenset({"application/json", "application/xml", "application/javascript",
                        "application/x-www-form-urlencoded"})
# Every reader of a result (the outcome's NUL scrub and redaction, event readers) recurses
# through it: JSON nested deeper than this is passed on as text.
MAX_RESULT_DEPTH = 64
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class _Transient(Exception):
    """A failure worth retrying (5xx, 429, timeout, connection error)."""

    def __init__(self, error: str, *, retry_after_s: float = 0.0) -> None:
        super().__init__(error)
        self.error = error
        self.retry_after_s = retry_after_s  # the endpoint's Retry-After (0: none)


def retry_after_s(value: str | None, *, now: float | None = None) -> float:
    """A ``Retry-After`` header in seconds (delta-seconds or an HTTP date); 0 if none or bad."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isascii() and value.isdigit():  # isdigit alone takes "²", which float refuses
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


async def run_http_tool(session: aiohttp.ClientSession, tool: HttpTool,
                        arguments: dict[str, Any], *, secrets: Mapping[str, str],
                        tool_call_id: str, allow_private: bool = False) -> ToolOutcome:
    """Call the tool's endpoint; never raises for anything the endpoint or network does.

    Unless ``allow_private``, an IP-literal target must be public (host names are checked by
    the guarded session's resolver, which ``session`` must then be).
    """
    used = [secrets[name] for name in tool.secret_names() if name in secrets]
    outcome = await _run(session, tool, arguments, secrets, tool_call_id, allow_private,
                         _forms(used))
    return redact(outcome, used)


async def _run(session: aiohttp.ClientSession, tool: HttpTool, arguments: dict[str, Any],
               secrets: Mapping[str, str], tool_call_id: str,
               allow_private: bool, hidden: list[str]) -> ToolOutcome:
    try:
        url, remaining = fill_url(tool.url, arguments)
        check_url(url, private_ok=allow_private)
        headers = render_headers(tool.headers, secrets)
    except ToolError as exc:
        return exc.outcome()
    except TargetNotAllowed as exc:
        return ToolOutcome.failure(str(exc))
    if not any(name.lower() == "idempotency-key" for name in headers):  # names ignore case
        headers["Idempotency-Key"] = tool_call_id
    body = remaining if tool.method in BODY_METHODS else None
    params = None if tool.method in BODY_METHODS else _query(remaining)
    attempts = tool.retry.attempts if tool.may_retry() else 1
    backoff = wait_exponential(multiplier=tool.retry.backoff_initial_s,
                               max=tool.retry.backoff_max_s)

    def wait(state: RetryCallState) -> float:
        return max(backoff(state), _asked_wait_s(state))

    def stop(state: RetryCallState) -> bool:
        # Out of attempts, or asked to wait longer than the policy would (a rate limit reset
        # at the top of the minute): no point holding the turn for it.
        return state.attempt_number >= attempts or (
            _asked_wait_s(state) > tool.retry.backoff_max_s)

    retrying = AsyncRetrying(stop=stop, wait=wait, retry=retry_if_exception_type(_Transient),
                             reraise=False)
    try:
        async for attempt in retrying:
            with attempt:
                return await _attempt(session, tool, url, headers, params, body, hidden)
    except RetryError as exc:
        last = exc.last_attempt.exception()
        error = last.error if isinstance(last, _Transient) else str(last)
        tried = exc.last_attempt.attempt_number
        suffix = f" (after {tried} attempts)" if tried > 1 else ""
        if isinstance(last, _Transient) and last.retry_after_s:
            suffix += f"; it asks to retry after {last.retry_after_s:g}s"
        return ToolOutcome.failure(error + suffix, retryable=True)
    except ToolError as exc:
        return exc.outcome()
    raise AssertionError("unreachable: tenacity either returns, retries or raises")


async def _attempt(session: aiohttp.ClientSession, tool: HttpTool, url: str,
                   headers: dict[str, str], params: dict[str, str] | None,
                   body: dict[str, Any] | None, hidden: list[str]) -> ToolOutcome:
    # A secret the endpoint echoes must be redacted before the body is cut (error snippet,
    # max_response_bytes), or the part before the cut would survive: read enough to see whole
    # any secret that starts before the cut.
    margin = max((len(form.encode()) for form in hidden), default=0)
    try:
        async with session.request(
                tool.method, url, headers=headers, params=params, json=body,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=tool.timeout_s)) as response:
            raw, more = await _read_bounded(response, tool.max_response_bytes + margin)
            status = response.status
            content_type = response.content_type
            charset = response.charset  # from Content-Type, None if not given
            asked = retry_after_s(response.headers.get("Retry-After"))
    except TimeoutError as exc:
        raise _Transient(f"{tool.name} timed out after {tool.timeout_s:g}s") from exc
    except aiohttp.ClientError as exc:
        refused = refused_target(exc)
        if refused is not None:
            raise ToolError(str(refused)) from None
        raise _Transient(f"could not reach {tool.name}: {type(exc).__name__}") from exc
    if status >= 500 or status == 429:
        raise _Transient(f"{tool.name} answered {status}: "
                         f"{_snippet(raw, hidden, charset, cut=more)}", retry_after_s=asked)
    if 300 <= status < 400:
        raise ToolError(f"{tool.name} answered a redirect ({status}); redirects are not followed")
    if status >= 400:
        raise ToolError(f"{tool.name} answered {status}: "
                        f"{_snippet(raw, hidden, charset, cut=more)}")
    limit = tool.max_response_bytes
    return _result(raw, more or len(raw) > limit, content_type, limit, hidden, charset)


def _asked_wait_s(state: RetryCallState) -> float:
    """The wait the failed attempt's endpoint asked for (Retry-After), 0 if none."""
    failed = state.outcome.exception() if state.outcome is not None else None
    return failed.retry_after_s if isinstance(failed, _Transient) else 0.0


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the body (never buffering more), and whether there was more."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await response.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    data = b"".join(chunks)
    return data[:limit], len(data) > limit


def _result(raw: bytes, truncated: bool, content_type: str, limit: int,
            hidden: list[str], charset: str | None = None) -> ToolOutcome:
    if _is_binary(raw, content_type):  # an image, a PDF…: nothing the model can read
        return ToolOutcome.success(
            {"binary": True, "content_type": content_type, "bytes": min(len(raw), limit)},
            truncated=truncated)
    text = _decode(raw, charset)
    if truncated:
        partial = _redact_text(text, hidden).encode()[:limit].decode("utf-8", errors="ignore")
        return ToolOutcome.success(
            {"partial_body": _without_secret_prefix(partial, hidden),
             "note": f"The response was longer than {limit} bytes and was cut off there; "
                     "ask for less (filters, fewer fields) if you need the rest."},
            truncated=True)
    if not raw.strip():
        return ToolOutcome.success({"ok": True})
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            pass
        else:
            if _depth_at_most(parsed, MAX_RESULT_DEPTH):
                return ToolOutcome.success(map_strings(parsed, _whole_characters))
    return ToolOutcome.success({"text": text})


def _whole_characters(text: str) -> str:
    r"""``text`` with each half of a surrogate pair replaced by U+FFFD.

    JSON may escape one ("\ud83d": JavaScript cut an emoji in half), and json reads it into a
    string that UTF-8, and so no event, can carry.
    """
    return _LONE_SURROGATE.sub("\ufffd", text)


def _decode(raw: bytes, charset: str | None) -> str:
    """The body as text in its declared charset (a legacy CRM's ISO-8859-1), else UTF-8.

    Half a surrogate pair that the charset can write (UTF-7's ``+2D0-``) is U+FFFD: no event
    could carry it.
    """
    try:
        return _whole_characters(raw.decode(charset or "utf-8", errors="replace"))
    except (LookupError, UnicodeError):  # a charset Python does not know, or cannot use so
        return raw.decode("utf-8", errors="replace")  # ("idna", "undefined")


def _depth_at_most(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and objects at most ``limit`` levels deep (no recursion)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return True


def _is_binary(raw: bytes, content_type: str) -> bool:
    """Whether a body is not text: not of a text type and not UTF-8 without NUL."""
    if content_type.startswith("text/") or content_type in TEXT_TYPES or content_type.endswith(
            ("+json", "+xml")):
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(raw) - 3:  # not merely a character cut at the end of a partial body
            return True
    return b"\x00" in raw


def fill_url(template: str, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Substitute ``{name}`` placeholders (URL-quoted); return the URL and unused arguments.

    A value that would make a path segment ``.`` or ``..`` is refused: the URL library removes
    dot segments (even ``%2E%2E``), so ``..`` would climb out of the templated path (e.g.
    ``/v1/customers/{id}/orders`` → ``/v1/orders``).
    """
    remaining = dict(arguments)
    url = template
    path = template.split("?", 1)[0]
    for name in list(arguments):
        placeholder = "{" + name + "}"
        if placeholder in url:
            value = str(remaining.pop(name))
            if placeholder in path and unquote(value) in DOT_SEGMENTS:
                raise ToolError(f"the argument {name!r} cannot be {value!r}: it is part of the "
                                "URL path; pass the actual value")
            url = url.replace(placeholder, quote(value, safe=""))
    if "{" in url.split("?", 1)[0] and "}" in url:
        raise ToolError("missing arguments for the tool's URL placeholders")
    filled = url.split("?", 1)[0].split("/")
    for before, after in zip(path.split("/"), filled, strict=False):
        if "{" in before and unquote(after) in DOT_SEGMENTS:
            raise ToolError("the arguments would make a URL path segment "
                            f"{unquote(after)!r}; pass the actual values")
    return url, remaining


def render_headers(templates: Mapping[str, str], secrets: Mapping[str, str]) -> dict[str, str]:
    """Headers with ``{secret:<name>}`` replaced by the org's secret values."""

    def substitute(match: Any) -> str:
        name = match.group(1)
        if name not in secrets:
            raise ToolError(f"the tool needs the secret {name!r}, which the org has not set")
        if HEADER_VALUE_FORBIDDEN.search(secrets[name]):  # aiohttp would refuse the header
            raise ToolError(f"the org's secret {name!r} contains a line break or another "
                            "control character, which a header cannot carry; the org must "
                            "set it again without it")
        return secrets[name]

    return {key: SECRET_PLACEHOLDER.sub(substitute, value) for key, value in templates.items()}


def _query(arguments: dict[str, Any]) -> dict[str, str]:
    return {key: value if isinstance(value, str) else json.dumps(value)
            for key, value in arguments.items() if value is not None}


def _snippet(raw: bytes, hidden: list[str], charset: str | None = None, *,
             cut: bool = False) -> str:
    text = _redact_text(_decode(raw, charset), hidden)
    if cut:  # read up to a cap: a secret may begin in its last bytes, the rest unread
        text = _without_secret_prefix(text.rstrip("\ufffd"), hidden).strip() + "…"
    text = text.strip()
    if len(text) <= ERROR_BODY_CHARS:
        return text
    return _without_secret_prefix(text[:ERROR_BODY_CHARS], hidden) + "…"


def _forms(values: Iterable[str]) -> list[str]:
    r"""The ways a secret worth redacting (4+ characters) can appear in a body, longest first.

    As is, and as a JSON string's contents the way common encoders write it: Python's (ASCII
    or not), PHP's (every ``/`` as ``\/``) and Go's (``<``, ``>``, ``&`` as ``\u003c``…).
    An error snippet or a cut body is passed on as text, never parsed, so each must be matched.
    A secret set with blanks around it (pasted so) reaches the endpoint without them, as a
    header value's leading and trailing blanks are not part of it: that form is matched too.
    """
    forms = {form for secret in values for value in {secret, secret.strip(" \t")}
             if len(value) >= 4
             for quoted in (json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1])
             for form in (value, quoted, quoted.replace("/", "\\/"), _go_escaped(quoted))}
    return sorted(forms, key=len, reverse=True)


def _go_escaped(quoted: str) -> str:
    """A JSON string's contents as Go's encoding/json writes them (HTML-safe)."""
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        quoted = quoted.replace(char, escape)
    return quoted


def _redact_text(text: str, hidden: list[str]) -> str:
    for form in hidden:
        text = text.replace(form, "[redacted]")
    return text


def _without_secret_prefix(cut: str, hidden: list[str]) -> str:
    """A cut text without a trailing beginning of a secret (the rest fell beyond the cut)."""
    shortened = True
    while shortened:
        shortened = False
        for form in hidden:
            length = next((n for n in range(len(form) - 1, 0, -1) if cut.endswith(form[:n])), 0)
            if length:
                cut, shortened = cut[:-length], True
    return cut


def redact(outcome: ToolOutcome, values: Iterable[str]) -> ToolOutcome:
    """The outcome with any secret value an endpoint echoed back replaced by ``[redacted]``.

    Only strings (values and keys) of the result are touched: a secret made of digits must not
    rewrite a number of the result.
    """
    hidden = _forms(values)
    if not hidden:
        return outcome
    return msgspec.structs.replace(
        outcome, result=map_strings(outcome.result, lambda text: _redact_text(text, hidden)),
        error=_redact_text(outcome.error, hidden))
