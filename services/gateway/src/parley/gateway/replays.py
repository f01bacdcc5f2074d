"""Signed carrier requests are good once: Plivo nonces, Twilio stream tokens, connect order.

A carrier's signature binds a request's URL and parameters, not when it was sent, so a request
captured (a proxy's log, a debugging dump) verifies again when sent again. Each guard here keeps
its state in Postgres (``014_replay_guards.sql``), so a replay is refused by whichever
instance it reaches, and a refusal is counted (``gateway_replays_refused_total`` by carrier,
route and kind) and logged without the secret:

* **Plivo nonces.** V3 signatures carry a random nonce but no time: every nonce verified is
  claimed (its sha256) for ``plivo_nonce_window_s``; a request whose nonce is already claimed is
  refused 403 (problem ``replayed-request``). A request that failed on our side (5xx) gives its
  nonce back, so that the carrier may send it again.
* **Twilio stream tokens.** A Media Streams (or ConversationRelay) upgrade is signed over the
  socket URL without parameters, the same for every call: a captured upgrade could open a
  stream for any live call. Each ``<Connect>`` the gateway answers a call with (the voice
  webhook's is connect 0, each reconnect and DTMF redirect the next) carries a one-time
  ``stream_token`` ``<Parameter>``, which Twilio hands back in the ``start`` (``setup``)
  message's ``customParameters``. A start is accepted only with a token issued for its call,
  unused and within ``gateway_stream_token_ttl_s``, and uses it up in one UPDATE; else the socket
  is closed 4406. A connect is issued once; only the voice webhook asked again while connect
  0's token is unused (a carrier retry) gets a new token in place of the old.
* **Connect order.** The ``<Connect action>`` URL names its connect (``connect=<n>``): an action
  of a connect that is not the call's latest (one replaced already, by this very action or by a
  redirect) is stale — a replay — and reconnects nothing, counts no attempt and ends no call.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from datetime import timedelta
from typing import Any, Literal, NamedTuple

from aiohttp import web
from aiohttp.typedefs import Handler
from psycopg import AsyncConnection

from parley.common.problems import Problem

from .keys import CLOCK, CONFIG, METRICS, POOL

log = logging.getLogger(__name__)

STREAM_TOKEN = "stream_token"  # the <Parameter> name carrying a connect's token
Kind = Literal["nonce", "stream_token", "stale_connect"]


def digest(secret: str) -> str:
    """What is stored of a nonce or token: its sha256 (hex)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def count_refusal(app: web.Application, carrier: str, path: str, kind: Kind) -> None:
    """Count a request refused as a replay."""
    app[METRICS].counter(
        "gateway_replays_refused", "Signed carrier requests refused as replays (a nonce seen, "
        "a stream token not issued, used or expired, a stale connect)",
        ["carrier", "path", "kind"]).labels(carrier, path, kind).inc()


# -- Plivo nonces -------------------------------------------------------------------------------

async def claim_nonce(app: web.Application, carrier: str, nonce: str) -> bool:
    """Claim a verified request's nonce; False if it was claimed within the window (a replay)."""
    now = app[CLOCK]()
    expires = now + timedelta(seconds=app[CONFIG].plivo_nonce_window_s)
    async with app[POOL].connection() as conn:
        cursor = await conn.execute(
            "INSERT INTO carrier_nonces (carrier, nonce_sha256, expires_at) VALUES (%s, %s, %s) "
            "ON CONFLICT (carrier, nonce_sha256) DO UPDATE SET expires_at = EXCLUDED.expires_at "
            "WHERE carrier_nonces.expires_at <= %s RETURNING 1",
            (carrier, digest(nonce), expires, now))
        return await cursor.fetchone() is not None


_NONCE = web.RequestKey("replays.nonce", tuple[str, str])  # the request's claimed nonce


async def claim_request_nonce(request: web.Request, carrier: str, nonce: str) -> bool:
    """:func:`claim_nonce` for ``request``, given back if the request fails on our side."""
    if not await claim_nonce(request.app, carrier, nonce):
        return False
    request[_NONCE] = (carrier, nonce)
    return True


