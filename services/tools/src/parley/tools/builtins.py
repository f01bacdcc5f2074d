"""The built-in tools: call control through the gateway, knowledge lookup, callbacks.

``end_call``, ``transfer_call`` and ``send_dtmf`` are core-NATS requests to the gateway
instance holding the call's socket (``parley.cmd.gateway.<call>.<verb>``, bodies as in
``parley.gateway.commands``). ``transfer_call`` goes only to one of the agent's
``transfer_numbers``, read when the transfer is asked for (the brain offers the tool pinned to
them, but a model may still name another number); any other target fails without a command,
and without waiting for the turn's last words to play (:meth:`Builtins.transfer_refusal`).
``end_call`` with ``reason`` "idle" is the brain's hang-up on a silent caller (``caller.idle``):
the gateway ends the call with that reason, unless the caller spoke or pressed a key since
the goodbye began (barging in or not). Any ``end_call`` or ``transfer_call`` whose last words
the caller interrupted ("Goodbye!" — "wait, one more thing") does not happen either, nor one
whose round was cut short before its last words closed (the brain's instance died, or a newer
turn cancelled it) and the caller then ended a new turn: the caller is not done, and the model
answers them in their turn, knowing why.
``lookup_knowledge`` calls the :data:`KnowledgeLookup` injected at start-up (the brain's
retrieval); without one it fails with a clear message.
``schedule_callback`` books a row in ``tool_callbacks``, which the gateway dials when it is due
(``parley.gateway.due_callbacks``); only to the caller's own number unless the agent's
``callback_number_prefixes`` allow another (:func:`check_callback_number`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from psycopg import AsyncConnection

from parley.common.bus import Bus, command_subject
from parley.common.configuration.models import E164_PATTERN
from parley.common.configuration.repository import get_agent
from parley.common.events import (
    AgentSay,
    AgentSpeechFinished,
    AgentSpeechInterrupted,
    CallDtmf,
    CallerIdle,
    SpeechStarted,
    TurnUserEnded,
)

from .call_context import CallContext
from .outcomes import ToolError, ToolOutcome

log = logging.getLogger(__name__)

MAX_CALLBACK_AHEAD = timedelta(days=30)


class KnowledgeQuery(msgspec.Struct, frozen=True, kw_only=True):
    """What ``lookup_knowledge`` asks the knowledge base."""

    org_id: str
    agent_id: str
    call_id: str
    query: str


KnowledgeLookup = Callable[[KnowledgeQuery], Awaitable[Any]]
"""Returns JSON-compatible passages for a query; raise ToolError to report a failure."""


async def knowledge_unavailable(query: KnowledgeQuery) -> Any:
    """The default lookup: there is no knowledge base wired into this tools service."""
    raise ToolError("knowledge lookup unavailable: no knowledge base is connected to the tools "
                    "service; answer from what you know or offer a callback")


class _Reply(msgspec.Struct):
    ok: bool
    error: str = ""


_reply = msgspec.json.Decoder(_Reply)


class LastWords(msgspec.Struct, frozen=True):
    """How the caller met a turn's last words (see :meth:`Builtins.after_speech`)."""

    answered: bool = False  # spoke, pressed a key or barged in since they began
    interrupted: bool = False  # barged in: agent.speech.interrupted of the turn
    spoke_again: bool = False  # ended a new turn before the last words' closing clause


UNANSWERED = LastWords()  # nothing to wait for, or the caller let the words play


