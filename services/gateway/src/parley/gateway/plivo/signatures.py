"""Plivo V3 signatures (``X-Plivo-Signature-V3`` + ``-Nonce``) on every webhook and upgrade.

Checked with the plivo SDK's ``validate_v3_signature`` over the URL Plivo requested — the
configured public base URL plus the request's raw path and query, since the server may sit
behind a TLS proxy and never sees that URL itself — and, for POSTs, the form parameters.
The SDK's helper only accepts ``http(s)`` URLs, so a WebSocket upgrade (a GET) is checked over
the ``https://`` form of its ``wss://`` URL: same host, path and query, which is what the
signature binds. A bad or missing signature is answered 403 (problem JSON), never processed,
counted, and audited as ``security.signature_rejected`` (shared with Twilio's check, and
bounded the same way: one event per source, reason and called number per interval, carrying
a count). A good signature's nonce is claimed across instances: the same nonce again is a
replay, refused 403 (problem ``replayed-request``) and counted (:mod:`parley.gateway.replays`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final, Literal

from aiohttp import web
from multidict import MultiDict, MultiDictProxy
from plivo.exceptions import ValidationError as PlivoValidationError
from plivo.utils import validate_v3_signature

from parley.common.problems import Problem

from ..keys import CONFIG
from ..replays import claim_request_nonce, count_refusal
from ..twilio.signatures import read_form, refuse_nul_characters, reject

log = logging.getLogger(__name__)

CARRIER: Final[Literal["plivo"]] = "plivo"
SIGNATURE_HEADER = "X-Plivo-Signature-V3"
NONCE_HEADER = "X-Plivo-Signature-V3-Nonce"


def signed_url(request: web.Request) -> str:
    """The URL Plivo signed for this request: public base + raw path and query."""
    return request.app[CONFIG].public_base + request.raw_path


def signature_params(params: Mapping[str, str]) -> dict[str, str | list[str]]:
    """Form parameters as the SDK's helper takes them: repeated keys become lists."""
    result: dict[str, str | list[str]] = {}
    source = params if isinstance(params, MultiDictProxy | MultiDict) else MultiDict(params)
    for key in source:
        if key not in result:
            values = source.getall(key)
            result[key] = values[0] if len(values) == 1 else list(values)
    return result


async def verify_plivo(request: web.Request, params: Mapping[str, str] | None = None) -> None:
    """Return if the request is signed by our Plivo account; raise a 403 Problem otherwise."""
    config = request.app[CONFIG]
    signature = request.headers.get(SIGNATURE_HEADER, "")
    nonce = request.headers.get(NONCE_HEADER, "")
    if not config.plivo_auth_token:
        reason = "no Plivo auth token configured"
    elif not signature or not nonce:
        reason = f"missing {SIGNATURE_HEADER if not signature else NONCE_HEADER}"
    else:
        method = "GET" if request.method == "GET" else "POST"
        try:
            valid = validate_v3_signature(method, signed_url(request), nonce,
                                          config.plivo_auth_token, signature,
                                          signature_params(params or {}))
        except PlivoValidationError as exc:  # e.g. a public base URL that is not http(s)
            log.error("cannot check a Plivo signature: %s", exc)
            valid = False
        except ValueError:  # the SDK cannot parse a query with non-ASCII escapes: not Plivo's
            valid = False
        if valid:
            await _refuse_replay(request, nonce)
            return
        reason = f"invalid {SIGNATURE_HEADER}"
    await reject(request, reason, params, carrier=CARRIER)
    raise Problem(403, "Forbidden", reason, kind="invalid-signature")


async def _refuse_replay(request: web.Request, nonce: str) -> None:
    """Claim a verified request's nonce (across instances); a 403 Problem if already claimed."""
    if await claim_request_nonce(request, CARRIER, nonce):
        return
    route = request.match_info.route.resource
    path = route.canonical if route is not None else request.path
    count_refusal(request.app, CARRIER, path, "nonce")
    log.warning("refused a replayed Plivo request to %s from %s: its nonce was already used",
                path, request.remote or "-")
    raise Problem(403, "Forbidden", f"{NONCE_HEADER} already used: a replayed request",
                  kind="replayed-request")


async def signed_form(request: web.Request) -> MultiDictProxy[str]:
    """The POSTed form of a Plivo webhook, after checking its signature."""
    params = await read_form(request)
    await verify_plivo(request, params)
    refuse_nul_characters(request, params)
    return params
