"""``WSS /twilio/relay``: Twilio ConversationRelay (managed pipeline), bridged to the bus.

Twilio does speech recognition and synthesis; we exchange text. In: ``setup``, ``prompt``,
``interrupt``, ``dtmf``, ``info``, ``error`` (a message of any other type is ignored, counted:
:mod:`parley.gateway.carrier_messages`). Out: ``text`` tokens, ``play``, ``sendDigits``,
``end``. The bridge speaks the same events as the cascading path: a final prompt becomes
transcript.final + turn.user_ended (reason ``prompt``), each agent.say becomes a text token
(``last`` on the turn's last clause), an interrupt becomes agent.speech.interrupted with
what the caller actually heard, and Twilio's ``info`` reports of the tokens it played and of
its speech stopping become agent.speech.finished once a turn has played out
(:mod:`.relay_playback`): the tools service waits for it before it hangs up or transfers. The
greeting, which Twilio says on its own as the call's first socket connects, is followed and
finishes (agent turn ``t0``) as the text sent is.
A caller who goes silent is prompted, then hung up on (``caller.idle``, :mod:`.relay_idle`), as
media does on cascading calls. A key press is call.dtmf, and the keys a caller types are a
caller turn too (:mod:`parley.common.keypad`, on the wall clock): turn.user_ended with reason
``dtmf`` and the keys as its text, at once on the agent's end key, else once no key has come
for ``keypad_timeout_ms``. No transcript.final: keys are not speech (media does the same).
Keys still pending when the call ends make no turn; those pending when the socket drops are
gathered by the call's next socket, from the call's past. So is what earlier sockets said of
a turn that goes on on this one: an interruption's played text begins with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import ClassVar, Literal

import msgspec
from aiohttp import web

from parley.common.events import (
    AgentSay,
    AgentSpeechFinished,
    AgentSpeechInterrupted,
    CallDtmf,
    CallEnded,
    CallerIdle,
    CallStreamStarted,
    Event,
    TranscriptFinal,
    TranscriptPartial,
    TurnUserEnded,
    is_token,
    uuid7,
)
from parley.common.idle import Action
from parley.common.keypad import Keypad, KeypadSettings
from parley.common.resilience import retry_policy
from parley.common.runtime import raise_if_cancelled

from ..carrier_messages import CarrierDecoder, UnknownMessage
from ..close_codes import CloseCode, ProtocolViolation, clean_text
from ..commands import CommandError
from ..keys import CONFIG
from . import twiml
from .media_stream import dtmf_digit
from .relay_idle import TICK_S, RelayIdle
from .relay_playback import RelayPlayback
from .session import TwilioSession, carrier_socket
from .signatures import verify_twilio

log = logging.getLogger(__name__)

_ID_NAMESPACE = uuid.UUID("3f0c8e52-7a1d-4d6b-a0f4-5b2e9c7d1e38")


class _Message(msgspec.Struct, tag_field="type", rename="camel", kw_only=True):
    pass


class Setup(_Message, tag="setup"):
    """The session began: which call, and our custom parameters."""

    call_sid: str
    session_id: str = ""
    custom_parameters: dict[str, str] = msgspec.field(default_factory=dict)


class Prompt(_Message, tag="prompt"):
    """What the caller said (``last`` false for partial prompts)."""

    voice_prompt: str
    lang: str = ""
    last: bool = True


GREETING_TURN = "t0"  # the brain's greeting (AgentSettings.greeting, said on stream start)


class Interrupt(_Message, tag="interrupt"):
    """The caller spoke over the agent."""

    utterance_until_interrupt: str = ""
    duration_until_interrupt_ms: int = 0


class Dtmf(_Message, tag="dtmf"):
    """The caller pressed a key."""

    digit: str


class Info(_Message, tag="info"):
    """An event we subscribed to (``events`` in the TwiML), or a debugging report.

    ``agentSpeaking`` / ``clientSpeaking`` ("on" or "off"), ``tokensPlayed`` (the text just
    played); other names (``roundTripDelayMs`` …) are ignored.
    """

    name: str = ""
    value: str | int | float | bool | None = None


class Error(_Message, tag="error"):
    """Twilio reports a problem with something we sent."""

    description: str = ""


RelayMessage = Setup | Prompt | Interrupt | Dtmf | Info | Error
_decoder: CarrierDecoder[RelayMessage] = CarrierDecoder(RelayMessage, tag_field="type")
_encoder = msgspec.json.Encoder()


def decode_message(data: str) -> RelayMessage | UnknownMessage:
    """Parse one message (a type Twilio added since: ignored) or raise what is wrong."""
    return _decoder.decode(data)


def add_routes(app: web.Application) -> None:
    """Register ``/twilio/relay``."""
    app.router.add_get(twiml.RELAY_PATH, conversation_relay)


async def conversation_relay(request: web.Request) -> web.WebSocketResponse:
    """Check the upgrade's signature, then run the socket as its own session."""
    await verify_twilio(request, websocket=True)
    ws = carrier_socket(request.app[CONFIG])
    await ws.prepare(request)
    await RelaySession(request.app, ws).run()
    return ws