class Builtins:
    """Runs built-in tools for one service instance."""

    def __init__(self, nc: NATS, *, knowledge: KnowledgeLookup = knowledge_unavailable,
                 command_timeout_s: float = 5.0, handoff_timeout_s: float = 15.0) -> None:
        self.nc = nc
        self.knowledge = knowledge
        self.command_timeout_s = command_timeout_s
        # A hang-up or transfer: the gateway answers within its REST client's timeout (10 s).
        self.handoff_timeout_s = max(command_timeout_s, handoff_timeout_s)

    async def run(self, conn: AsyncConnection[Any], name: str, arguments: dict[str, Any],
                  call: CallContext, tool_call_id: str, *,
                  last_words: LastWords = UNANSWERED) -> ToolOutcome:
        """Run one built-in with validated arguments.

        ``last_words``: how the caller met the turn's last words (see :meth:`after_speech`).
        A hand-off whose last words they interrupted does not happen, nor an idle hang-up
        (``end_call`` with reason "idle") they answered at all: the caller is there after all.
        """
        try:
            match name:
                case "end_call":
                    reason = arguments.get("reason", "agent_hangup")
                    if reason == "idle" and last_words.answered:
                        raise ToolError("not hung up: the caller spoke or pressed a key during "
                                        "the goodbye, so the call goes on")
                    if last_words.interrupted:
                        raise ToolError("not hung up: the caller interrupted the goodbye, so "
                                        "the call goes on; answer what they say")
                    if last_words.spoke_again:
                        raise ToolError("not hung up: the caller spoke again before the "
                                        "goodbye was over, so the call goes on; answer what "
                                        "they say")
                    if await self._command(call.call_id, "hangup", {"reason": reason},
                                           unconfirmed_ok=True):
                        return ToolOutcome.success({"ok": True, "detail": "the call is ending"})
                    return ToolOutcome.success({"ok": True, "confirmed": False, "detail": (
                        "the gateway is ending the call; it did not confirm in time")})
                case "transfer_call":
                    if last_words.interrupted or last_words.spoke_again:
                        how = "interrupted" if last_words.interrupted else "spoke again"
                        raise ToolError(f"not transferred: the caller {how} before the "
                                        "transfer; answer what they say, and transfer only if "
                                        "they still want it")
                    await check_transfer_target(conn, call, arguments["to"])
                    if await self._command(call.call_id, "transfer",
                                           {"to": arguments["to"], "mode": "cold"},
                                           unconfirmed_ok=True):
                        return ToolOutcome.success({"ok": True,
                                                    "transferred_to": arguments["to"]})
                    return ToolOutcome.success({"ok": True, "transferred_to": arguments["to"],
                                                "confirmed": False, "detail": (
                        "the gateway is transferring the call; it did not confirm in time")})
                case "send_dtmf":
                    await self._command(call.call_id, "dtmf", {"digits": arguments["digits"]})
                    return ToolOutcome.success({"ok": True, "sent": arguments["digits"]})
                case "lookup_knowledge":
                    found = await self.knowledge(KnowledgeQuery(
                        org_id=call.org_id, agent_id=call.agent_id, call_id=call.call_id,
                        query=arguments["query"]))
                    return ToolOutcome.success(msgspec.to_builtins(found))
                case "schedule_callback":
                    return await schedule_callback(conn, arguments, call, tool_call_id)
                case _:
                    raise ToolError(f"unknown built-in tool {name!r}")
        except ToolError as exc:
            return exc.outcome()

    @staticmethod
    async def transfer_refusal(conn: AsyncConnection[Any], call: CallContext,
                               to: str) -> ToolOutcome | None:
        """How a transfer to ``to`` fails, known before it waits for the last words; or None."""
        try:
            await check_transfer_target(conn, call, to)
        except ToolError as exc:
            return exc.outcome()
        return None

    async def after_speech(self, org_id: str, call_id: str, turn_id: str, *,
                           timeout_s: float = 20.0) -> LastWords:
        """Wait until the agent's audio of ``turn_id`` has played (or was cut off).

        ``end_call`` and ``transfer_call`` come with a last sentence ("Goodbye!"); acting at
        once would cut it off. The wait ends on ``agent.speech.finished`` or
        ``agent.speech.interrupted`` of the turn, and after ``timeout_s`` in any case; a turn
        that said nothing is not waited for.

        ``answered`` if the caller interrupted it, or spoke or pressed a key (a turn, in the
        managed pipeline) since the turn began (its ``caller.idle`` or first clause), even
        without interrupting — an agent whose interruption mode is "none" or "dtmf", or a
        caller's "yeah" (a backchannel), lets the words play out over the caller;
        ``interrupted`` if they barged in (``agent.speech.interrupted``); ``spoke_again`` if
        they ended a new turn while the turn's closing clause (``last``) was still to come,
        which ends the wait: its round was cut short (the brain's instance died before
        closing it, or the new turn cancelled it), so no ``finished`` comes, and the brain
        answers that new turn. A goodbye that closed and that the caller only talked over
        ("ok bye") still plays out and is acted on.
        """
        if not turn_id:
            return UNANSWERED
        done = asyncio.Event()
        answered = began = closed = interrupted = spoke_again = False
        earlier: set[str] = set()  # turns ended before it began (a media take-over repeats one)

        def check(event: Any, *, live: bool) -> None:
            nonlocal answered, began, closed, interrupted, spoke_again
            if isinstance(event, AgentSay | CallerIdle) and event.turn_id == turn_id:
                began = True
                closed = closed or (isinstance(event, AgentSay) and event.last)
            elif isinstance(event, SpeechStarted | CallDtmf | TurnUserEnded):
                if not (began or live):  # a live event comes after the turn's clauses
                    if isinstance(event, TurnUserEnded):
                        earlier.add(event.turn_id)
                    return
                answered = True
                if isinstance(event, TurnUserEnded) and not closed and (
                        event.turn_id not in earlier):
                    spoke_again = True
                    done.set()
            elif isinstance(event, AgentSpeechFinished | AgentSpeechInterrupted) and (
                    event.turn_id == turn_id):
                interrupted = interrupted or isinstance(event, AgentSpeechInterrupted)
                answered = answered or interrupted
                done.set()

        bus = Bus(self.nc)
        live: list[Any] | None = []  # what comes while the call's past is read, checked after it

        async def on_event(event: Any) -> None:
            if live is None:
                check(event, live=True)
            else:
                live.append(event)

        sub = await bus.subscribe_call(call_id, on_event, org_id=org_id)
        try:
            spoke = False  # the turn said something (the brain says it before the tool call)
            past = await bus.replay_call(call_id, org_id=org_id)
            for event in past:
                check(event, live=False)
                spoke = spoke or (isinstance(event, AgentSay) and event.turn_id == turn_id
                                  and bool(event.text.strip()))
            if not spoke:
                return UNANSWERED
            read = {event.id for event in past}
            for event in live:
                if event.id not in read:
                    check(event, live=True)
            live = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout_s)
        finally:
            await sub.unsubscribe()
        return LastWords(answered=answered, interrupted=interrupted, spoke_again=spoke_again)

    async def _command(self, call_id: str, verb: str, body: dict[str, Any], *,
                       unconfirmed_ok: bool = False) -> bool:
        """Send a command to the gateway holding the call; True once it confirmed it.

        ``unconfirmed_ok``: a hang-up or a transfer, whose answer is awaited for
        ``handoff_timeout_s`` (the gateway is at the carrier's REST API, which it gives 10 s:
        a refusal it reports late still fails), and which is then taken as under way (False),
        not as failed. That is the likely truth (a gateway holds the call), and a "failure"
        would have the model tell the caller it could not, and perhaps ask again, while it
        happens: a second transfer.
        """
        timeout = self.handoff_timeout_s if unconfirmed_ok else self.command_timeout_s
        try:
            msg = await self.nc.request(command_subject(call_id, verb), msgspec.json.encode(body),
                                        timeout=timeout)
        except NoRespondersError:
            raise ToolError("the call is not live: no gateway holds it") from None
        except (NatsTimeoutError, TimeoutError):
            if unconfirmed_ok:
                log.warning("call %s: the gateway did not confirm %s in time; taken as under "
                            "way", call_id, verb)
                return False
            raise ToolError(f"the gateway did not answer the {verb} command in time",
                            retryable=True) from None
        try:
            reply = _reply.decode(msg.data)
        except msgspec.DecodeError as exc:
            raise ToolError(f"the gateway sent an unreadable reply to {verb}: {exc}") from None
        if not reply.ok:
            raise ToolError(f"the gateway refused {verb}: {reply.error}")
        return True


