"""X-Twilio-Signature on every Twilio webhook and WebSocket upgrade.

Checked with the twilio SDK's ``RequestValidator`` over the URL Twilio requested — the
configured public base URL plus the request's raw path and query, since the server may sit
behind a TLS proxy and never sees that URL itself. WebSocket upgrades are signed over the
``wss://`` URL with no parameters and are checked before upgrading. A bad or missing signature
is answered 403 (problem JSON), never processed, counted, and audited as
``security.signature_rejected`` — at most one event per source, reason and called number per
interval, folding the rest into its count (:mod:`parley.gateway.signature_audit`).

By default Twilio signs with the account's Auth Token (HMAC-SHA1). A request that matched a
Webhook Rule whose Setting signs with a SharedKey carries ``X-Twilio-Webhooks-Signature-Settings:
key=<SharedKey sid>,algorithm=<HMAC_SHA1|HMAC_SHA256>``: it is checked with the SharedKey's
secret (``twilio_webhook_shared_key_secret``) and that algorithm instead, and refused when no
secret is configured.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web
from multidict import MultiDict, MultiDictProxy
from twilio.request_validator import (
    HMAC_SHA1,
    HMAC_SHA256,
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)

from parley.common.problems import Problem

from ..keys import CONFIG, METRICS, SIGNATURE_AUDIT
from ..signature_audit import Refusal

log = logging.getLogger(__name__)


def signed_url(request: web.Request, *, websocket: bool = False) -> str:
    """The URL Twilio signed for this request: public base + raw path and query."""
    config = request.app[CONFIG]
    base = config.public_ws_base if websocket else config.public_base
    return base + request.raw_path


async def verify_twilio(request: web.Request, params: Mapping[str, str] | None = None, *,
                        websocket: bool = False) -> None:
    """Return if the request is signed by our Twilio account; raise a 403 Problem otherwise."""
    config = request.app[CONFIG]
    signature = request.headers.get(SIGNATURE_HEADER, "")
    settings = request.headers.get(SIGNATURE_SETTINGS_HEADER, "")
    algorithm = get_signature_algorithm(settings)
    if settings:  # signed by a Webhook Rule's SharedKey, not the Auth Token
        secret = config.twilio_webhook_shared_key_secret
        missing_secret = ("signed with a Twilio webhook shared key, and no "
                          "twilio_webhook_shared_key_secret is configured")
    else:
        secret, missing_secret = config.twilio_auth_token, "no Twilio auth token configured"
    if not secret:
        reason = missing_secret
    elif not signature:
        reason = "missing X-Twilio-Signature"
    elif algorithm.upper() not in (HMAC_SHA1, HMAC_SHA256):
        reason = f"unsupported signature algorithm {algorithm[:40]!r}"
    else:
        validator = RequestValidator(secret)
        url = signed_url(request, websocket=websocket)
        if validator.validate(url, params or {}, signature, algorithm):
            return
        reason = "invalid X-Twilio-Signature"
    await reject(request, reason, params)
    raise Problem(403, "Forbidden", reason, kind="invalid-signature")


async def reject(request: web.Request, reason: str,
                 params: Mapping[str, str] | None, *, carrier: str = "twilio") -> None:
    """Count a refused request and audit it, bounded (never raises: the 403 matters more)."""
    route = request.match_info.route.resource
    path = route.canonical if route is not None else request.path
    request.app[METRICS].counter(
        "gateway_signature_rejections", "Webhooks and upgrades refused for their signature",
        ["carrier", "path"]).labels(carrier, path).inc()
    await request.app[SIGNATURE_AUDIT].refused(Refusal(
        carrier=carrier, route=path, path=request.path, remote=request.remote or "",
        reason=reason, number=(params or {}).get("To", "")))


async def read_form(request: web.Request) -> MultiDictProxy[str]:
    """The POSTed form's text fields (what a carrier signs); a 400 Problem if unreadable.

    The form is read before its signature can be checked, so anyone can send one that aiohttp
    cannot parse (an unknown charset, bytes that are not UTF-8, multipart without its
    boundary): that is a bad request, not a 500 with a traceback in the log.
    """
    try:
        form = await request.post()
    except (ValueError, LookupError) as exc:  # UnicodeDecodeError is a ValueError
        raise Problem(400, "Bad Request", f"the form cannot be read: {str(exc)[:200]}",
                      kind="invalid-webhook") from None
    # Carriers' webhooks carry no file parts; anything else is not part of what they signed.
    return MultiDictProxy(MultiDict(
        (key, value) for key, value in form.items() if isinstance(value, str)))


async def signed_form(request: web.Request) -> MultiDictProxy[str]:
    """The POSTed form of a Twilio webhook, after checking its signature."""
    params = await read_form(request)
    await verify_twilio(request, params)
    refuse_nul_characters(request, params)
    return params


def refuse_nul_characters(request: web.Request, params: Mapping[str, str]) -> None:
    """Raise a 400 Problem if a signed form or query field holds NUL (Postgres text cannot)."""
    for name, value in (*params.items(), *request.query.items()):
        if "\x00" in name or "\x00" in value:
            raise Problem(400, "Bad Request", f"field {name[:40]!r} contains a NUL character",
                          kind="invalid-webhook")