class RelaySession(TwilioSession):
    """One ConversationRelay socket."""

    protocol: ClassVar[str] = "twilio_relay"
    route: ClassVar[str] = twiml.RELAY_PATH
    pipeline: ClassVar[Literal["cascading", "managed"]] = "managed"

    def __init__(self, app: web.Application, ws: web.WebSocketResponse) -> None:
        super().__init__(app, ws)
        self.speaking_turn = ""  # the turn whose text we last sent (or the greeting's)
        self._turn_has_text = False
        self.playback = RelayPlayback()
        self.stream_id = ""  # Twilio's sessionId
        self._utterance_id = ""  # the caller turn being spoken (from its first partial prompt)
        self.idle: RelayIdle | None = None  # once attached, if the agent has idle timers on
        self.keypad = Keypad()  # the agent's settings once attached (subscribe)
        self._keys_timer: asyncio.Task[None] | None = None  # ends the keys' turn when due
        self._keys_first: uuid.UUID | None = None  # call.dtmf of the open turn's first key
        # keys pressed while the call's past is read: (digit, when, its call.dtmf id)
        self._keys_backlog: list[tuple[str, int, uuid.UUID]] | None = []
        self._call_ended = False  # call.ended seen: keys make no more turns
        self._filler: AgentSay | None = None  # a filler clause held until its tools are slow
        # What the call's earlier sockets sent of each turn (read from the call's past), and
        # the agent.say seen live while that is read, which this socket sent itself.
        self._said_before: dict[str, str] = {}
        self._says_here: set[uuid.UUID] | None = set()
        self._past_read = asyncio.Event()
        self._idle_backlog: list[Event] | None = []  # live events held while the past is read
        self._errors = self.metrics.counter(
            "gateway_relay_errors", "ConversationRelay error messages from Twilio")

    async def on_text(self, data: str) -> None:
        """Dispatch one ConversationRelay message."""
        message = decode_message(data)
        if isinstance(message, UnknownMessage):
            self.ignore(message)
            return
        if isinstance(message, Setup):
            if self.started:
                raise ProtocolViolation(CloseCode.DUPLICATE_START, "second setup on one socket")
            session_id = message.session_id or message.call_sid
            if not is_token(session_id):
                raise ProtocolViolation(CloseCode.INVALID_MESSAGE, "invalid sessionId")
            self.stream_id = session_id
            await self.attach(message.call_sid, message.custom_parameters, session_id)
            return
        if not self.started:
            raise ProtocolViolation(CloseCode.NOT_STARTED, f"{_type(message)} before setup")
        assert self.call is not None
        org_id, call_id = self.call.org_id, self.call_id
        match message:
            case Prompt(last=True):
                self._caller_active()
                turn_id, text = self._utterance(), clean_text(message.voice_prompt)
                self._utterance_id = ""
                if not text.strip():
                    # Nothing recognised: no turn (the model would be asked to answer nothing,
                    # and Anthropic refuses a blank message).
                    log.info("call %s: empty prompt ignored", self.call_id)
                    return
                await self.publish(TranscriptFinal(org_id=org_id, call_id=call_id, text=text,
                                                   utterance_id=turn_id,
                                                   provider="twilio-relay"))
                await self.publish(TurnUserEnded(org_id=org_id, call_id=call_id,
                                                 turn_id=turn_id, text=text, reason="prompt"))
            case Prompt():
                # What the caller has said so far (partialPrompts): the brain warms the turn's
                # context up from it, as from media's partials. The final carries it all.
                self._caller_active()
                text = clean_text(message.voice_prompt)
                if text.strip():
                    await self.publish(TranscriptPartial(
                        org_id=org_id, call_id=call_id, text=text,
                        utterance_id=self._utterance()))
            case Interrupt():
                # Not necessarily the last turn sent: what follows a failed hand-off (t3.1) can
                # be queued behind the turn Twilio is saying, the one what the caller heard
                # begins. Once all text sent has played, the last turn sent (its audio ending),
                # or the greeting if none was.
                heard = clean_text(message.utterance_until_interrupt)
                interrupted = self.playback.playing(heard) or self.speaking_turn
                self.playback.interrupted(interrupted)
                if self.idle is not None:
                    self.idle.interrupted()
                # Twilio's session on this socket heard of the turn only what this socket sent;
                # the brain reads the played text from the turn's start (see _resume_speech).
                await self._past_read.wait()
                played = f"{self._said_before.get(interrupted, '')} {heard}".strip()
                await self.publish(AgentSpeechInterrupted(
                    org_id=org_id, call_id=call_id, turn_id=interrupted, played_text=played,
                    cut_ms=max(0, message.duration_until_interrupt_ms)))
            case Dtmf():
                self._caller_active()
                digit = dtmf_digit(message.digit)
                pressed = CallDtmf(org_id=org_id, call_id=call_id, digit=digit)
                await self.publish(pressed)
                await self._key_pressed(digit, pressed.id)
            case Info(name="tokensPlayed"):
                await self._finish(self.playback.played(str(message.value or "")))
            case Info(name="agentSpeaking"):
                await self._finish(self.playback.speaking(message.value == "on"))
                if self.idle is not None:
                    self.idle.agent_speaking_changed(message.value == "on",
                                                     all_played=self.playback.all_played)
            case Info(name="clientSpeaking"):
                if self.idle is not None:
                    self.idle.client_speaking_changed(message.value == "on")
            case Info():
                pass
            case Error():
                self._errors.inc()
                log.warning("call %s: ConversationRelay error: %s", self.call_id,
                            clean_text(message.description, 500))

    # -- outwards ---------------------------------------------------------------------------

    async def subscribe(self) -> None:
        """Follow the call's events: agent.say becomes text tokens; all feed the idle clock."""
        assert self.call is not None and self.agent is not None
        self.keypad = Keypad(KeypadSettings.of(self.agent.settings))
        if self.agent.settings.idle_prompt_s or self.agent.settings.idle_hangup_s:
            self.idle = RelayIdle(self.agent.settings)
        if self._reconnects == 0 and self.agent.settings.greeting:
            # Twilio says the greeting (the TwiML's welcomeGreeting) as the caller connects,
            # on the call's first socket only: it finishes, or is interrupted, as a turn of
            # the text we send is.
            self.speaking_turn = GREETING_TURN
            self.playback.greeting(GREETING_TURN, self.agent.settings.greeting)
        self.add_subscription(await self.bus.subscribe_call(
            self.call_id, self._on_event, org_id=self.call.org_id))
        self._spawn(self._go_on_from_the_past(), "past")

    async def _on_event(self, event: Event) -> None:
        if isinstance(event, CallEnded):
            self._call_ended = True
            self.keypad.clear()  # the timer then finds nothing due
            self._typing()
        if isinstance(event, CallStreamStarted) and event.stream_id != self.stream_id:
            self.keypad.clear()  # the newer socket gathers the keys typed so far (the past)
        if self.idle is not None:
            if isinstance(event, CallStreamStarted) and event.stream_id != self.stream_id:
                # The call went on on a newer socket (a reconnect, perhaps to another instance,
                # while this one is not yet taken for dead): its silence is that one's to count.
                # This one cannot hear the caller any more and would prompt them mid-sentence.
                self.idle.ended = True
            if self._idle_backlog is not None:
                self._idle_backlog.append(event)
            else:
                self.idle.observe(event)
        if not isinstance(event, AgentSay):
            return
        if self._says_here is not None:
            self._says_here.add(event.id)
        if self.playback.cut_off(event.turn_id):
            # The caller interrupted it; the brain cancels it only once it hears so, and media
            # too drops what of it comes after a barge-in.
            return
        if event.turn_id == GREETING_TURN:
            # Twilio said the greeting as the TwiML's welcomeGreeting the moment the caller was
            # connected (followed from then on: see subscribe); the brain's (the same words)
            # would say it a second time.
            return
        if event.filler_after_ms:
            # "One moment.", sent with a round's tool requests: said only if nothing more comes
            # for that long once what was sent has been said (the tools are slow), as media does.
            self._filler = event
            self._spawn(self._say_filler_when_due(event), "filler")
            return
        self._filler = None  # more came (of this turn or another): no filler
        await self._say(event)

    async def _say_filler_when_due(self, filler: AgentSay) -> None:
        received, after_s = time.monotonic(), filler.filler_after_ms / 1000
        while self._filler is filler:
            # Until Twilio has said the text sent so far (the idle clock's estimate, when kept).
            speaking_until = self.idle.speaking_until if self.idle is not None else 0.0
            wait_s = max(received, speaking_until) + after_s - time.monotonic()
            if wait_s <= 0:
                self._filler = None
                if not self.playback.cut_off(filler.turn_id):
                    await self._say(filler)
                return
            await asyncio.sleep(min(0.1, wait_s))

    async def _say(self, event: AgentSay) -> None:
        """An agent clause as a text token for Twilio to say."""
        if event.turn_id != self.speaking_turn:
            self.speaking_turn, self._turn_has_text = event.turn_id, False
        token = event.text
        # Clauses arrive without the space between them; TTS needs it to say them apart.
        if self._turn_has_text and token and not token[0].isspace():
            token = " " + token
        self._turn_has_text = self._turn_has_text or bool(token)
        if await self.send(_encoder.encode({"type": "text", "token": token,
                                            "last": event.last})):
            if self.idle is not None:
                self.idle.agent_text(event.turn_id, token)
            await self._finish(self.playback.sent(event.turn_id, token, last=event.last))

    async def _finish(self, turn_ids: list[str]) -> None:
        """agent.speech.finished for turns Twilio has played out (one id per call and turn)."""
        assert self.call is not None
        for turn_id in turn_ids:
            await self.publish(AgentSpeechFinished(
                id=uuid.uuid5(_ID_NAMESPACE, f"{self.call_id}/agent.speech.finished/{turn_id}"),
                org_id=self.call.org_id, call_id=self.call_id, turn_id=turn_id))

    def _utterance(self) -> str:
        """The id of the caller turn being spoken: its partials', its final's, the turn's."""
        if not self._utterance_id:
            self._utterance_id = f"turn_{uuid7().hex}"
        return self._utterance_id

    def _resume_speech(self, past: list[Event]) -> None:
        """Learn what the call's earlier sockets sent of each turn (this one is a reconnect).

        Twilio's session on a new socket says only what that socket sends, so an interruption
        there reports what was heard of that alone: 'You're booked' of a turn whose 'Let me
        check the calendar.' played before the socket dropped. The brain reads a turn's played
        text from the turn's start, so the interruption's played text begins with the turn's
        text from before this socket (its fillers, said or not, left out, as the brain passes
        over them). All of it is taken as heard: text still unplayed when the old socket
        dropped, or published while the call had no socket, cannot be told apart from the call's
        events.
        """
        seen, self._says_here = self._says_here or set(), None
        for event in past:
            if (isinstance(event, AgentSay) and event.id not in seen and event.text.strip()
                    and event.turn_id != GREETING_TURN and not event.filler_after_ms):
                before = self._said_before.get(event.turn_id, "")
                self._said_before[event.turn_id] = f"{before} {event.text.strip()}".lstrip()
        self._past_read.set()

    # -- keys typed ---------------------------------------------------------------------------

    async def _key_pressed(self, digit: str, event_id: uuid.UUID) -> None:
        """Gather a key; its turn ends now (end key), or when the timer finds it due."""
        if self._call_ended:
            return
        if self._keys_backlog is not None:  # after the keys of the call's past
            self._keys_backlog.append((digit, _now_ms(), event_id))
            return
        await self._press(digit, _now_ms(), event_id)
        self._end_keys_in_time()

    async def _press(self, digit: str, at_ms: int, event_id: uuid.UUID,
                     published: frozenset[str] = frozenset()) -> None:
        """A key at ``at_ms``: it ends its turn (end key), or one due before it ended first."""
        keys, first = self.keypad.poll(at_ms), self._keys_first
        if keys is not None:
            await self._publish_keys(keys, first, published)
        if not self.keypad.pending:
            self._keys_first = event_id
        keys, first = self.keypad.press(digit, at_ms), self._keys_first
        self._typing()
        if keys is not None:
            await self._publish_keys(keys, first, published)

    def _end_keys_in_time(self) -> None:
        if self.keypad.due_ms is not None and (self._keys_timer is None
                                               or self._keys_timer.done()):
            self._keys_timer = self._spawn(self._end_keys_when_due(), "keypad")

    async def _end_keys_when_due(self) -> None:
        """Wait out the keys' timeout, which each new key moves on; over once none are pending.

        One task per socket, not one per key: a key pressed meanwhile only moves ``due_ms``.
        Cancelled with the socket: a newer socket gathers the keys pending (``_resume_keys``).
        """
        while (due_ms := self.keypad.due_ms) is not None:
            await asyncio.sleep(max(0, due_ms - _now_ms()) / 1000)
            keys, first = self.keypad.poll(_now_ms()), self._keys_first
            self._typing()
            if keys is not None:
                await self._publish_keys(keys, first)

    async def _resume_keys(self, past: list[Event]) -> None:
        """Gather the keys typed on an earlier socket of the call whose turn was not published.

        A socket that dropped mid-typing ("12", then a reconnect, then "3#") would cut the
        number in two, its first keys lost. The ``call.dtmf`` events since the last turn of keys
        published are gathered again by when they were pressed (not those before: gathered
        again, a key pressed just at the timeout could fall into another turn than it did); a
        turn the earlier socket published meanwhile (the same id: see :meth:`_publish_keys`)
        is not published again. Then the keys pressed on this socket while the past was read.
        """
        backlog = self._keys_backlog if self._keys_backlog is not None else []
        if any(isinstance(event, CallEnded) for event in past):
            self._call_ended, self._keys_backlog = True, None
            return
        live = {event_id for _, _, event_id in backlog}  # pressed here, perhaps in the past too
        published = frozenset(event.turn_id for event in past
                              if isinstance(event, TurnUserEnded) and event.reason == "dtmf")
        since = max((i for i, event in enumerate(past) if isinstance(event, TurnUserEnded)
                     and event.reason == "dtmf"), default=-1) + 1
        now_ms, now = _now_ms(), time.time()
        for event in past[since:]:
            if isinstance(event, CallDtmf) and event.id not in live:
                at_ms = now_ms - round((now - event.at.timestamp()) * 1000)
                await self._press(event.digit, at_ms, event.id, published)
        while backlog:  # (keys pressed meanwhile join it)
            digit, at_ms, event_id = backlog.pop(0)
            await self._press(digit, at_ms, event_id, published)
        self._keys_backlog = None
        keys, first = self.keypad.poll(_now_ms()), self._keys_first
        if keys is not None:
            await self._publish_keys(keys, first, published)
        self._typing()
        self._end_keys_in_time()

    def _typing(self) -> None:
        """Tell the idle clock whether keys are being typed: that caller is busy, not silent.

        (``keypad_timeout_ms`` may pass ``idle_prompt_s``.) Once the keys make a turn, the turn
        holds the count until it is answered.
        """
        if self.idle is not None:
            self.idle.typing = bool(self.keypad.pending)

    async def _publish_keys(self, keys: str, first: uuid.UUID | None,
                            published: frozenset[str] = frozenset()) -> None:
        """turn.user_ended (reason ``dtmf``) under a turn id of its own, not the spoken one's.

        Its ids come from its first key's ``call.dtmf``, so two sockets of the call (one
        dropped, one reconnected) that both end it publish it once (JetStream drops the
        repeat). The session observes it as it does a prompt's turn: the idle clock waits for
        its answer.
        """
        assert self.call is not None
        name = f"{self.call_id}/keys/{first or uuid7()}"
        turn_id = f"turn_{uuid.uuid5(_ID_NAMESPACE, name).hex}"
        if turn_id in published:
            return
        log.info("call %s: caller typed %d key(s)", self.call_id, len(keys))
        await self.outbox.put(TurnUserEnded(
            id=uuid.uuid5(_ID_NAMESPACE, f"{name}/turn.user_ended"), org_id=self.call.org_id,
            call_id=self.call_id, turn_id=turn_id, text=keys, reason="dtmf"))

    # -- the idle caller ---------------------------------------------------------------------

    def _caller_active(self) -> None:
        if self.idle is not None:
            self.idle.caller_active()

    async def _go_on_from_the_past(self) -> None:
        """Read the call's past: a reconnect goes on with its speech, keys and idle turns."""
        past = await self._past_events()
        self._resume_speech(past or [])
        await self._resume_keys(past or [])
        if self.idle is not None:
            await self._watch_idle(past)

    async def _watch_idle(self, past: list[Event] | None) -> None:
        """Go on from the call's past idle turns, then tick the clock."""
        idle, call = self.idle, self.call
        assert idle is not None and call is not None and self.agent is not None
        if past is None:
            # Unread, the call's idle turns so far are unknown: numbered from i0 again, a
            # reconnect's would repeat earlier ids, which JetStream drops unheard.
            log.error("call %s: the call's past could not be read; no idle handling on this "
                      "socket (max_duration_s still ends the call)", self.call_id)
            self.idle, self._idle_backlog = None, None
            return
        seen = {event.id for event in past}
        reconnected = False
        for event in past:
            idle.observe(event)
            if isinstance(event, CallStreamStarted) and event.stream_id != self.stream_id:
                reconnected = True  # this socket took over a live call: no greeting
        backlog, self._idle_backlog = self._idle_backlog or [], None
        for event in backlog:  # (no await since the last was appended: none is lost)
            if event.id not in seen:
                idle.observe(event)
        if not reconnected:
            idle.agent_text(GREETING_TURN, self.agent.settings.greeting)  # welcomeGreeting
        while not idle.ended:
            raise_if_cancelled()  # (a NATS call may have swallowed the teardown's cancel)
            await asyncio.sleep(TICK_S)
            action = idle.tick()
            if action is not None:
                await self._publish_idle(action)

    async def _past_events(self) -> list[Event] | None:
        """The call's events so far (JetStream), tried a few times; None if they can't be read."""
        assert self.call is not None
        try:
            async for attempt in retry_policy(attempts=3, initial=0.2, maximum=1.0):
                with attempt:
                    return await self.bus.replay_call(self.call_id, org_id=self.call.org_id)
        except Exception:
            log.exception("call %s: reading the call's events failed", self.call_id)
        return None

    async def _publish_idle(self, action: Action) -> None:
        """caller.idle: the brain says the prompt (or goodbye) in agent turn ``i<n>``."""
        idle, call = self.idle, self.call
        assert idle is not None and call is not None
        number, turn_id = idle.state.next_idle_turn()
        silent_s = round(idle.state.clock.silent_ms / 1000, 1)
        log.info("call %s: caller silent for %.1f s: %s (%s)", self.call_id, silent_s, action,
                 turn_id)
        # Through an outbox: one unacknowledged (a NATS blip) is published again under its id,
        # not lost, as its ordinal is taken and the prompt counted as asked.
        event = CallerIdle(
            id=uuid.uuid5(_ID_NAMESPACE, f"{self.call_id}/caller.idle/{number}"),
            org_id=call.org_id, call_id=self.call_id, turn_id=turn_id,
            action=action, silent_s=silent_s)
        await self.outbox.put(event)

    async def play(self, source: str) -> None:
        """Play an audio URL to the caller."""
        await self.send(_encoder.encode({"type": "play", "source": source}))

    async def clear(self) -> None:
        """Nothing to flush: Twilio stops its own speech when the caller interrupts."""

    async def mark(self, name: str) -> None:
        """ConversationRelay has no marks; progress comes from interrupt messages."""
        raise CommandError("ConversationRelay has no marks")

    async def send_digits(self, digits: str) -> None:
        """Play DTMF tones to the caller."""
        if not await self.send(_encoder.encode({"type": "sendDigits", "digits": digits})):
            raise CommandError("socket closed")

    async def end_locally(self, reason: str) -> None:
        """End the session; Twilio then asks the action URL, which hangs the call up."""
        handoff = _encoder.encode({"reason": reason}).decode()
        await self.send(_encoder.encode({"type": "end", "handoffData": handoff}))


def _now_ms() -> int:
    """The wall clock the keypad runs on (monotonic, in ms)."""
    return round(time.monotonic() * 1000)


def _type(message: RelayMessage) -> str:
    return str(type(message).__struct_config__.tag)