async def check_transfer_target(conn: AsyncConnection[Any], call: CallContext, to: str) -> None:
    """Raise ToolError unless ``to`` is one of the call's agent's ``transfer_numbers``.

    A cold transfer dials out at the org's expense, so a caller who talks the model into a
    premium-rate or international number must get nowhere.
    """
    agent = await get_agent(conn, call.agent_id, org_id=call.org_id) if call.agent_id else None
    allowed = agent.settings.transfer_numbers if agent is not None else []
    if to in allowed:
        return
    if not allowed:
        raise ToolError("transfer not allowed: this agent has no transfer numbers. Do not "
                        "transfer; offer a callback (schedule_callback) or take a message.")
    raise ToolError(f"transfer target {to} not allowed for this agent; transfer only to "
                    f"{', '.join(allowed)}, or offer a callback (schedule_callback).")


async def schedule_callback(conn: AsyncConnection[Any], arguments: dict[str, Any],
                            call: CallContext, tool_call_id: str) -> ToolOutcome:
    """Book a callback the gateway dials when it is due (once per tool call).

    The gateway dials it at the org's expense, so, as with transfers, a caller who talks the
    model into a premium-rate or foreign number must get nowhere: only the caller's own number,
    or one the agent's ``callback_number_prefixes`` allow; at most
    :data:`MAX_CALLBACK_AHEAD` ahead; one callback not yet dialled (pending or dialing) per
    call and number, which migration 012's unique index enforces.
    """
    try:
        when = datetime.fromisoformat(arguments["when"])
    except ValueError:
        raise ToolError(f"when: {arguments['when']!r} is not an ISO 8601 date-time") from None
    if when.tzinfo is None:
        raise ToolError("when: give a UTC offset, e.g. 2030-01-31T15:00:00-05:00")
    now = datetime.now(UTC)
    if when <= now:
        raise ToolError("when: the callback time must be in the future")
    if when > now + MAX_CALLBACK_AHEAD:
        raise ToolError(f"when: a callback can be at most {MAX_CALLBACK_AHEAD.days} days ahead; "
                        "offer a sooner time, or take a message")
    number = arguments.get("number") or call.customer_number
    if not re.match(E164_PATTERN, number):
        raise ToolError("number: the caller's number is unknown (withheld); ask for it and "
                        "pass number")
    await check_callback_number(conn, call, number)
    await _refuse_if_booked(conn, call, number, tool_call_id)
    note = arguments.get("note", "")
    # Unique per tool call (a redelivery books nothing more) and, in migration 012's index, per
    # call and number while pending or dialing: one booked at the same time wins, and this
    # insert waits for it.
    cursor = await conn.execute(
        "INSERT INTO tool_callbacks (org_id, call_id, tool_call_id, agent_id, number, "
        "callback_at, note) VALUES (%s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT DO NOTHING RETURNING id",
        (call.org_id, call.call_id, tool_call_id, call.agent_id, number, when, note))
    if await cursor.fetchone() is None:
        await _refuse_if_booked(conn, call, number, tool_call_id)
    return ToolOutcome.success({"scheduled": True, "when": when.isoformat(), "number": number})