@web.middleware
async def give_back_nonces(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request that failed on our side (5xx, a crash, cancelled) gives its nonce back.

    The carrier may send the same signed request again after an error of ours, and it must be
    let through then: nothing it asked for was done (what was is done once per call anyway).
    """
    try:
        response = await handler(request)
    except Problem as exc:
        if exc.status >= 500:
            await _give_back(request)
        raise
    except web.HTTPException:
        raise
    except asyncio.CancelledError:  # stopped mid-way (shutdown): nothing was answered
        await asyncio.shield(_give_back(request))
        raise
    except Exception:
        await _give_back(request)
        raise
    if response.status >= 500:
        await _give_back(request)
    return response


async def _give_back(request: web.Request) -> None:
    claimed = request.pop(_NONCE, None)
    if claimed is None:
        return
    try:
        async with request.app[POOL].connection() as conn:
            await conn.execute("DELETE FROM carrier_nonces WHERE carrier = %s "
                               "AND nonce_sha256 = %s", (claimed[0], digest(claimed[1])))
    except Exception:  # the database failing is likely why the request failed
        log.exception("%s: the nonce of a failed request could not be given back (a retry of "
                      "it will be refused)", request.path)


async def expire(app: web.Application) -> int:
    """Delete nonces past their window, and stream tokens a day past theirs; how many."""
    now = app[CLOCK]()
    async with app[POOL].connection() as conn:
        nonces = await conn.execute("DELETE FROM carrier_nonces WHERE expires_at <= %s", (now,))
        tokens = await conn.execute("DELETE FROM carrier_stream_tokens WHERE expires_at <= %s",
                                    (now - timedelta(days=1),))
        return int(nonces.rowcount) + int(tokens.rowcount)


# -- Twilio stream tokens -----------------------------------------------------------------------

class Connect(NamedTuple):
    """A connect issued: its number (for the action URL) and its token (for the TwiML only)."""

    number: int
    token: str


async def issue_connect(conn: AsyncConnection[Any], app: web.Application, call_id: str,
                        number: int, *, after_s: float = 0.0,
                        again: bool = False) -> Connect | None:
    """Issue connect ``number`` of a call with a new token; None if it may not be (a replay).

    Refused when it was issued already, or a later connect exists. ``again``: one issued but
    whose token is unused is issued again, a new token replacing the old (the voice webhook,
    which Twilio may ask twice), unless an earlier one exists (-1: a stream of TwiML from
    before stream tokens, started already). ``after_s``: what plays before the stream starts
    (DTMF), added to the token's lifetime.
    """
    token = secrets.token_urlsafe(32)
    now = app[CLOCK]()
    expires = now + timedelta(seconds=app[CONFIG].gateway_stream_token_ttl_s + after_s)
    cursor = await conn.execute(
        "INSERT INTO carrier_stream_tokens (call_id, connect, token_sha256, issued_at, "
        "expires_at) SELECT %(call)s, %(n)s, %(hash)s, %(now)s, %(expires)s WHERE NOT EXISTS ("
        "SELECT 1 FROM carrier_stream_tokens WHERE call_id = %(call)s AND (connect > %(n)s "
        "OR (%(again)s AND connect < %(n)s))) "
        "ON CONFLICT (call_id, connect) DO UPDATE SET token_sha256 = EXCLUDED.token_sha256, "
        "issued_at = EXCLUDED.issued_at, expires_at = EXCLUDED.expires_at "
        "WHERE carrier_stream_tokens.used_at IS NULL AND %(again)s RETURNING connect",
        {"call": call_id, "n": number, "hash": digest(token), "now": now, "expires": expires,
         "again": again})
    return None if await cursor.fetchone() is None else Connect(number, token)


async def issue_next_connect(conn: AsyncConnection[Any], app: web.Application, call_id: str,
                             *, after_s: float = 0.0) -> Connect:
    """Issue the call's next connect (a redirect of ours: DTMF), whatever its number."""
    for _ in range(5):
        cursor = await conn.execute(
            "SELECT coalesce(max(connect) + 1, 0) FROM carrier_stream_tokens WHERE call_id = %s",
            (call_id,))
        row = await cursor.fetchone()
        connect = await issue_connect(conn, app, call_id, int(row[0]) if row else 0,
                                      after_s=after_s)
        if connect is not None:
            return connect
    raise RuntimeError(f"call {call_id}: no connect could be issued (contended)")


async def withdraw_connect(conn: AsyncConnection[Any], call_id: str, number: int) -> None:
    """Take back connect ``number`` of a call, unless its stream started.

    Its TwiML was not taken (a DTMF redirect Twilio refused): the call is still on the connect
    before it, whose action must still reconnect it.
    """
    await conn.execute("DELETE FROM carrier_stream_tokens WHERE call_id = %s AND connect = %s "
                       "AND used_at IS NULL", (call_id, number))


async def latest_connect(conn: AsyncConnection[Any], call_id: str) -> int:
    """The call's latest connect number (-1: none)."""
    cursor = await conn.execute(
        "SELECT coalesce(max(connect), -1) FROM carrier_stream_tokens WHERE call_id = %s",
        (call_id,))
    row = await cursor.fetchone()
    return -1 if row is None else int(row[0])


async def use_stream_token(conn: AsyncConnection[Any], app: web.Application, call_id: str,
                           token: str, stream_id: str) -> str:
    """Use up a stream's token: ``""`` if it was good, else why it is refused."""
    now = app[CLOCK]()
    if not token:
        # TwiML issued before stream tokens were (a rolling deploy: an instance of the older
        # code answered, nothing issued for the call): its stream is taken once, and marked as
        # connect -1, which the older TwiML's action (no connect=) goes on from
        cursor = await conn.execute(
            "INSERT INTO carrier_stream_tokens (call_id, connect, token_sha256, issued_at, "
            "expires_at, used_at, stream_id) SELECT %(call)s, -1, '', %(now)s, %(now)s, "
            "%(now)s, %(stream)s WHERE NOT EXISTS (SELECT 1 FROM carrier_stream_tokens WHERE "
            "call_id = %(call)s) ON CONFLICT (call_id, connect) DO NOTHING RETURNING connect",
            {"call": call_id, "now": now, "stream": stream_id})
        if await cursor.fetchone() is not None:
            log.info("call %s: a stream of TwiML without a stream token (issued before the "
                     "deploy) accepted", call_id)
            return ""
        if not app[CONFIG].gateway_stream_tokens_enforced:  # a mixed fleet (config.py)
            log.info("call %s: a stream without a stream token accepted (not enforced)",
                     call_id)
            return ""
        return "no stream token"
    cursor = await conn.execute(
        "UPDATE carrier_stream_tokens SET used_at = %s, stream_id = %s WHERE call_id = %s "
        "AND token_sha256 = %s AND used_at IS NULL AND expires_at > %s RETURNING connect",
        (now, stream_id, call_id, digest(token), now))
    if await cursor.fetchone() is not None:
        return ""
    cursor = await conn.execute(
        "SELECT used_at IS NOT NULL FROM carrier_stream_tokens WHERE call_id = %s "
        "AND token_sha256 = %s", (call_id, digest(token)))
    row = await cursor.fetchone()
    if row is None:
        return "stream token not issued for this call"
    return "stream token already used" if row[0] else "stream token expired"