async def _refuse_if_booked(conn: AsyncConnection[Any], call: CallContext, number: str,
                            tool_call_id: str) -> None:
    """Raise ToolError if another tool call booked a callback to ``number`` not dialled yet."""
    cursor = await conn.execute(
        "SELECT callback_at FROM tool_callbacks WHERE call_id = %s AND number = %s "
        "AND status IN ('pending', 'dialing') AND tool_call_id <> %s",
        (call.call_id, number, tool_call_id))
    if (booked := await cursor.fetchone()) is not None:
        raise ToolError(f"a callback to {number} is already booked for {booked[0].isoformat()}; "
                        "tell the caller it stands (it cannot be moved in this call)")


async def check_callback_number(conn: AsyncConnection[Any], call: CallContext,
                                number: str) -> None:
    """Raise ToolError unless ``number`` is the caller's own or the agent allows it."""
    if number == call.customer_number:
        return
    agent = await get_agent(conn, call.agent_id, org_id=call.org_id) if call.agent_id else None
    prefixes = agent.settings.callback_number_prefixes if agent is not None else []
    if any(number.startswith(prefix) for prefix in prefixes):
        return
    own = (f"the caller's own number ({call.customer_number})" if call.customer_number
           else "the caller's own number")
    if not prefixes:
        raise ToolError(f"callback to {number} not allowed for this agent: it can only call "
                        f"back {own}. Offer that, or take a message.")
    raise ToolError(f"callback to {number} not allowed for this agent: it can call back "
                    f"{own} or numbers starting {', '.join(prefixes)}. Offer one of those, or "
                    "take a message.")
