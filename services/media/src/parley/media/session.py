"""One call's media: caller audio in → VAD, STT, turns; agent clauses in → TTS, frames out.

Inbound audio comes live over a core subscription on ``parley.audio.<call>.in``; what the
session missed — the start of the call on a first claim, the audio since the lease's resume
point on a take-over — is caught up from the AUDIO stream first, with no gap and no frame twice
(:mod:`parley.media.inbound`). Every inbound frame runs the cheap path inline (µ-law decode,
webrtcvad, the segmenter, the turn detector and the barge-in policy, all on the audio clock);
the recogniser runs in its own task and feeds finals back.

Events a successor could emit again after a take-over (speech.started/stopped,
transcript.final, turn.user_ended) get ids derived from the call, the turn number and their
ordinal in the turn, so JetStream's duplicate window drops the repeat: no transcript is emitted
twice. Partials are not emitted while catching up.

The call's events (``agent.say``, mark echoes, DTMF, the end) come the same way: a core
subscription, made first and buffering, then the call's past events read from the EVENTS stream
with an ephemeral pull consumer; the buffer is then drained without what the stream already
gave (by event id) and the session goes live. A per-call JetStream push consumer cost a
consumer on the server per live call and a slower hop for every clause.

Agent speech: ``agent.say`` clauses of a turn go to one TTS stream, in order; its audio is cut
into 20 ms frames and published to ``parley.audio.<call>.out`` at once (the carrier buffers and
plays in real time; what is ready together goes as one message), with marks after the first
frame, every 500 ms and after each clause (see :mod:`parley.media.playback`). While the lease is
unconfirmed (:mod:`parley.media.fencing`) it is paused, and goes on once a renewal confirms
it. Turns play one after another. A provider that fails is replaced by the next in the call's
chain mid-call (``media.provider_switched``); for STT the open turn's audio is replayed into the
new stream. One whose error was permanent (it refused the call for good: Deepgram's 1008 for
audio it cannot decode, Cartesia's model_sunsetted) is not tried again on the call; with none
left, ``media.provider_switched`` names no ``to_provider`` and the call is hung up (STT; TTS
when no provider of the chain opens). A recogniser that fails again soon after it was reopened
is reopened after a growing wait (the caller's audio held meanwhile), and recognition failing
so for 30 s is given up the same way (see :meth:`CallSession._stt_backoff`).

A caller silent while nothing is pending (no caller turn waiting for its answer, no agent audio
to play) is noticed on the audio clock (:mod:`parley.common.idle`): ``caller.idle`` asks the
brain for a prompt after the agent's ``idle_prompt_s``, and for the goodbye and hang-up after
``idle_hangup_s``. Its ids are stable per call and ordinal, and a successor goes on with the
silence its predecessor counted (from the call's past events), so a take-over repeats neither.

Keys the caller types (``call.dtmf``) are input too (:mod:`parley.common.keypad`): they end a
turn of their own, ``k<n>`` with reason ``dtmf`` and the keys as text, numbered apart from the
spoken ``t<n>`` (see :meth:`CallSession._end_turn_of_keys`). A successor rebuilds the keys being
typed, and the turns of keys published, from the call's past events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import msgspec
from nats.aio.msg import Msg

from parley.common.bus import Bus, Outbox, audio_subject, call_events, command_subject
from parley.common.bus.audio import MARK, encode_frame
from parley.common.configuration.models import AgentSettings
from parley.common.events import (
    AgentReplyPrepared,
    AgentSay,
    AgentSpeechFinished,
    AgentSpeechInterrupted,
    AgentSpeechProgress,
    AgentSpeechStarted,
    CallDtmf,
    CallEnded,
    CallerIdle,
    CallStreamStarted,
    Event,
    EventDecodeError,
    MediaProviderSwitched,
    SpeechStarted,
    SpeechStopped,
    ToolFailed,
    ToolRequested,
    TranscriptFinal,
    TranscriptPartial,
    TurnCompleted,
    TurnUserEnded,
    UsageRecorded,
    Word,
    decode,
)
from parley.common.idle import Action, IdleSettings, IdleState
from parley.common.keypad import Keypad, KeypadSettings
from parley.common.runtime import cancel_and_wait
from parley.common.words import normalize_words
from parley.media.audio.codec import ulaw_to_pcm16
from parley.media.audio.frames import ULAW_FRAME_BYTES, FrameAligner
from parley.media.fencing import Fence
from parley.media.inbound import InboundAudio
from parley.media.ownership import Leases, LeaseState, LeaseUsage
from parley.media.playback import (
    ECHO_GRACE_S,
    FRAME_MS,
    AgentTurnAudio,
    BargeIn,
    Interrupt,
    Pause,
    Resume,
    mark_seq,
)
from parley.media.providers.base import (
    Final,
    Partial,
    ProviderError,
    SttEvent,
    SttProvider,
    SttStream,
    TtsProvider,
    TtsStream,
    UtteranceEnd,
    WordTiming,
)
from parley.media.router import ProviderRouter
from parley.media.turns import Flush, TurnDetector, TurnEnd, TurnSettings, words_of
from parley.media.vad import SegmenterSettings, SpeechSegmenter, SpeechStart, SpeechStop, WebRtcVad

log = logging.getLogger(__name__)

_ID_NAMESPACE = uuid.UUID("6c1d2a39-4f0e-4c55-9d0e-7a7b8f0b8a11")
PREROLL_MS = 400  # resume this much audio before the open turn began
# A turn that ended at max wait keeps its audio (from its pre-roll) while its late words may
# still revise it, for a recogniser switch to replay, up to this much in all: past it (a long
# turn, or a recogniser that never ends the utterance), only the pre-roll, as for no turn.
LATE_REPLAY_MAX_FRAMES = 30 * 50
# Frames between remembered resume points (see _on_audio), at least.
CHECKPOINT_EVERY = 50
# A successor's catch-up starts this long before the resume frame was sent, so clock skew
# between hosts cannot make it miss the frame (the extra frames it reads are skipped).
RESUME_MARGIN_S = 1.0
# Caller audio goes to the recogniser 100 ms at a time, not per 20 ms frame: a vendor socket
# write (syscall, WebSocket framing, deflate) per frame was the largest per-frame cost of a
# session. Pending audio is sent before a flush, so turn ends are not delayed by it.
STT_BATCH_FRAMES = 5
# A recogniser that fails again soon after it was (re)opened is reopened after a wait, from
# STT_RETRY_INITIAL_S doubling to STT_RETRY_MAX_S; one that worked STT_RESET_AFTER_S before
# failing starts over (reopened at once). Recognition failing for STT_GIVE_UP_AFTER_S (of
# audio: the caller's, held meanwhile) is given up as when no recogniser opens (_switch_stt).
STT_RETRY_INITIAL_S = 0.2
STT_RETRY_MAX_S = 3.0
STT_RESET_AFTER_S = 5.0
STT_GIVE_UP_AFTER_S = 30.0
# While no recogniser hears the caller (a switch, or the wait before a reopen, under way), no
# words can confirm a barge-in: caller speech over the paused agent that lasts this long
# (VAD alone) interrupts it instead. Longer than a cough or a backchannel ("mm-hmm", "okay");
# a shorter one keeps the agent paused until a recogniser is back (see _barge_in_on_frame).
STT_DOWN_INTERRUPT_MS = 1200
# ... and a pause is not taken for a false alarm (no words within the 1.5 s) while no recogniser
# hears the caller, for this long after it began at most: the recogniser may not come back
# soon (one failing every stream at once is reopened every 3 s, until given up after 30 s).
STT_DOWN_PAUSE_MAX_S = 5.0
FILLER_DUE = object()  # a filler clause waited out with nothing after it (_unless_more)
# A recogniser that ends utterances itself (Deepgram's ``endpointing``) is asked to do so this
# much sooner than the turn detector's shortest end of turn (half the agent's endpointing
# silence, once the recogniser has ended the utterance). With the two equal, the final words
# arrived with the end of the turn, or after it: the brain could prepare nothing during the
# silence (see ``agent.reply_prepared``), and the turn's end waited for the recogniser's
# latency on top of the silence. The turn still ends on media's own silence, never sooner.
STT_ENDPOINTING_LEAD_MS = 100
# Agent audio ready at once (a synthesiser chunk) goes out up to this many frames per message:
# per-message costs (publish, the AUDIO stream, the gateway's relay, the telephony socket)
# were paid per 20 ms frame before, and nothing waits for a message to fill up.
OUT_CHUNK_FRAMES = 10
# The idle clock (parley.common.idle) is looked at every this many ms of inbound audio: once per
# frame would cost every call's every frame for timers counted in seconds.
IDLE_TICK_MS = 100
# At the end, what the session holds while its lease is unconfirmed waits this long at most for
# the lease's verdict: a renewal period, and one more for a renewal sent again.
FENCE_SETTLE_S = 3.0
# A caller turn held for the agent's turn to play (_hold_turn) goes out anyway once the agent
# has been silent within that turn this long (seconds of the call's audio): its last clause
# never came (the brain instance running it died, and nothing delivered the turn again; a
# synthesiser stuck). As long as a tool at its default timeout (10 s): the answer of a slow
# tool is still waited for, not cancelled by the brain for the caller's turn.
HOLD_QUIET_S = 10.0
# No synthesiser of the chain opening for a turn ends that turn unsaid; the call is hung up
# only when every synthesiser refused it for good, or none has delivered audio for this long
# since the first such turn (as STT_GIVE_UP_AFTER_S): one opening blip (a vendor's 503 twice,
# the local synthesiser full for a moment) does not hang up a call the next turn would serve.
TTS_GIVE_UP_AFTER_S = 30.0
# A call hung up for want of a synthesiser first lets the agent audio already out play: up to
# its length and this much more (the carrier's latency, its last mark's echo).
HANG_UP_GRACE_S = 1.0


def stable_id(call_id: str, *parts: object) -> uuid.UUID:
    """An event id that is the same whichever instance emits the event."""
    return uuid.uuid5(_ID_NAMESPACE, "/".join([call_id, *map(str, parts)]))


def rest_of_clause(clause: AgentSay, said: list[WordTiming]) -> AgentSay:
    """What is left of ``clause`` once the words ``said`` (its first ones) have been synthesised.

    The whole clause if they are not its first words as written (a synthesiser that spells
    things its own way): said twice rather than not at all.
    """
    if not said:
        return clause
    parts = clause.text.split(maxsplit=len(said))
    if normalize_words(" ".join(parts[:len(said)])) != normalize_words(
            " ".join(word.text for word in said)):
        return clause
    return msgspec.structs.replace(clause, text=parts[len(said)] if len(parts) > len(said) else "")


@dataclass
class SessionServices:
    """What every session of an instance shares."""

    bus: Bus
    leases: Leases
    stt: ProviderRouter[SttProvider]
    tts: ProviderRouter[TtsProvider]
    instance: str
    command_timeout_s: float = 1.0
    on_unknown_audio: Callable[[], None] = lambda: None
    on_event: Callable[[str], None] = lambda kind: None
    # Events a session held while its lease was unconfirmed, dropped: the lease was lost.
    on_fenced: Callable[[int], None] = lambda count: None
    # Seconds an inbound frame was late when its session handled it (see parley.media.inbound).
    on_inbound_frame: Callable[[float], None] = lambda delay_s: None
    # A caller turn held for the agent went out before the agent's turn had played: the agent
    # was silent within it for HOLD_QUIET_S (see CallSession._poll_hold).
    on_hold_expired: Callable[[], None] = lambda: None


@dataclass
class _HeldTurn:
    """A caller turn that ended over the agent's turn without interrupting it.

    Its ``turn.user_ended`` (``fields``, as the turn ended: its words and timings; or, a turn of
    keys, ``keys``) goes out once the agent's turn has played (see
    :meth:`CallSession._hold_turn`).
    """

    turn_id: str
    started_ms: int | None  # audio time its speech began: a successor resumes before it
    fields: dict[str, Any] = field(default_factory=dict)
    key: tuple[object, ...] = ()
    prepared: _AgentTurn | None = None  # the reply prepared for it, played when it goes out
    keys: tuple[str, float] | None = None  # a turn of keys: its keys and eou_delay_ms
    # A later turn revised it while held: the answer to it is stopped once it is out
    # (see :meth:`CallSession._supersede`).
    superseded: bool = False


@dataclass
class _AgentTurn:
    turn_id: str
    audio: AgentTurnAudio
    clauses: asyncio.Queue[AgentSay | None] = field(default_factory=asyncio.Queue)
    next_seq: int = 0
    waiting: dict[int, AgentSay] = field(default_factory=dict)
    closed: bool = False  # no more clauses will come
    interrupted: bool = False
    first_say_at: float = 0.0  # when queued for the speaker (a prepared reply: its turn's end)
    first_frame_at: float = 0.0
    # The synthesiser's own time to first audio: first clause handed to it → its first chunk.
    tts_asked_at: float = 0.0
    tts_answered_at: float = 0.0
    stream: TtsStream | None = None
    provider: str = ""
    spoken: bool = False  # the speaker is done with it (voiced, or skipped as interrupted)
    # A prepared reply (agent.reply_prepared): synthesised while the caller's turn is still
    # open, its audio held until that turn ends with ``words`` (then played) or not (dropped).
    held: bool = False
    words: str = ""
    prepared: AgentSay | None = None  # its first clause, from agent.reply_prepared
    discarded: bool = False
    synthesis: asyncio.Task[None] | None = None  # a prepared reply's own speaking task
    filler: AgentSay | None = None  # a filler clause taken, not yet waited out (see _feed)

    def close(self) -> None:
        """No more clauses will come: the speaker finishes with what it has."""
        if not self.closed:
            self.closed = True
            self.clauses.put_nowait(None)


def _turn_number(turn_id: str, prefix: str) -> int | None:
    """``n`` of a turn id ``<prefix><n>`` ("t3", "k1"), else None (another kind of turn)."""
    if turn_id[:1] == prefix and turn_id[1:].isdigit():
        return int(turn_id[1:])
    return None


class _Refused(set[str]):
    """A call's providers that refused it for good; ``on_new()`` runs for each one added.

    The router adds to it as the session does (a refusal at an open), so each is seen here.
    """

    def __init__(self, names: Iterable[str], on_new: Callable[[], None]) -> None:
        super().__init__(names)
        self._on_new = on_new

    def add(self, name: str) -> None:
        if name not in self:
            super().add(name)
            self._on_new()


class CallSession:
    """Runs one call until it ends, the lease is lost, or the instance stops."""

    def __init__(self, services: SessionServices, *, call_id: str, org_id: str, agent_id: str,
                 settings: AgentSettings, revision: int, resume: LeaseState | None = None,
                 ) -> None:
        self.s = services
        self.call_id = call_id
        self.org_id = org_id
        self.agent_id = agent_id
        self.settings = settings
        self.revision = revision
        self.resuming = resume is not None
        # This session's claim of the call: the lease revision it was given is unique to it (a
        # claim or a take-over is a write to the lease bucket), whichever instance it runs on.
        self._claim = revision
        self.lease = LeaseState(owner=services.instance, org_id=org_id, agent_id=agent_id,
                                turn_no=resume.turn_no if resume else 0,
                                resume_seq=resume.resume_seq if resume else 0,
                                resume_ms=resume.resume_ms if resume else 0,
                                resume_at=resume.resume_at if resume else 0.0)
        self.turn_no = self.lease.turn_no
        self._outbox = Outbox(services.bus, name=f"call {call_id}")
        # The call's events go out only while the lease is surely ours (parley.media.fencing).
        self._fence = Fence(self._outbox.put, name=f"call {call_id}",
                            on_dropped=services.on_fenced, on_confirmed=self._lease_confirmed)
        self.detector = TurnDetector(TurnSettings(
            endpointing_ms=settings.endpointing_ms,
            max_wait_ms=max(2500, settings.endpointing_ms * 3),
            backchannels=tuple(settings.backchannels)))
        self.vad = WebRtcVad(2)
        self.segmenter = SpeechSegmenter(SegmenterSettings())
        # Audio kept while no turn is open: the pre-roll, and the speech that confirms a start.
        self._preroll_frames = (PREROLL_MS + self.segmenter.settings.start_ms) // FRAME_MS
        self.barge_in = BargeIn(settings.interruption_mode, settings.interruption_sensitivity)
        self._aligner = FrameAligner(ULAW_FRAME_BYTES)
        self.stopped = asyncio.Event()
        self.end_reason = ""
        self.audio_ms = 0  # audio clock: end of the last inbound frame processed
        self._base_ms: int | None = None  # audio time of the segmenter's first frame
        # A successor's first frame is its resume frame, at this audio time of its predecessor's
        # clock, which it goes on with (see _on_audio).
        self._resume_ms = resume.resume_ms if resume and resume.resume_seq else None
        self._speech_start_ms: int | None = None
        self._speech_end_wall = 0.0
        # The ordinal of the next event of each kind numbered within the turn (_publish).
        self._ordinals: dict[str, int] = dict(resume.ordinals) if resume else {}
        # Where a successor can resume: (audio ms, frame seq, when the gateway sent the frame,
        # turn number, ordinals) at frames with no speech and no turn under way.
        self._checkpoints: deque[tuple[int, int, float, int, dict[str, int]]] = deque(
            maxlen=600)
        self._frames_seen = 0
        self._next_checkpoint = 1  # frames seen when the next resume point is due
        self._catching_up = self.resuming
        # STT
        self._stt_chain = services.stt.chain(settings.providers.get("stt", ""))
        self._stt_name = ""
        self._stt: SttStream | None = None
        self._stt_task: asyncio.Task[None] | None = None
        # Inbound audio of the open turn, from its pre-roll on (replayed on a switch).
        self._turn_audio: list[bytes] = []
        self._late_audio = False  # _turn_audio is a turn awaiting its late words (_end_turn)
        self._stt_pending: list[bytes] = []  # frames not yet sent to the recogniser
        # Bytes of caller audio received, and where the recogniser's stream began among them
        # (its first replayed byte): its timings are from its own start.
        self._stt_received = 0
        self._stt_origin = 0
        # Audio time up to which transcript.final has been published, and whether the stream
        # is a replay still hearing audio before it (a fallback's replay of the open turn):
        # what it says of that audio was published already (see _not_yet_transcribed).
        self._transcribed_ms = 0.0
        self._stt_repeating = False
        self._stt_seconds: dict[str, float] = {}
        self._stt_lock = asyncio.Lock()
        # A switch of recogniser is under way (its wait, its open): no recogniser hears the
        # caller. Frames are not sent meanwhile (the switch replays the open turn's audio to
        # the new stream), and barge-in does not wait for words (_barge_in_on_frame).
        self._stt_switching = False
        self._pause_began = 0.0  # when barge-in last paused the agent (monotonic)
        # Recognisers that failed this call for good (a permanent error: Deepgram's 1008 for
        # audio it cannot decode, a 4xx at the open): not tried again on it (_switch_stt).
        # Taken on from a predecessor (the lease carries them), and carried on to a successor.
        # Each one new is written to the lease at once (_Refused), not at its next renewal: an
        # owner dying in between left a successor to ask it again.
        self._stt_refused: set[str] = _Refused(
            resume.refused.get("stt", ()) if resume else (), self._refusal)
        # Consecutive mid-call failures: when the current stream opened, when the failures
        # began (None: none under way) and the wait before the next reopen (_stt_backoff).
        self.stt_retry_initial_s = STT_RETRY_INITIAL_S
        self.stt_retry_max_s = STT_RETRY_MAX_S
        self.stt_reset_after_s = STT_RESET_AFTER_S
        self.stt_give_up_after_s = STT_GIVE_UP_AFTER_S
        self._stt_opened_at = 0.0
        self._stt_failing_since: float | None = None
        self._stt_delay_s = 0.0
        # TTS
        self._tts_chain = services.tts.chain(settings.providers.get("tts", ""))
        # Likewise for synthesisers (a sunset model).
        self._tts_refused: set[str] = _Refused(
            resume.refused.get("tts", ()) if resume else (), self._refusal)
        self.tts_give_up_after_s = TTS_GIVE_UP_AFTER_S
        # When a turn first found no synthesiser to open, none having delivered audio since.
        self._tts_failing_since: float | None = None
        self._turns: dict[str, _AgentTurn] = {}
        # Turns done with (voiced and heard, or interrupted) are forgotten, but for their ids: a
        # late clause of one must not start it again. A long call keeps no audio of old turns.
        self._past_turns: set[str] = set()
        self._speak_queue: asyncio.Queue[_AgentTurn] = asyncio.Queue()
        self._current: _AgentTurn | None = None  # the turn whose audio is (or was last) out
        self._out_seq = 0
        # Agent audio is not sent while the lease is unconfirmed, until the next renewal
        # confirms it (_resume_out): another instance may play the call now.
        self._out_paused = False
        self._resuming_out: asyncio.Task[None] | None = None
        # The last clear barge-in asked of the gateway went unanswered (or unsent): the carrier
        # may still be playing what was cut, so the next cut or resume asks again.
        self._clear_unconfirmed = False
        self._tts_chars: dict[str, int] = {}  # characters sent to each synthesiser
        # Usage: this session's so far (its counters themselves: each renewal carries them in
        # the lease), and what a predecessor that did not end cleanly had used by its last
        # renewal (recorded as this session starts).
        self._usage = LeaseUsage(instance=services.instance, claim=self._claim,
                                 stt_seconds=self._stt_seconds, tts_chars=self._tts_chars)
        self.lease.usage = self._usage
        self._predecessor_usage = resume.usage if resume else None
        self._prepared: _AgentTurn | None = None  # the reply prepared for the open user turn
        # Caller turns that ended while an agent turn was on the air without interrupting it,
        # in order: published once it has played (_hold_turn).
        self._held_turns: list[_HeldTurn] = []
        self._hold_heard_ms = 0  # audio time the agent was last heard while turns are held
        self._hold_given_up: _AgentTurn | None = None  # its turn: silent too long, not waited for
        self._user_turn_ends: dict[str, float] = {}  # user turn id → wall time speech ended
        self._tasks: list[asyncio.Task[Any]] = []
        # Until the call's past events are read: agent clauses by turn, turns already voiced.
        self._history: dict[str, list[AgentSay]] | None = {}
        self._voiced: set[str] = set()
        self._voiced_done: set[str] = set()  # of those, the ones whose end is stored
        self._stored: set[uuid.UUID] = set()  # ids of the call's events read from its past
        self._live_events: list[Msg] | None = []  # live events held while the past is read
        self._subs: list[Any] = []
        self._inbound: InboundAudio | None = None
        # Idle handling: the caller's silence while nothing is pending (parley.common.idle).
        # The caller turn whose answer is not over starts as the greeting ("t0"), when the
        # agent has one: no idle until it has played.
        self._idle_state = IdleState(
            IdleSettings(prompt_ms=round(settings.idle_prompt_s * 1000),
                         hangup_ms=round(settings.idle_hangup_s * 1000)),
            unanswered="t0" if settings.greeting.strip() else "")
        self._idle = self._idle_state.clock
        self._idle_due_ms = 0.0 if self._idle.settings.enabled else math.inf
        # Keys the caller is typing: a turn of their own (parley.common.keypad), on the audio
        # clock; due is when it ends if no other key comes (inf: none pending).
        self._keypad = Keypad(KeypadSettings.of(settings))
        self._keys_due_ms = math.inf
        self._keys_last_ms = 0
        self._keys_wall = 0.0  # wall time of the last key
        self._sent_at = 0.0  # when the gateway sent the last inbound frame (0: none yet)
        self._key_turns = 0  # turns of keys so far (k1, k2, …)
        self._keys_unsent: str | None = None  # a turn of keys the past ended, not published
        # call.dtmf ids handled: one published again (its ack lost in a NATS outage) reaches
        # the live subscription again, though JetStream stores it once
        self._presses: set[uuid.UUID] = set()
        # Spoken turns a predecessor published (number → text, reason), and which revised which
        # (old number → new), from the call's past events (see _as_predecessor_published).
        self._predecessor_turns: dict[int, tuple[str, str]] = {}
        self._predecessor_revisions: dict[int, int] = {}
        # The spoken turn a predecessor heard words of but did not end (0: none), from the
        # call's past events: keys wait for this session to hear it again (_words_to_hear).
        self._words_turn = 0
        # Turns of keys that ended while the caller's words were still a turn in the making:
        # each keys, wall time and audio time of its last key (see _end_turn_of_keys).
        self._keys_after_words: list[tuple[str, float, int]] = []

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Hold the lease, open the recogniser, follow the call, and clean up when it is over."""
        bus = self.s.bus
        try:
            # While the lease still carries it (renewed as the predecessor left it).
            await self._record_predecessor_usage()
            # First: opening a recogniser can take longer than a lease is left unrenewed.
            await self.s.leases.hold(self.call_id, self.revision, self._lease_state,
                                     self._lease_lost, fence=self._fence)
            self._stt_name, self._stt = await self.s.stt.open(
                self._stt_chain, self._open_stt, refused=self._stt_refused)
            self._stt_opened_at = time.monotonic()
            self._stt_task = asyncio.create_task(self._recognise(), name=f"stt:{self.call_id}")
            self._stt_task.add_done_callback(self._recogniser_done)
            self._tasks.append(asyncio.create_task(self._speaker(), name=f"tts:{self.call_id}"))
            self._subs.append(await bus.nc.subscribe(
                call_events(self.call_id, self.org_id), cb=self._on_event_message))
            await bus.nc.flush()  # subscribed on the server: every later event reaches us live
            await self._read_past_events()
            await self._follow_audio()
            await self.stopped.wait()
        except ProviderError as exc:
            log.error("call %s: no speech recogniser: %s", self.call_id, exc)
            self.end_reason = "stt_unavailable"
        finally:
            await self._close()

    def stop(self, reason: str) -> None:
        """Ask the session to finish (idempotent)."""
        if not self.end_reason:
            self.end_reason = reason
        self.stopped.set()

    async def _close(self) -> None:
        if self._inbound is not None:
            await self._inbound.stop()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for turn in self._turns.values():
            if turn.stream is not None:
                with contextlib.suppress(Exception):
                    await turn.stream.cancel()
        for task in self._tasks:
            task.cancel()
        # Closed first, so the recogniser task still hears its last words, then cancelled.
        recogniser = self._stt
        await self._close_stt(recogniser)
        if self._stt_task is not None:
            self._stt_task.cancel()
        await asyncio.gather(*self._tasks, *([self._stt_task] if self._stt_task else []),
                             return_exceptions=True)
        if self._stt is not recogniser:  # a switch under way opened another meanwhile
            await self._close_stt(self._stt)
        # A caller turn held for the agent to finish (_hold_turn) goes out now: the call is
        # over (the brain answers no ended call, but the words are a turn on the record), or
        # another instance takes it on (it hears the turn again from before it: a repeat).
        if self._held_turns and self.end_reason != "lease_lost":
            try:
                await self._release_held_turns()
            except Exception:
                log.exception("call %s: publishing the turns held failed", self.call_id)
        # However the session ends (the call over, handed over on shutdown, the lease lost,
        # the recogniser gone), what it used was used: recorded before the call is let go.
        try:
            await self._record_usage()
        except Exception:
            log.exception("call %s: recording usage failed", self.call_id)
        # What was held while the lease was unconfirmed goes out only if the lease proves ours;
        # lost, another instance has the call and publishes for it.
        if self.end_reason == "lease_lost":
            self._fence.drop()
        else:
            await self._fence.settle(FENCE_SETTLE_S)
        await self._outbox.drain()  # stored before a successor reads the call's events
        self.lease.usage = None  # recorded: a successor has none of it to record
        revision = await self.s.leases.let_go(self.call_id)
        if revision is not None:
            self.revision = revision
        if self.end_reason == "call_ended":
            await self.s.leases.release(self.call_id, self.revision)
        elif self.end_reason in ("stt_unavailable", "stt_failed", "tts_failed"):
            # No recogniser can hear the caller (or no synthesiser speak for the agent). Left
            # held in this instance's name, the lease was taken by no one (an instance takes
            # over none of its own; the bucket's TTL then deletes it): the agent stayed deaf
            # for the rest of the call. The call ends (call.ended, reason error; which
            # provider failed, and why, is media.provider_switched to none); if the gateway
            # cannot end it, any instance (this one too) takes it up anew.
            log.error("call %s: no speech %s; hanging up", self.call_id,
                      "synthesiser can speak for the agent" if self.end_reason == "tts_failed"
                      else "recogniser can hear the caller")
            if await self._command("hangup", {"reason": "error"}):
                await self.s.leases.release(self.call_id, self.revision)
            else:
                self._update_lease()
                await self.s.leases.release(self.call_id, self.revision, hand_over=self.lease)
        elif self.end_reason == "shutdown":
            self._update_lease()
            await self.s.leases.release(self.call_id, self.revision, hand_over=self.lease)

    @staticmethod
    async def _close_stt(stream: SttStream | None) -> None:
        if stream is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.close(), 5)

    def _lease_state(self) -> LeaseState:
        self._update_lease()
        return self.lease

    def _refusal(self) -> None:
        """A provider refused the call for good: the lease says so at once (Leases.renew_soon)."""
        if self.s.leases is not None:
            self.s.leases.renew_soon(self.call_id)

    def _lease_lost(self) -> None:
        log.warning("call %s: lease lost; another instance has the call", self.call_id)
        self.stop("lease_lost")

    def _update_lease(self) -> None:
        """Resume a successor at the last resume point before the open turn's pre-roll.

        With the turn number and ordinals of that point, not the latest: it detects again what
        came after it, and the events it publishes of that get the ids they had, so they are
        dropped as repeats. (Counted from the latest, the turn that ended since came again as
        the next one, and a noise's events under the same number shifted the ordinals.)
        """
        # A turn that ended at max wait, its late words still to come, is as good as open: a
        # successor resumed after it never hears those words, and the turn keeps the stale
        # ones. Resumed before it, the successor hears it again and revises it (_end_turn).
        # So is a turn held for the agent to finish (_hold_turn): only this session has it.
        starts = [ms for ms in (self.detector.turn_started_ms,
                                self.detector.revisable_started_ms,
                                next((held.started_ms for held in self._held_turns
                                      if held.started_ms is not None), None))
                  if ms is not None]
        target = (min(starts) if starts else self.audio_ms) - PREROLL_MS
        lease = self.lease
        lease.refused = {kind: sorted(names) for kind, names in (
            ("stt", self._stt_refused), ("tts", self._tts_refused)) if names}
        for ms, seq, sent_at, turn_no, ordinals in self._checkpoints:
            if ms > target:
                break
            lease.resume_seq, lease.resume_ms, lease.resume_at = seq, ms, sent_at
            lease.turn_no, lease.ordinals = turn_no, ordinals

    # ------------------------------------------------------------------ inbound audio

    async def _follow_audio(self) -> None:
        lease = self.lease
        resume = lease.resume_seq > 0
        self._inbound = InboundAudio(
            self.s.bus, self.call_id, self._on_audio,
            after_seq=lease.resume_seq - 1 if resume else -1,
            since=lease.resume_at - RESUME_MARGIN_S if resume else None,
            on_delay=self.s.on_inbound_frame, on_invalid=self.s.on_unknown_audio)
        await self._inbound.start()

    async def _on_audio(self, ulaw: bytes, seq: int, ts_ms: int, sent_at: float,
                        behind: bool) -> None:
        if self.stopped.is_set():
            self.s.on_unknown_audio()
            return
        self._catching_up = behind
        if self._base_ms is None and self._resume_ms is not None:
            # The call's audio clock is the predecessor's, where it left off: a frame's own
            # timestamp starts at 0 again on each of the call's streams (a carrier stream
            # restarted), so taken as the clock, the successor's offset_ms went back in the call.
            ts_ms = self._resume_ms
        if self._base_ms is None and self._keypad.pending:
            self._place_keys(ts_ms, sent_at)
        self._sent_at = sent_at
        self._frames_seen += 1
        if self._frames_seen >= self._next_checkpoint and self.segmenter.silent and (
                not self.detector.in_turn):
            # A resume point only where nothing is under way: a successor starting there, with
            # no speech or turn open, is where this session was, and detects what follows as
            # it did. On the session's audio clock, as the open turn's start is: a frame's own
            # timestamp starts at 0 again on each of the call's streams.
            at = ts_ms if self._base_ms is None else self.audio_ms
            self._checkpoints.append((at, seq, sent_at, self.turn_no, dict(self._ordinals)))
            self._next_checkpoint = self._frames_seen + CHECKPOINT_EVERY
        try:
            await self._inbound_frame(ulaw, ts_ms)
        except Exception:
            log.exception("call %s: inbound frame failed", self.call_id)

    async def _inbound_frame(self, ulaw: bytes, ts_ms: int) -> None:
        if self._base_ms is None:
            self._base_ms = ts_ms
        await self._stt_send(ulaw)
        now = time.monotonic()
        for frame in self._aligner.push(ulaw):
            boundary = self.segmenter.push(self.vad.is_speech(ulaw_to_pcm16(frame)))
            self.audio_ms = self._base_ms + self.segmenter.position_ms
            if isinstance(boundary, SpeechStart):
                at = self._base_ms + boundary.at_ms
                self._speech_start_ms = at
                self.barge_in.speech_started(new_turn=not self.detector.in_turn)
                if not self.detector.in_turn:  # the turn's audio: from its pre-roll on
                    del self._turn_audio[:-self._preroll_frames]
                self.detector.speech_started(at)
                self._idle.reset()
                await self._publish(SpeechStarted, "speech.started", offset_ms=at)
            elif isinstance(boundary, SpeechStop):
                at = self._base_ms + boundary.at_ms
                self._speech_start_ms = None
                self._speech_end_wall = time.time() - (self.audio_ms - at) / 1000
                self.detector.speech_stopped(at)
                await self._publish(SpeechStopped, "speech.stopped", offset_ms=at)
            await self._barge_in_on_frame(now)
            await self._poll_turn()
        if self._held_turns:
            await self._poll_hold()
        if self._keys_after_words and not self.detector.text and not self._words_to_hear() and (
                not self._held_turns):
            await self._publish_keys_after_words()
        if self.audio_ms >= self._keys_due_ms:
            keys = self._keypad.poll(self.audio_ms)
            self._rearm_keys()
            await self._end_turn_of_keys(keys)
        if self.audio_ms >= self._idle_due_ms:
            await self._idle_tick()

    async def _stt_send(self, ulaw: bytes) -> None:
        self._stt_received += len(ulaw)
        self._turn_audio.append(ulaw)
        if not self.detector.in_turn and len(self._turn_audio) > 2 * self._preroll_frames and (
                not self._late_turn_kept()):
            del self._turn_audio[:-self._preroll_frames]  # once per pre-roll's worth of frames
            self._late_audio = False  # (a late turn's audio, once cut, is not replayed)
        self._stt_pending.append(ulaw)
        if len(self._stt_pending) >= STT_BATCH_FRAMES:
            await self._stt_flush()

    def _late_turn_kept(self) -> bool:
        """Whether the audio kept is a turn awaiting its late words, from its pre-roll on.

        A switch of recogniser replays it, as it does the open turn's (_switch_stt_to_next):
        the late words the failed one still owed come from the new one. Kept from the turn's
        start (trimmed to its pre-roll when its speech began, not since), until the revision
        is decided, the caller speaks again, or LATE_REPLAY_MAX_FRAMES.
        """
        return self._late_audio and self.detector.revisable_started_ms is not None and (
            len(self._turn_audio) <= LATE_REPLAY_MAX_FRAMES)

    async def _stt_flush(self) -> None:
        if not self._stt_pending or self._stt_switching:
            # During a switch the frames stay pending, and the caller's next frames are handled
            # meanwhile: VAD, turns and barge-in go on. (They waited on the switch's lock, for
            # its backoff and open: up to 3 s and more in which speech over the agent did not
            # even pause it.) The switch then replays the open turn's audio, these frames
            # included, and clears them; frames after that are sent after the replay.
            return
        audio = b"".join(self._stt_pending)
        self._stt_pending.clear()
        stream = self._stt
        async with self._stt_lock:
            # Taken for a stream a switch then replaced (while it held the lock: its wait, its
            # reopen), it is in that switch's replay of the open turn (its latest audio); sent
            # again after it, the new stream heard it twice and its timings were off by as much.
            if self._stt is not None and self._stt is stream:
                try:
                    await self._stt.send(audio)
                except Exception as exc:  # the recogniser task notices and switches
                    log.debug("call %s: stt send failed: %s", self.call_id, exc)
                else:
                    self._stt_sent(len(audio))

    def _stt_sent(self, size: int) -> None:
        """``size`` bytes of audio reached the recogniser: its provider bills them."""
        self._stt_seconds[self._stt_name] = (
            self._stt_seconds.get(self._stt_name, 0.0) + size / 8000)

    async def _poll_turn(self) -> None:
        if self._stt_switching:
            # No recogniser hears the caller: the open turn's words are not known, and it does
            # not end. Ended (at max wait on the failed stream's partial, or dropped as a noise
            # with its words cleared), its audio was forgotten, the switch replayed only a
            # pre-roll, and what the caller said during the wait reached no recogniser. Its
            # end is decided once one hears the turn replayed (a long wait ends it at once).
            return
        # Whether the agent speaks is asked only of a turn that ends (each frame, it cost more
        # than the poll).
        result = self.detector.poll(self.audio_ms, agent_speaking=self._agent_now)
        if isinstance(result, Flush):
            await self._stt_flush()
            if self._stt is not None and not self._stt_switching:  # (asked again of the next)
                with contextlib.suppress(Exception):
                    await self._stt.finalize()
        elif isinstance(result, TurnEnd):
            await self._end_turn(result)

    async def _end_turn(self, end: TurnEnd) -> None:
        if not end.revises:
            end = self._as_predecessor_published(end)
        revises = f"t{self.turn_no}" if end.revises else ""
        if revises:
            await self._supersede(revises)
        self.turn_no += 1
        self._ordinals = {}
        turn_id = f"t{self.turn_no}"
        self._idle_state.awaiting(turn_id)
        self._idle.reset()
        # A turn ended at max wait: its audio kept for its late words (_late_turn_kept).
        self._late_audio = not end.revises and self.detector.revisable_started_ms is not None
        if not self._late_audio:
            self._turn_audio = []
        held = self._holds_for_agent(end.text)
        prepared = self._prepared
        if prepared is not None and (prepared.turn_id != turn_id or prepared.words != (
                normalize_words(end.text))):
            await self._discard_prepared()
            prepared = None
        self._prepared = None
        first = prepared.prepared if prepared is not None else None
        fields = dict(turn_id=turn_id, text=end.text, reason=end.reason,
                      eou_delay_ms=float(end.eou_delay_ms), stt_final_ms=float(end.stt_final_ms),
                      prepared_text=first.text if first else "",
                      prepared_last=first.last if first else False, revises=revises)
        if held:
            self._hold_turn(_HeldTurn(turn_id, end.started_ms, fields, (self.turn_no,),
                                      prepared))
            return
        self._user_turn_ends[turn_id] = self._speech_end_wall
        await self._publish(TurnUserEnded, "turn.user_ended", key=(self.turn_no,), **fields)
        if prepared is not None:
            self._play_prepared(prepared)

    def _holds_for_agent(self, text: str | None) -> bool:
        """Whether a caller turn (words ``text``, or keys: None) that ends now waits for the agent.

        The rule: a caller turn that ends while the agent's turn is on the air (speaking,
        paused, or silent within a turn it has not said all of: :meth:`_agent_now`) and did
        not interrupt it is held until that turn has played (:meth:`_hold_turn`); so is one
        behind a turn held. A turn that interrupted (speech in mode speech or any with words
        enough, a key in mode dtmf or any) cut the agent's turn off: none is on the air then.
        Nor is one held that would have interrupted had the agent been audible, said while it
        is silent within its turn ("Let me check that." and its tools slow; "Actually, make it
        Saturday."): barge-in acts only on audio the caller hears, and held, the caller's
        change of mind waited for an answer to what they no longer asked. Except a turn the
        hold gave up waiting for (:meth:`_poll_hold`).
        """
        if self._held_turns:
            return True
        if not self._agent_now() or (
                self._hold_given_up is not None and self._current is self._hold_given_up):
            return False
        if self._agent_audible():
            return True
        if text is None:
            return not self.barge_in.by_dtmf
        return not (self.barge_in.by_speech and self.detector.backchannels.content_words(
            text) >= self.barge_in.thresholds.min_words)

    def _hold_turn(self, held: _HeldTurn) -> None:
        """Hold a caller turn that ended over the agent's turn without interrupting it.

        The mode did not let it interrupt (speech in mode none or dtmf, keys in mode none or
        speech), or it was not enough to (words too few for the sensitivity, after a pause
        that was resumed): the agent neither stopped nor was cut off. Published at once, the
        turn made the brain cancel the agent's turn it was still writing for the newer one,
        and the caller heard an answer stop mid-sentence. Like a person who does not let
        themselves be interrupted, the agent finishes its turn and then answers: the turn goes
        out once the agent's turn has played, or been cut off (a key in mode dtmf, words in
        mode speech), with its words and its timings as it ended, and the reply prepared for
        it (still held) plays then; a later turn waits behind it. A backchannel is no turn, as
        ever. Not for ever: see :meth:`_poll_hold`.
        """
        log.info("call %s: turn %s held until the agent's turn has played (mode %s)",
                 self.call_id, held.turn_id, self.barge_in.mode)
        if not self._held_turns:
            self._hold_heard_ms = self.audio_ms
        self._held_turns.append(held)

    async def _poll_hold(self) -> None:
        """Release the turns held once the agent's turn has played, or has gone quiet too long.

        Quiet: silent within its turn (nothing playing or paused) for HOLD_QUIET_S of the
        call's audio. Its last clause may never come (the brain instance running it died and
        nothing delivered the turn again; a synthesiser stuck): waited for, the caller's words
        were never answered. They go out then (logged, counted), and that agent turn holds no
        later caller turn.
        """
        if not self._agent_mid_turn():
            await self._release_held_turns()
        elif self._agent_audible():
            self._hold_heard_ms = self.audio_ms
        elif self.audio_ms - self._hold_heard_ms >= HOLD_QUIET_S * 1000:
            current = self._current
            log.warning("call %s: agent turn %s silent for %.0f s with caller turns held (%s): "
                        "they go out", self.call_id, current.turn_id if current else "?",
                        HOLD_QUIET_S, ", ".join(held.turn_id for held in self._held_turns))
            self._hold_given_up = current
            self.s.on_hold_expired()
            await self._release_held_turns()

    async def _release_held_turns(self) -> None:
        """Publish the turns held for the agent (see :meth:`_hold_turn`), in order.

        The answer's voice-to-voice time counts from now, when the agent's turn stopped
        playing: the wait before is the agent finishing, not the answer's latency.
        """
        held, self._held_turns = self._held_turns, []
        for turn in held:
            if turn.keys is not None:
                await self._publish_keys(turn.keys[0], time.time(), turn.keys[1])
                continue
            self._user_turn_ends[turn.turn_id] = time.time()
            await self._publish(TurnUserEnded, "turn.user_ended", key=turn.key, **turn.fields)
            if turn.superseded:  # revised by a later turn while held: now it is out
                await self._supersede(turn.turn_id)
            elif turn.prepared is not None and not turn.prepared.discarded:
                self._play_prepared(turn.prepared)

    def _as_predecessor_published(self, end: TurnEnd) -> TurnEnd:
        """A turn heard again after a take-over, numbered as its predecessor published it.

        A predecessor's turn that ended at max wait was waiting for its late words, which
        this session's recogniser hears again (the lease resumes before that turn): saying
        more than the turn did, or its latest revision, they revise that; else the turn is the
        one published (again under its id: dropped as a repeat), revisions and all.
        """
        number = self.turn_no + 1
        published = self._predecessor_turns.get(number)
        if published is None or published[1] != "max_wait":
            return end
        while number in self._predecessor_revisions:
            number = self._predecessor_revisions[number]
        text = self._predecessor_turns[number][0]
        if len(words_of(end.text)) > len(words_of(text)) and (
                not self.detector.backchannels.only_backchannel(end.text)):
            self.turn_no = number
            return replace(end, revises=True)
        self.turn_no = number - 1
        return end

    def _press(self, key: str, at: float) -> str | None:
        """A key the caller pressed at ``at`` (wall time): the turn of keys it ends, if any."""
        self._keys_last_ms, self._keys_wall = self._key_ms(at), at
        keys = self._keypad.press(key, self._keys_last_ms)
        self._rearm_keys()
        return keys

    def _rearm_keys(self) -> None:
        """When the keys pending make their turn if no other key comes (inf: none pending)."""
        due = self._keypad.due_ms
        self._keys_due_ms = math.inf if due is None else due

    def _key_ms(self, at: float) -> int:
        """Where a key pressed at wall time ``at`` falls on the audio clock.

        Live, now. A successor catching up the audio since its resume point is behind the
        keys by as much as the take-over took: placed at the frame in hand, they fell due
        within the backlog, and a number being typed was cut in two. Keys from before the
        first frame are placed when it comes (:meth:`_place_keys`).
        """
        if not self._catching_up or not self._sent_at:
            return self.audio_ms
        return self.audio_ms + max(0, round((at - self._sent_at) * 1000))

    def _place_keys(self, ts_ms: int, sent_at: float) -> None:
        """Place the keys pending before the first frame on the audio clock it starts.

        By when the last one was pressed: the frame is at ``ts_ms``, sent at ``sent_at``.
        """
        at_ms = ts_ms + round((self._keys_wall - sent_at) * 1000)
        pending = self._keypad.pending
        self._keypad.clear()
        for key in pending:  # (no end key among them: it would have ended their turn)
            self._keypad.press(key, at_ms)
        self._keys_last_ms = at_ms
        self._rearm_keys()

    async def _end_turn_of_keys(self, keys: str | None) -> None:
        """The keys typed end a caller turn of their own: ``k<n>``, reason ``dtmf``.

        Numbered apart from the spoken turns: a successor re-detects those from the audio after
        its resume point, but knows the keys only from the call's events. Sharing ``t<n>``, a
        turn of keys it learnt of that way would shift the spoken turns it re-detects onto
        other numbers, and their events onto other ids.

        A spoken turn open meanwhile, with words heard ("my account number is", then 1234#),
        goes on, and these keys wait for it to end: published at once, they would be answered
        first, and the words after them would then read to the model as said after the keys.
        """
        if not keys:
            return
        self._rearm_keys()  # keys typed after these (a successor's past) are still pending
        if self.detector.text or self._words_to_hear():
            self._keys_after_words.append((keys, self._keys_wall, self._keys_last_ms))
            return
        await self._keys_ended(keys, self._keys_wall, self._keys_last_ms)

    async def _keys_ended(self, keys: str, wall: float, last_ms: int) -> None:
        """A turn of keys goes out, or is held for the agent's turn as words are.

        See :meth:`_holds_for_agent`: keys that did not cut the agent off (mode none or speech:
        "for sales press 1, ..." with 1 pressed early) made the brain cancel its turn.
        """
        self.detector.turn_of_keys()
        eou_delay_ms = float(self.audio_ms - last_ms)
        if self._holds_for_agent(None):
            self._hold_turn(_HeldTurn(f"keys {keys!r}", None, keys=(keys, eou_delay_ms)))
            return
        await self._publish_keys(keys, wall, eou_delay_ms)

    def _words_to_hear(self) -> bool:
        """Whether words a predecessor heard, of a turn it did not end, are still to come.

        This session hears them again from the audio after its resume point, which the keys
        typed after them wait for: until it ends that turn, while it catches up or has a turn
        open (a turn it does not make of them, no words heard this time, holds no keys for ever).
        """
        if self.turn_no >= self._words_turn or not (
                self._catching_up or self.detector.in_turn):
            self._words_turn = 0
            return False
        return True

    async def _publish_keys_after_words(self) -> None:
        """The spoken turn the keys waited for is over (published, or no turn after all)."""
        held, self._keys_after_words = self._keys_after_words, []
        for keys, wall, last_ms in held:
            await self._keys_ended(keys, wall, last_ms)

    async def _publish_keys(self, keys: str, wall: float, eou_delay_ms: float) -> None:
        """A turn of keys goes out: its answer's voice-to-voice counts from ``wall``."""
        self._key_turns += 1
        turn_id = f"k{self._key_turns}"
        self._idle_state.awaiting(turn_id)
        self._idle.reset()
        self._user_turn_ends[turn_id] = wall
        await self._publish(TurnUserEnded, "turn.user_ended", turn_id=turn_id, text=keys,
                            reason="dtmf", eou_delay_ms=eou_delay_ms, key=("k", self._key_turns))

    async def _supersede(self, turn_id: str) -> None:
        """The caller's turn ``turn_id`` is replaced: the answer to it stops, or never starts.

        What of it was played stays heard (``agent.speech.interrupted``); the brain cancels it
        on the newer turn. A turn still held for the agent (:meth:`_hold_turn`; the revision is
        held behind it) has no answer yet but perhaps a reply prepared for it, dropped unheard
        now; its interruption waits until the turn itself is out (:meth:`_release_held_turns`).
        Published at once, the call's events had the answer to a turn interrupted before that
        turn had ended.
        """
        held = next((held for held in self._held_turns if held.turn_id == turn_id), None)
        if held is not None:
            held.superseded = True
            self._past_turns.add(turn_id)  # what the brain sends for it is not spoken
            if held.prepared is not None:
                await self._drop_prepared(held.prepared)
            return
        turn = self._turns.get(turn_id)
        if turn is None:  # the brain has not answered yet: what it still sends is not spoken
            self._past_turns.add(turn_id)
            if turn_id in self._voiced_done:
                # A predecessor played the answer out or saw it cut off (a successor revising
                # that turn): what was heard of it is its events' to say.
                return
            turn = _AgentTurn(turn_id, AgentTurnAudio(turn_id), spoken=True)
            if turn_id in self._voiced:
                # Still playing on the carrier, none of its audio known here: cleared, or it
                # played on before the next answer and never ended. What was heard of it is
                # unknown, so nothing is claimed.
                await self._command("clear", {})
        elif turn.audio.finished:
            return
        turn.close()
        await self._interrupt(turn, time.monotonic())

    # ------------------------------------------------------------------ recognition

    async def _open_stt(self, provider: SttProvider) -> SttStream:
        ends_turn_ms = self.detector.settings.utterance_end_ms
        return await provider.open(
            language=self.settings.language,
            endpointing_ms=max(10, ends_turn_ms - STT_ENDPOINTING_LEAD_MS))

    async def _recognise(self) -> None:
        while not self.stopped.is_set():
            stream = self._stt
            assert stream is not None
            delivered = False
            try:
                async for event in stream.events():
                    if not delivered:  # only now has the provider done its job (router.py)
                        delivered = True
                        self.s.stt.health[self._stt_name].success()
                    await self._on_stt(event)
                if not delivered:
                    self.s.stt.health[self._stt_name].success()
                return  # closed by us
            except ProviderError as exc:
                if self.stopped.is_set():
                    return
                await self._switch_stt(str(exc), error=exc)
            except Exception as exc:
                log.exception("call %s: recogniser failed", self.call_id)
                await self._switch_stt(repr(exc))

    def _recogniser_done(self, task: asyncio.Task[None]) -> None:
        """A recogniser task that died leaves the call deaf: the session ends, said why."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("call %s: recogniser task failed; ending the session", self.call_id,
                  exc_info=task.exception())
        self.stop("stt_failed")

    async def _switch_stt(self, reason: str, *, error: ProviderError | None = None) -> None:
        self._stt_switching = True
        try:
            await self._switch_stt_to_next(reason, error)
        finally:
            self._recognition_back()

    def _recognition_back(self) -> None:
        """A switch of recogniser is over: frames go to it again, and words can come again.

        A pause of the agent while none heard the caller waits for words from now on (its
        recogniser hears the open turn replayed): timed from the pause, the caller's words
        had no time to come before it was taken for a false alarm.
        """
        if self._stt_switching:
            self._stt_switching = False
            if self.barge_in.paused_at is not None:
                self.barge_in.paused_at = time.monotonic()

    async def _switch_stt_to_next(self, reason: str, error: ProviderError | None) -> None:
        failed = self._stt_name
        # Once, permanent or not, as at an open; not the call's own refusal (router.py).
        self.s.stt.health[failed].failure(error)
        if error is not None and error.permanent:
            # It refused this call for good (its audio, its settings): asked again, it refuses
            # again. Reopened, Deepgram's 1008 for audio it cannot decode came back at once, for
            # the rest of the call: a reconnect loop billing a socket each time.
            self._stt_refused.add(failed)
            log.warning("call %s: stt %s refused the call for good; not tried again on it (%s)",
                        self.call_id, failed, reason)
        wait_s, failing_s = self._stt_backoff()
        async with self._stt_lock:
            if self._stt is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._stt.close(), 2)
            if failing_s >= self.stt_give_up_after_s:
                # Failing again and again for that long (each stream failing soon after it
                # opened): as good as no recogniser, however often one still opens. Reopened
                # for ever, the caller talked to an agent that heard nothing.
                log.error("call %s: recognition failing for %.0f s (stt %s: %s); giving up",
                          self.call_id, failing_s, failed, reason)
                await self._no_recogniser(failed, f"{reason}; recognition failing for "
                                                  f"{failing_s:.0f} s")
                return
            if wait_s:
                # The caller's frames go on being handled meanwhile, held back from the
                # recogniser: the new stream hears them in the open turn's replay.
                log.warning("call %s: stt %s failed again soon after it opened; trying again in "
                            "%.1f s (%s)", self.call_id, failed, wait_s, reason)
                await asyncio.sleep(wait_s)
            try:
                try:
                    self._stt_name, self._stt = await self.s.stt.open(
                        self._stt_chain, self._open_stt, after=failed,
                        refused=self._stt_refused)
                except ProviderError as exc:
                    # No fallback could take the call (failed, or full: every call moving to
                    # a local model at once would starve the process): the whole chain again,
                    # the provider that just failed included unless it refused the call for
                    # good, before giving the call up.
                    log.warning("call %s: no recogniser after %s (%s); trying the chain again",
                                self.call_id, failed, exc)
                    self._stt_name, self._stt = await self.s.stt.open(
                        self._stt_chain, self._open_stt, refused=self._stt_refused)
            except ProviderError as exc:
                log.error("call %s: every recogniser failed: %s", self.call_id, exc)
                await self._no_recogniser(failed, reason)
                return
            self._stt_opened_at = time.monotonic()
            self._stt_pending.clear()  # the open turn's audio (replayed next) includes it
            # A turn that ended at max wait and awaits its late words is replayed as an open
            # one: the failed recogniser owed them, and only the pre-roll replayed, they never
            # came and the turn kept its stale text.
            late = not self.detector.in_turn and self._late_turn_kept()
            if not self.detector.in_turn and not late:
                del self._turn_audio[:-self._preroll_frames]  # no turn yet: its pre-roll
                self._late_audio = False
            # its words again, replayed
            self.detector.recognition_restarted(self.audio_ms, late_replayed=late)
            # What the open turn said so far. Frames arriving meanwhile are pending: sent once,
            # after it (the list itself grew under the replay, and they went twice).
            replay = self._turn_audio[:]
            self._recognition_back()  # frames from here on go after the replay (the lock)
            self._stt_origin = self._stt_received - sum(map(len, replay))
            self._stt_repeating = self._transcribed_ms > self._stt_audio_ms(0)
            try:
                for chunk in replay:
                    await self._stt.send(chunk)
                    self._stt_sent(len(chunk))  # heard again, and billed again: it was sent
            except Exception as exc:  # as in _stt_flush: its events() fails, and we switch again
                log.warning("call %s: replaying the turn to stt %s failed: %s", self.call_id,
                            self._stt_name, exc)
        if self._stt_name == failed:
            log.warning("call %s: stt %s reopened (%s)", self.call_id, failed, reason)
            return
        log.warning("call %s: stt %s → %s (%s)", self.call_id, failed, self._stt_name, reason)
        # Through the outbox: a slow or failing publish must not end the recogniser task.
        await self._fence.put(MediaProviderSwitched(
            org_id=self.org_id, call_id=self.call_id, kind="stt", from_provider=failed,
            to_provider=self._stt_name, reason=reason[:500]))

    def _stt_backoff(self) -> tuple[float, float]:
        """The wait before reopening after a mid-call failure, and how long it has been failing.

        A failure soon after the stream (re)opened continues the failures before it: reopened
        at once each time, a provider that opens and then fails every stream at once (Deepgram
        closing 1011 on each, with no fallback; its breaker open, the router still tries it
        last) was reconnected in a tight loop for the rest of the call. A stream that worked
        ``stt_reset_after_s`` first ends them: its failure is reopened at once, as one alone.
        """
        now = time.monotonic()
        if self._stt_failing_since is None or (
                now - self._stt_opened_at >= self.stt_reset_after_s):
            self._stt_failing_since, self._stt_delay_s = now, 0.0
            return 0.0, 0.0
        self._stt_delay_s = min(max(self._stt_delay_s * 2, self.stt_retry_initial_s),
                                self.stt_retry_max_s)
        return self._stt_delay_s, now - self._stt_failing_since

    async def _no_recogniser(self, failed: str, reason: str) -> None:
        """No recogniser can hear the caller: said in the call's events, and the call ends."""
        self._stt = None
        # Said in the call's events too: the hang-up that follows (reason error) does not say
        # which recogniser failed, or why.
        await self._fence.put(MediaProviderSwitched(
            org_id=self.org_id, call_id=self.call_id, kind="stt", from_provider=failed,
            to_provider="", reason=reason[:500]))
        self.stop("stt_failed")

    async def _on_stt(self, event: SttEvent) -> None:
        # Words for the turn that ended at max wait (a recogniser slower than that): recorded
        # as that turn's, but neither a new turn nor the caller talking over the agent.
        late = self.detector.late
        if isinstance(event, Partial):
            self.detector.partial(event.text)
            if late:
                return
            if not self._catching_up and not self._stt_repeating:
                await self.s.bus.publish(TranscriptPartial(
                    org_id=self.org_id, call_id=self.call_id, text=event.text,
                    utterance_id=f"t{self.turn_no + 1}"))
            await self._barge_in_on_words()
        elif isinstance(event, Final):
            # A final for audio before the caller spoke again, delivered after that (a
            # recogniser slower than the max wait), is still the late turn's.
            heard_ms = self._stt_audio_ms(event.end_s)
            late = self.detector.late_for(heard_ms)
            self.detector.final(event.text, self.audio_ms, speech_final=event.speech_final,
                                heard_ms=heard_ms)
            new = self._not_yet_transcribed(event, heard_ms)
            if new is not None:
                latency = (time.time() - self._speech_end_wall) * 1000 if (
                    self._speech_start_ms is None and self._speech_end_wall) else 0.0
                await self._publish(
                    TranscriptFinal, "transcript.final", text=new.text,
                    utterance_id=f"t{self.turn_no if late else self.turn_no + 1}",
                    words=[Word(w.text, w.start, w.end) for w in new.words],
                    confidence=new.confidence, provider=self._stt_name,
                    latency_ms=round(max(latency, 0.0), 1))
            if not late:  # late words revise their turn (``_poll_turn``), never barge in
                await self._barge_in_on_words()
            await self._poll_turn()
        elif isinstance(event, UtteranceEnd):
            self.detector.utterance_end(self._stt_audio_ms(event.last_word_end_s))
            await self._poll_turn()

    def _not_yet_transcribed(self, final: Final, heard_ms: float) -> Final | None:
        """``final`` without the words already published as final; None if it has none left.

        A fallback replayed the open turn hears again what the failed recogniser made final:
        published again, transcript.final said the caller's first words twice (to
        integrators, and to the brain's warm-up, which joins the finals). A word is the
        fallback's own if its middle is past the audio transcribed (two recognisers time the
        same word a little apart).
        """
        transcribed_ms = self._transcribed_ms
        if heard_ms < transcribed_ms:
            return None  # (its partials were not published either)
        self._transcribed_ms = heard_ms
        self._stt_repeating = False
        if not final.text.strip():
            return None
        if not final.words or self._stt_audio_ms(final.start_s) >= transcribed_ms:
            return final  # (without word timings it cannot be cut: published whole)
        words = [word for word in final.words
                 if self._stt_audio_ms((word.start + word.end) / 2) > transcribed_ms]
        if len(words) == len(final.words):
            return final
        if not words:
            return None
        return msgspec.structs.replace(final, text=" ".join(word.text for word in words),
                                       words=words, start_s=words[0].start)

    def _stt_audio_ms(self, stream_s: float) -> float:
        """Where a time of the recogniser's stream falls on the audio clock."""
        return (self._base_ms or 0) + (self._stt_origin + stream_s * 8000) / 8

    # ------------------------------------------------------------------ events of the call

    async def _on_event_message(self, msg: Msg) -> None:
        if self._live_events is not None:
            self._live_events.append(msg)
            return
        event = self._decode(msg)
        if event is not None:
            await self._handle_event(event)

    def _decode(self, msg: Msg) -> Event | None:
        try:
            return decode(msg.data)
        except EventDecodeError as exc:
            log.error("call %s: undecodable event skipped: %s", self.call_id, exc)
            return None

    async def _handle_event(self, event: Event) -> None:
        try:
            await self._on_event(event)
        except Exception:
            log.exception("call %s: handling %s failed", self.call_id, event.type)

    async def _read_past_events(self) -> None:
        """The call's events so far from the stream, then the live ones held meanwhile."""
        seen: set[Any] = set()
        async for _, event in self.s.bus.replay(call_events(self.call_id, self.org_id)):
            seen.add(event.id)
            self._catch_up(event)
        await self._caught_up()
        live = self._live_events or []
        while live:  # events that came while reading (and while handling these)
            event = self._decode(live.pop(0))
            if event is not None and event.id not in seen:
                await self._handle_event(event)
        self._live_events = None  # no await since the list was last seen empty: order kept

    def _catch_up(self, event: Event) -> None:
        """Events from before this session: remember agent turns nobody has voiced yet."""
        assert self._history is not None
        self._stored.add(event.id)
        if isinstance(event, AgentSay):
            self._history.setdefault(event.turn_id, []).append(event)
        elif isinstance(event, AgentSpeechStarted | AgentSpeechFinished |
                        AgentSpeechInterrupted):
            self._voiced.add(event.turn_id)
            if not isinstance(event, AgentSpeechStarted):
                self._voiced_done.add(event.turn_id)
        elif isinstance(event, CallEnded):
            self.stop("call_ended")
        elif isinstance(event, CallDtmf):
            self._presses.add(event.id)
            self._keys_unsent = self._press(event.digit, event.at.timestamp()) or (
                self._keys_unsent)
        elif isinstance(event, TranscriptPartial | TranscriptFinal) and event.text.strip() and (
                (number := _turn_number(event.utterance_id, "t")) is not None):
            if number > max(self._predecessor_turns, default=0):  # (not a turn's late words)
                self._words_turn = number
        elif isinstance(event, TurnUserEnded) and event.reason != "dtmf" and (
                (number := _turn_number(event.turn_id, "t")) is not None):
            self._predecessor_turns[number] = (event.text, event.reason)
            if number >= self._words_turn:
                self._words_turn = 0
            if (revised := _turn_number(event.revises, "t")) is not None:
                self._predecessor_revisions[revised] = number
        elif isinstance(event, TurnUserEnded) and event.reason == "dtmf":
            # Published (a predecessor ended it): its keys are neither unsent nor pending. Keys
            # typed after them, stored before it, still are.
            if (number := _turn_number(event.turn_id, "k")) is not None:
                self._key_turns = max(self._key_turns, number)
            if self._keys_unsent == event.text:
                self._keys_unsent = None
            else:
                self._keypad.drop(event.text)
            self._rearm_keys()
        self._idle_state.observe(event)

    async def _caught_up(self) -> None:
        history, self._history = self._history or {}, None
        for turn_id, says in history.items():
            if turn_id not in self._voiced:
                for say in says:
                    self._on_say(say)
        # Keys whose end key a predecessor saw but whose turn it did not publish. (Keys still
        # being typed are placed on this session's audio clock by when they were pressed, at its
        # first frame: see _key_ms.)
        keys, self._keys_unsent = self._keys_unsent, None
        await self._end_turn_of_keys(keys)

    async def _on_event(self, event: Event) -> None:
        if isinstance(event, AgentSay):
            self._on_say(event)
        elif isinstance(event, AgentReplyPrepared):
            await self._on_prepared(event)
        elif isinstance(event, AgentSpeechProgress):
            await self._on_progress(event)
        elif isinstance(event, CallDtmf):
            if event.id in self._presses:
                return  # a repeat: the same key pressed once
            self._presses.add(event.id)
            self._idle.reset()
            now = time.monotonic()
            on_air = self._on_air(now)
            if on_air and self.barge_in.on_dtmf(agent_playing=self._agent_audible()) is not None:
                await self._act(on_air, Interrupt(), now)
            await self._end_turn_of_keys(self._press(event.digit, event.at.timestamp()))
        elif isinstance(event, TurnCompleted):
            self._idle_state.answered(event.turn_id, completed=True)
        elif isinstance(event, ToolRequested | ToolFailed):
            self._idle_state.hand_off_seen(event)
        elif isinstance(event, CallerIdle):
            self._idle_state.seen(event)  # ours, or (just after a take-over) the previous owner's
        elif isinstance(event, CallStreamStarted):  # (the call's first is in its past events)
            self._stream_restarted()
        elif isinstance(event, CallEnded):
            self.stop("call_ended")

    def _on_say(self, say: AgentSay) -> None:
        if say.turn_id in self._past_turns:
            return
        turn = self._turns.get(say.turn_id)
        if turn is None:
            self._close_earlier_turns()
            turn = _AgentTurn(say.turn_id, AgentTurnAudio(say.turn_id),
                              first_say_at=time.monotonic())
            self._turns[say.turn_id] = turn
            self._speak_queue.put_nowait(turn)
        if turn.closed or say.seq < turn.next_seq:
            return
        turn.waiting[say.seq] = say
        while turn.next_seq in turn.waiting:
            clause = turn.waiting.pop(turn.next_seq)
            turn.next_seq += 1
            turn.clauses.put_nowait(clause)
            if clause.last:
                turn.close()

    def _close_earlier_turns(self, *, keep: _AgentTurn | None = None) -> None:
        """A new agent turn begins: the ones before it get no more clauses.

        A reply prepared for the caller's open turn is not before it. Turns done with are
        forgotten (see :meth:`_forget_past_turns`).
        """
        for other in self._turns.values():
            if other is not keep and not other.held:
                other.close()
        self._forget_past_turns()

    # ------------------------------------------------------------------ prepared replies

    async def _on_prepared(self, event: AgentReplyPrepared) -> None:
        """Synthesise the clause prepared for the caller's open turn; hold its audio."""
        turn_id = f"t{self.turn_no + 1}"
        if event.turn_id != turn_id or self._catching_up or self._history is not None:
            return  # for a turn that has ended already (or not this session's to judge)
        await self._discard_prepared()
        clause = AgentSay(org_id=self.org_id, call_id=self.call_id, turn_id=turn_id, seq=0,
                          text=event.text, last=event.last)
        turn = _AgentTurn(turn_id, AgentTurnAudio(turn_id), held=True, words=event.words,
                          prepared=clause, next_seq=1, first_say_at=time.monotonic())
        turn.clauses.put_nowait(clause)
        if clause.last:
            turn.close()
        self._prepared = turn
        self._turns[turn_id] = turn
        turn.synthesis = asyncio.create_task(self._prepare(turn),
                                             name=f"tts-prepared:{self.call_id}")
        self._tasks.append(turn.synthesis)

    async def _prepare(self, turn: _AgentTurn) -> None:
        try:
            await self._speak(turn)
        except Exception:
            log.exception("call %s: preparing turn %s failed", self.call_id, turn.turn_id)
        finally:
            turn.spoken = True
            with contextlib.suppress(ValueError):
                self._tasks.remove(asyncio.current_task())  # type: ignore[arg-type]

    def _play_prepared(self, turn: _AgentTurn) -> None:
        """The turn ended with the prepared words: its audio goes out, ahead of the brain.

        It takes its place in the speaker's queue, as a turn from ``agent.say`` does: an
        earlier agent turn still being voiced (the caller spoke over it, and it was not
        interrupted) is finished first, not interleaved with it.
        """
        self._close_earlier_turns(keep=turn)  # as a new turn from agent.say does
        turn.first_say_at = time.monotonic()  # from here on the turn waits on the synthesiser
        self._speak_queue.put_nowait(turn)

    async def _release_prepared(self, turn: _AgentTurn) -> None:
        """The speaker's turn is the prepared reply: its audio goes out as it is synthesised."""
        turn.held = False
        await self._send_out(turn)
        if turn.synthesis is not None:  # the next turn waits until this one is all out
            await asyncio.wait({turn.synthesis})

    async def _discard_prepared(self) -> None:
        """Drop the prepared reply: nothing of it is heard; its synthesis is still counted."""
        turn, self._prepared = self._prepared, None
        if turn is not None:
            await self._drop_prepared(turn)

    async def _drop_prepared(self, turn: _AgentTurn) -> None:
        """A prepared reply is not played: nothing of it is heard."""
        turn.interrupted = turn.discarded = True
        if self._turns.get(turn.turn_id) is turn:
            del self._turns[turn.turn_id]  # the brain's own answer to that turn starts afresh
        turn.close()
        if turn.stream is not None:
            with contextlib.suppress(Exception):
                await turn.stream.cancel()

    def _forget_past_turns(self) -> None:
        """Drop the turns nothing can change any more (their ids are kept)."""
        for turn_id, turn in list(self._turns.items()):
            if turn.spoken and turn is not self._current and (
                    turn.interrupted or turn.audio.finished or turn.audio.echoes_lost):
                del self._turns[turn_id]
                self._past_turns.add(turn_id)

    async def _on_progress(self, event: AgentSpeechProgress) -> None:
        turn = self._turns.get(event.turn_id)
        if turn is None or not turn.audio.echo(event.seq, time.monotonic()):
            return
        if turn.audio.finished and not turn.interrupted:
            self._idle_state.answered(turn.turn_id)
            # Keyed by the agent turn, as started and interrupted are: several agent turns can
            # finish within one caller turn (an idle prompt and goodbye, what follows a failed
            # hand-off), and an ordinal counted per session would give a successor's the id
            # of its predecessor's, which JetStream then drops as a repeat.
            await self._publish(AgentSpeechFinished, "agent.speech.finished",
                                turn_id=turn.turn_id, key=(turn.turn_id,))

    # ------------------------------------------------------------------ speaking

    async def _speaker(self) -> None:
        while True:
            turn = await self._speak_queue.get()
            if turn.interrupted:
                turn.spoken = True
                continue
            self._current = turn
            paused = [other for other in self._turns.values() if other is not turn and (
                other.audio.cut_frames is not None and not other.interrupted)]
            if paused:
                # Paused by the caller and not resumed before the brain's next turn (an answer
                # to words too few to interrupt, or to keys): they end at their cuts, as heard.
                self.barge_in.pause_over()
                for previous in sorted(paused, key=lambda other: other.first_say_at):
                    await self._interrupt(previous, time.monotonic())
            try:
                if turn.prepared is not None:  # synthesised by its own task, held until now
                    await self._release_prepared(turn)
                else:
                    await self._speak(turn)
            except Exception:
                log.exception("call %s: speaking turn %s failed", self.call_id, turn.turn_id)
            finally:
                turn.spoken = True

    async def _speak(self, turn: _AgentTurn) -> None:
        said: list[AgentSay] = []  # every clause of the turn received so far
        done_clauses = 0  # clauses whose audio is complete
        after = ""
        failure = ""  # why ``after`` was given up, until the replacement is open
        whole_chain_again = True  # once a turn (see below)

        def opener(provider: TtsProvider) -> Awaitable[TtsStream]:
            return provider.open(voice=self.settings.voice, language=self.settings.language)

        refused = self._tts_refused
        failed = False  # a synthesiser failed the turn: at the open, or with its stream
        spoke = False  # a synthesiser delivered audio of the turn
        while not turn.interrupted:
            whole_chain = not after  # this open is over the call's whole chain
            try:
                try:
                    turn.provider, turn.stream = await self.s.tts.open(
                        self._tts_chain, opener, after=after, refused=refused)
                except ProviderError:
                    if not after or not whole_chain_again:
                        raise
                    # No provider after the failed one could take the turn (none in the chain,
                    # or none that speaks the agent's language): the whole chain again, the
                    # failed one included — a broken socket is opened anew — unless it refused
                    # the call for good. Once a turn, so a provider that fails every stream is
                    # not tried for ever.
                    whole_chain_again, whole_chain = False, True
                    turn.provider, turn.stream = await self.s.tts.open(
                        self._tts_chain, opener, refused=refused)
            except ProviderError as exc:
                # The rest cannot be said; what was synthesised goes out, and the turn ends with
                # it (left without its end, it never finished and the call never counted as
                # idle). Said in the call's events (through the outbox: the turn ends).
                log.error("call %s: no speech synthesiser: %s", self.call_id, exc)
                if self.stopped.is_set():  # being hung up (said once), or over anyway
                    break
                if failure or whole_chain:
                    await self._fence.put(MediaProviderSwitched(
                        org_id=self.org_id, call_id=self.call_id, kind="tts",
                        from_provider=after or self._tts_chain[0], to_provider="",
                        reason=(failure or str(exc))[:500]))
                failed = True
                break
            if failure and turn.provider == after:
                log.warning("call %s: tts %s reopened (%s)", self.call_id, after, failure)
                failure = ""
            if failure:  # only now is it known which provider took over
                log.warning("call %s: tts %s → %s (%s)", self.call_id, after, turn.provider,
                            failure)
                await self.s.bus.publish(MediaProviderSwitched(
                    org_id=self.org_id, call_id=self.call_id, kind="tts", from_provider=after,
                    to_provider=turn.provider, reason=failure[:500]))
                failure = ""
            stream = turn.stream
            if turn.interrupted:  # cut (or a prepared reply dropped) while the stream opened
                with contextlib.suppress(Exception):
                    await stream.cancel()
                break
            first = done_clauses
            delivered = False  # this stream's first audio: only then has the provider done its job
            feeder: asyncio.Task[bool] | None = None
            aligner = FrameAligner(ULAW_FRAME_BYTES)
            clause = first
            clause_start = len(turn.audio.frames) * FRAME_MS / 1000
            try:
                # The clauses already here go to the synthesiser now, not one task hop later
                # (on a busy loop a hop is most of a millisecond); a feeder sends the rest.
                if not await self._feed(turn, stream, said, first, wait=False):
                    feeder = asyncio.create_task(
                        self._feed(turn, stream, said, len(said), wait=True))
                async for chunk in stream.audio():
                    if chunk.audio and not delivered:
                        delivered = spoke = True
                        self._tts_failing_since = None
                        self.s.tts.health[turn.provider].success()
                        turn.tts_answered_at = turn.tts_answered_at or time.monotonic()
                    index = first + chunk.clause
                    if index != clause:
                        rest = aligner.flush(pad=b"\xff")
                        if rest:
                            turn.audio.add_frames([rest], [], clause_start_s=clause_start)
                        turn.audio.end_clause()
                        done_clauses = index
                        clause = index
                        clause_start = len(turn.audio.frames) * FRAME_MS / 1000
                    turn.audio.add_frames(aligner.push(chunk.audio), chunk.words,
                                          clause_start_s=clause_start)
                    await self._send_out(turn)
                rest = aligner.flush(pad=b"\xff")
                if rest:
                    turn.audio.add_frames([rest], [], clause_start_s=clause_start)
                if not delivered and not turn.interrupted:  # ended cleanly with no audio
                    self.s.tts.health[turn.provider].success()
                break
            except ProviderError as exc:
                if turn.interrupted:
                    break
                # Once, permanent or not; not the call's own refusal (router.py).
                self.s.tts.health[turn.provider].failure(exc)
                after, failure = turn.provider, str(exc)
                failed = True
                if exc.permanent:
                    # Refused for good (Cartesia's model_sunsetted, a 4xx): asked again, it
                    # refuses again; each turn asked it twice for the rest of the call.
                    refused.add(after)
                    log.warning("call %s: tts %s refused the call for good; not asked again "
                                "on it (%s)", self.call_id, after, failure)
                # Synthesised again from the clause that broke, but for its words already out:
                # said again from its start, the caller heard them twice (and played_text too).
                done_clauses = clause
                if clause < len(said):
                    said[clause] = rest_of_clause(
                        said[clause], turn.audio.whole_words_since(clause_start))
                    if not said[clause].text and not said[clause].last:
                        done_clauses += 1  # all of it is out
            finally:
                if feeder is not None:
                    try:
                        await cancel_and_wait(feeder)
                    except ProviderError as exc:
                        # A send that failed with the stream: its failure is the one above, or
                        # (all audio came) none. Propagating skipped the fallback.
                        log.debug("call %s: tts feeder: %s", self.call_id, exc)
        hang_up = failed and not turn.interrupted and not self.stopped.is_set() and (
            self._tts_gives_up(turn, spoke=spoke))
        turn.audio.end_clause()
        turn.audio.text_done = True
        await self._send_out(turn)
        await self._mark_end(turn)
        if hang_up:
            await self._play_out_before_hang_up()
            self.stop("tts_failed")

    def _tts_gives_up(self, turn: _AgentTurn, *, spoke: bool) -> bool:
        """Whether the call is hung up for want of a synthesiser, a turn having failed.

        As with no recogniser: once every synthesiser of the chain refused the call for good,
        or none has delivered audio for ``tts_give_up_after_s`` since a turn first got none
        (``spoke``: this one did). Left on, every later turn went unsaid the same way, the
        caller hearing silence while the brain kept answering, and the call was never ended;
        hung up at the first such turn, one blip (a vendor's 503 twice in 0.1 s) ended a call
        the next turn would have served. Whether the streams opened does not matter: counted
        only when none of the chain opened, a synthesiser that took every stream and failed
        each before its first audio (Cartesia answering every request with an error) never
        started the count, and the call went on unsaid to its end.
        """
        if all(name in self._tts_refused for name in self._tts_chain):
            log.warning("call %s: every speech synthesiser refused the call; ending it",
                        self.call_id)
            return True
        if spoke:
            return False  # (the count, if any, was started over by its audio)
        now = time.monotonic()
        if self._tts_failing_since is None:
            self._tts_failing_since = now
        if now - self._tts_failing_since >= self.tts_give_up_after_s:
            log.warning("call %s: no audio from any speech synthesiser for %.0f s; ending the "
                        "call", self.call_id, now - self._tts_failing_since)
            return True
        log.warning("call %s: turn %s unsaid: no speech synthesiser gave audio; the next turn "
                    "tries again", self.call_id, turn.turn_id)
        return False

    async def _play_out_before_hang_up(self) -> None:
        """Wait for the agent audio out on the carrier to play before the call is hung up.

        Hung up at once, the answer the caller was still hearing (sent whole, played over
        seconds) was cut off, though nothing kept it from playing. Until its last mark is
        echoed, or as long as it has left to play and a little more (echoes that never come).
        """
        now = time.monotonic()
        left_ms = sum(max(0, turn.audio.sent * FRAME_MS - turn.audio.position_ms(now))
                      for turn in self._on_air(now))
        deadline = now + left_ms / 1000 + HANG_UP_GRACE_S
        while self._agent_audible() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), 0.05)
                return  # ending anyway (the caller hung up)

    def _echoes_lost(self, turn: _AgentTurn) -> None:
        """No echo of the turn will come: its audio is over, as if played.

        No agent.speech.finished either: nothing said it was heard. The greeting's end is
        nothing else (the brain completes no greeting): waited for, no silence counted again.
        """
        turn.audio.refused()
        self._idle_state.answered(turn.turn_id)

    def _stream_restarted(self) -> None:
        """The carrier's stream restarted: what was queued on the old one will not play.

        A turn all of whose audio went to it gets no echo (marks sent with frames to a closed
        socket are dropped unanswered; only a mark sent as a command can be refused). A turn
        still being sent plays on: the marks of its later frames, on the new stream, are echoed.
        """
        for turn in self._turns.values():
            audio = turn.audio
            if audio.text_done and audio.frames and audio.sent == len(audio.frames) and not (
                    audio.finished or audio.echoes_lost or turn.interrupted or turn.held
                    or audio.cut_frames is not None):
                self._echoes_lost(turn)

    async def _feed(self, turn: _AgentTurn, stream: TtsStream, said: list[AgentSay],
                    first: int, *, wait: bool) -> bool:
        """Send the turn's clauses from ``first`` on, then the ones that arrive.

        Without ``wait`` only those already here; True once the turn's last clause is sent.
        """
        for clause in said[first:]:
            await self._say(turn, stream, clause.text, last=clause.last)
            if clause.last:
                return True
        if turn.closed and turn.clauses.empty():  # an earlier stream of the turn took its end
            await stream.say("", last=True)
            return True
        while True:
            if turn.filler is not None:  # held by the pass without waiting: its wait is ours
                clause, turn.filler = turn.filler, None
            elif wait:
                clause = await turn.clauses.get()
            elif turn.clauses.empty():
                return False
            else:
                clause = turn.clauses.get_nowait()
            while clause is not None and clause.filler_after_ms:
                # Held on the turn while waited out: a feeder cancelled meanwhile (a synthesiser
                # replaced) leaves it to the next; the pass without waiting, to the feeder task.
                turn.filler = clause
                if not wait and turn.clauses.empty():
                    return False
                following = await self._unless_more(turn, clause)
                turn.filler = None
                if following is FILLER_DUE:
                    if turn.interrupted:
                        return True  # cut off while waiting: nothing more of it is said
                    break  # the tools are slow: say it
                clause = following  # they answered in time: no filler (it may be another's)
            if clause is None:
                if not said or not said[-1].last:
                    await stream.say("", last=True)
                return True
            said.append(clause)
            await self._say(turn, stream, clause.text, last=clause.last)
            if clause.last:
                return True

    async def _unless_more(self, turn: _AgentTurn,
                           filler: AgentSay) -> AgentSay | None | object:
        """Wait out a filler: the clause (or end) that comes first, else :data:`FILLER_DUE`.

        Due once the turn's audio so far has played out and nothing more has come for the
        filler's ``filler_after_ms`` (from when it came, at the earliest): the round's tools are
        slow, and the caller would sit in silence. The audio still to play is looked at again
        every 100 ms, as the clauses before the filler may still be being synthesised.
        """
        quiet_from = time.monotonic()  # when the silence began, or (playing) will begin
        after_s = filler.filler_after_ms / 1000
        while not turn.interrupted:
            now = time.monotonic()
            audio = turn.audio
            unplayed_s = max(0, audio.duration_ms - audio.position_ms(now)) / 1000
            if unplayed_s:
                quiet_from = max(quiet_from, now + unplayed_s)
            due = quiet_from + after_s
            if now >= due:
                return FILLER_DUE
            try:
                return await asyncio.wait_for(turn.clauses.get(), min(0.1, due - now))
            except TimeoutError:
                continue
        return FILLER_DUE  # interrupted: the caller (see _feed)

    async def _say(self, turn: _AgentTurn, stream: TtsStream, text: str, *, last: bool) -> None:
        """Send a clause to the turn's synthesiser, its characters counted to that provider.

        A clause synthesised again by a fallback counts to both: each was asked for it.
        """
        await stream.say(text, last=last)
        self._tts_chars[turn.provider] = self._tts_chars.get(turn.provider, 0) + len(text)
        turn.tts_asked_at = turn.tts_asked_at or time.monotonic()

    async def _send_out(self, turn: _AgentTurn) -> None:
        if turn.interrupted or turn.held or turn.audio.cut_frames is not None:
            return
        if self._out_paused or not self._fence.open():
            self._pause_out(turn)
            return
        nc = self.s.bus.nc
        subject = audio_subject(self.call_id, "out")
        # Frames ready together go out as one message (the gateway forwards it as one media
        # message; the telephony side buffers and plays it): a message ends at a marked frame,
        # so a mark still follows exactly the audio before it, or after OUT_CHUNK_FRAMES.
        run: list[bytes] = []
        # The carrier plays what it is sent in order: these frames play after the audio of
        # other turns still queued there (a reply sent right after an answer synthesised faster
        # than real time), and are not overdue until that has played too.
        queued = [other.audio.plays_until() for other in self._turns.values()
                  if other is not turn and not (
                      other.interrupted or other.audio.finished or other.audio.echoes_lost
                      or other.audio.cut_frames is not None)]
        queued_until = max((until for until in queued if until is not None), default=None)
        for _index, frame, mark in turn.audio.take_unsent(time.monotonic(),
                                                          queued_until=queued_until):
            run.append(frame)
            if mark is None and len(run) < OUT_CHUNK_FRAMES:
                continue
            await self._publish_out(nc, subject, turn, run, mark)
            run = []
        if run:
            await self._publish_out(nc, subject, turn, run, None)

    async def _publish_out(self, nc: Any, subject: str, turn: _AgentTurn, frames: list[bytes],
                           mark: int | None) -> None:
        data = encode_frame(b"".join(frames), seq=self._out_seq,
                            timestamp_ms=self._out_seq * FRAME_MS)
        self._out_seq += len(frames)
        await nc.publish(subject, data, headers=None if mark is None else {
            MARK: f"{turn.turn_id}:{mark}"})
        if not turn.first_frame_at:
            turn.first_frame_at = time.monotonic()
            if turn.turn_id not in self._idle_state.idle_turns:  # the agent said something new
                self._idle.reset()
            spoke_at = self._user_turn_ends.get(turn.turn_id, 0.0)
            await self._publish(
                AgentSpeechStarted, "agent.speech.started", turn_id=turn.turn_id,
                tts_ttfb_ms=round((turn.first_frame_at - turn.first_say_at) * 1000, 1),
                tts_provider_ms=self._tts_wait_ms(turn),
                voice_to_voice_ms=round((time.time() - spoke_at) * 1000, 1)
                if spoke_at else 0.0, key=(turn.turn_id,))

    async def _mark_end(self, turn: _AgentTurn) -> None:
        """The turn's last frame went out before its end was known: a mark after it, by command.

        Paused as the audio is while the lease is unconfirmed: sent as an unanswered command,
        it was never echoed, and the turn counted as playing for ever once the lease proved ours.
        Not for a turn whose echoes are lost (its stream restarted meanwhile): the new stream
        echoed it at once, and the turn counted as heard.
        """
        audio = turn.audio
        if turn.discarded or audio.cut_frames is not None or audio.echoes_lost or (
                not audio.last_mark_missing()):
            return
        if self._out_paused or not self._fence.open():
            self._pause_out(turn)
            return
        audio.pending_marks.append(len(audio.frames))
        seq = mark_seq(audio.generation, len(audio.frames))
        if await self._ask("mark", {"name": f"{turn.turn_id}:{seq}"}) == "refused":
            self._echoes_lost(turn)  # the socket is closed: no echo of the turn will come

    def _pause_out(self, turn: _AgentTurn) -> None:
        """Agent audio waits for the lease's verdict: gone on with once confirmed, else never.

        Sent meanwhile, a woken instance's audio (one frozen past the lease timeout) played over
        its successor's, the call's new owner, for up to a second. Held back, not dropped: its
        marks would go with it, and the turn never finish when the lease proves ours.
        """
        self._out_paused = True
        turn.audio.paused()

    def _lease_confirmed(self) -> None:
        # (Not once the session is ending: its tasks are over, and the call is or goes elsewhere.)
        if self._out_paused and self._resuming_out is None and not self.stopped.is_set():
            self._resuming_out = asyncio.create_task(self._resume_out(),
                                                     name=f"resume-out:{self.call_id}")
            self._tasks.append(self._resuming_out)

    async def _resume_out(self) -> None:
        """The lease is confirmed: the turns' audio goes on where it stopped, in order.

        All that is ready goes at once, as ever: the carrier queues it and plays it at its own
        pace, so the caller hears a pause (the freeze's), not the backlog hurried.
        """
        try:
            # Again while paused anew and confirmed again before this pass was over (no other
            # resume starts while this one runs): else the audio waited for the next renewal.
            while self._out_paused and self._fence.open():
                self._out_paused = False
                # In the order they are spoken: a prepared reply is known before a turn spoken
                # ahead of it (it is queued when the caller's turn ends, as first_say_at says).
                for turn in sorted(self._turns.values(), key=lambda turn: turn.first_say_at):
                    await self._send_out(turn)
                    await self._mark_end(turn)
        finally:
            self._resuming_out = None
            with contextlib.suppress(ValueError):
                self._tasks.remove(asyncio.current_task())  # type: ignore[arg-type]

    @staticmethod
    def _tts_wait_ms(turn: _AgentTurn) -> float:
        """What the turn waited for the synthesiser's first audio, in ms.

        From asking it — or, for a prepared reply, from the turn's end — to its first audio; 0
        if the audio was there already.
        """
        asked = max(turn.tts_asked_at, turn.first_say_at) if turn.tts_asked_at else 0.0
        if not asked or turn.tts_answered_at < asked:
            return 0.0
        return round((turn.tts_answered_at - asked) * 1000, 1)

    def _agent_audible(self) -> bool:
        now = time.monotonic()
        on_air = self._on_air(now)
        return bool(on_air) and (self.barge_in.paused_at is not None or any(
            turn.audio.playing(now) for turn in on_air))

    def _on_air(self, now: float) -> list[_AgentTurn]:
        """The agent turns the caller may be hearing, in the order spoken; barge-in acts on all.

        The current turn, and those before it from the first still playing or paused by the
        caller. A turn all of whose audio is sent is followed on the carrier by the next at
        once: the caller hears the one while the next is voiced. Looking at the newest alone,
        speech over the one playing paused and interrupted only the next (nothing of it
        heard), the gateway's clear flushed both, and the one cut off, its flushed marks
        echoed, was reported heard to its end.
        """
        current = self._current
        if current is None:
            return []
        turns = self._turns.values()
        if len(turns) > 1:
            turns = sorted(turns, key=lambda turn: turn.first_say_at)
        on_air: list[_AgentTurn] = []
        for turn in turns:
            if not (turn.interrupted or turn.held or turn.discarded) and (
                    on_air or turn is current or turn.audio.cut_frames is not None
                    or turn.audio.playing(now)):
                on_air.append(turn)
            if turn is current:
                break
        return on_air

    def _agent_mid_turn(self) -> bool:
        """Whether the agent is speaking, or silent within a turn it has begun and not said all of.

        "Let me check that for you." — its tools are slow, its last clause still to come: a
        caller's "okay" then is listening, not answering. Taken for a turn, the brain cancelled
        the turn it was running (tools and all) for it, and answered "okay".
        """
        if self._agent_audible():
            return True
        turn = self._current
        return turn is not None and not turn.interrupted and turn.audio.sent > 0 and (
            not turn.audio.text_done)

    def _agent_now(self) -> bool:
        """Whether the caller's speech in hand was spoken over the agent (:meth:`_agent_mid_turn`).

        Not known of a successor's catch-up: that speech is seconds old, and the agent's audio
        playing now is not what it was said over (see :meth:`_barge_in_on_frame`).
        """
        return not self._catching_up and self._agent_mid_turn()

    # ------------------------------------------------------------------ idle caller

    async def _idle_tick(self) -> None:
        """Count the caller's silence; emit caller.idle when a prompt or hang-up is due."""
        self._idle_due_ms = self.audio_ms + IDLE_TICK_MS
        self._give_up_unechoed(time.monotonic())
        busy = self._catching_up or self._history is not None or self._idle_busy()
        action = self._idle.tick(self.audio_ms, busy=busy)
        if action is not None:
            await self._publish_idle(action)

    def _give_up_unechoed(self, now: float) -> None:
        """A turn all sent whose last mark is not echoed long after it played is over, as heard.

        Its own length and ECHO_GRACE_S more (:meth:`AgentTurnAudio.overdue`): the carrier
        does not echo marks (a Plivo account without playedStream, a gateway bug) or the echo
        was lost. Waited for, the turn never finished: the caller's silence never counted again
        (no idle prompt, no hang-up) and the turn was never done with; as with a refused mark
        (:meth:`_echoes_lost`).
        """
        for turn in list(self._turns.values()):
            audio = turn.audio
            if audio.text_done and audio.frames and audio.sent == len(audio.frames) and not (
                    audio.finished or audio.echoes_lost or turn.interrupted or turn.held
                    or audio.cut_frames is not None) and audio.overdue(now):
                log.warning("call %s: agent turn %s not echoed %.0f s after its audio played: "
                            "taken as played", self.call_id, turn.turn_id, ECHO_GRACE_S)
                self._echoes_lost(turn)

    def _idle_busy(self) -> bool:
        """Whether the caller or the agent is at it, or a caller turn waits for its answer."""
        if self._idle_state.unanswered or self._speech_start_ms is not None:
            return True
        if self.detector.in_turn or self._keypad.pending:  # speaking, or typing keys
            return True
        if not self._speak_queue.empty():
            return True
        for turn in self._turns.values():
            if turn.held or turn.discarded:
                continue  # a prepared reply nobody hears (yet): the caller's turn is open
            if not turn.spoken or (
                    not turn.interrupted and turn.audio.frames and not turn.audio.finished
                    and not turn.audio.echoes_lost):
                return True  # still to be synthesised, or playing until its last mark echoes
        return False

    async def _publish_idle(self, action: Action) -> None:
        """caller.idle: the brain says the prompt (or goodbye) in agent turn ``i<n>``.

        The n-th of the call has the same id whichever instance emits it, and a successor
        learns the ones before from the call's events, so a take-over does not repeat one.
        """
        number, turn_id = self._idle_state.next_idle_turn()
        silent_s = round(self._idle.silent_ms / 1000, 1)
        log.info("call %s: caller silent for %.1f s: %s (%s)", self.call_id, silent_s, action,
                 turn_id)
        await self._publish(CallerIdle, "caller.idle", turn_id=turn_id, action=action,
                            silent_s=silent_s, key=(number,))

    # ------------------------------------------------------------------ barge-in

    async def _barge_in_on_frame(self, now: float) -> None:
        """Caller speech over the agent's audio pauses it, its words interrupt (playback.BargeIn).

        Not the speech a successor catches up on (the caller's audio since the lease's resume
        point, from the AUDIO stream): said seconds ago, it was compared with the agent audio
        playing now, and paused or cut off an answer the caller had not yet heard when they
        spoke. Live speech is judged as soon as the catch-up is over.
        """
        if self._catching_up or (
                self._speech_start_ms is None and self.barge_in.paused_at is None):
            return  # no speech, no pause to resume: nothing to do (the caller is mostly silent)
        on_air = self._on_air(now)
        if not on_air:
            return
        deaf = self._stt_switching  # no recogniser hears the caller: no words can come
        if self._speech_start_ms is not None:
            speech_ms = self.audio_ms - self._speech_start_ms
            action = self.barge_in.on_speech(
                speech_ms, self.detector.backchannels.content_words(self.detector.text),
                agent_playing=any(turn.audio.playing(now) for turn in on_air), now=now)
            if deaf and action is None and self.barge_in.paused_at is not None and (
                    speech_ms >= STT_DOWN_INTERRUPT_MS):
                # Words would confirm it, and none can come: the caller is plainly talking
                # over the agent, not coughing. (Waiting for the recogniser, the agent stayed
                # cut off with the brain going on; resuming, it talked over the caller.)
                log.info("call %s: caller speech over the agent for %d ms with no recogniser: "
                         "an interruption", self.call_id, speech_ms)
                self.barge_in.pause_over()
                action = Interrupt()
            await self._act(on_air, action, now)
        if self.barge_in.paused_at is None:
            return  # nothing to resume: skip matching the caller's words, on every frame
        if deaf and now - self._pause_began < STT_DOWN_PAUSE_MAX_S:
            # No words can come: the pause is no false alarm yet. Its wait for words counts
            # from when a recogniser hears the caller again (_recognition_back).
            return
        resume = self.barge_in.tick(
            now, only_backchannel=self.detector.backchannels.only_backchannel(
                self.detector.text), caller_speaking=self._speech_start_ms is not None)
        await self._act(on_air, resume, now)

    async def _barge_in_on_words(self) -> None:
        if self._catching_up:  # words of past speech (see _barge_in_on_frame)
            return
        now = time.monotonic()
        on_air = self._on_air(now)
        if not on_air:
            return
        playing = any(turn.audio.playing(now) for turn in on_air)
        if self._speech_start_ms is None and self.barge_in.paused_at is None:
            if self.detector.in_turn:  # words for speech already over: a slow recogniser
                await self._act(on_air, self.barge_in.on_words_after_speech(
                    self.detector.backchannels.content_words(self.detector.text),
                    agent_playing=playing), now)
            return
        action = self.barge_in.on_speech(
            self.audio_ms - (self._speech_start_ms or self.audio_ms),
            self.detector.backchannels.content_words(self.detector.text),
            agent_playing=playing, now=now)
        await self._act(on_air, action, now)

    async def _act(self, on_air: list[_AgentTurn], action: Pause | Interrupt | Resume | None,
                   now: float) -> None:
        """Pause, interrupt or resume the turns on the air (see :meth:`_on_air`), in order."""
        if isinstance(action, Pause):
            self._pause_began = now
            for turn in on_air:
                turn.audio.cut(now)
            await self._clear()  # (one clear flushes all of them)
        elif isinstance(action, Interrupt):
            if self._clear_unconfirmed or any(
                    turn.audio.cut_frames is None and turn.audio.sent for turn in on_air):
                for turn in on_air:
                    turn.audio.cut(now)
                await self._clear()
            for turn in on_air:
                await self._interrupt(turn, now)
        elif isinstance(action, Resume):
            if self._clear_unconfirmed:  # what was cut may still be playing: not twice
                await self._clear()
            for turn in on_air:
                if turn.audio.cut_frames is not None and not turn.interrupted:
                    turn.audio.resume()
                    await self._send_out(turn)
                    # Cut at its very end (the last echo on its way), nothing is sent again:
                    # the mark after it goes alone, else the turn played for ever.
                    await self._mark_end(turn)

    async def _interrupt(self, turn: _AgentTurn, now: float) -> None:
        if turn.interrupted:
            return
        already_cut = turn.audio.cut_frames is not None
        cut = turn.audio.cut(now)
        turn.interrupted = True
        if (not already_cut or self._clear_unconfirmed) and turn.audio.sent:
            await self._clear()  # (none sent: what plays is another turn's)
        if turn.stream is not None:
            with contextlib.suppress(Exception):
                await turn.stream.cancel()
        heard = turn.audio.heard_text(cut * FRAME_MS)
        self._idle_state.answered(turn.turn_id, cut_off=True)
        await self._publish(AgentSpeechInterrupted, "agent.speech.interrupted",
                            turn_id=turn.turn_id, played_text=heard,
                            cut_seq=cut, cut_ms=cut * FRAME_MS, key=(turn.turn_id,))

    async def _clear(self) -> None:
        """Ask the gateway to clear the carrier's queued agent audio (barge-in).

        Unanswered, it may not have been done: the next cut asks again. Before, a pause whose
        clear was lost left the cut turn playing on, and the caller's words then interrupted
        it without a clear: the agent talked over the caller to the end of its turn.
        """
        self._clear_unconfirmed = not await self._command("clear", {})

    async def _command(self, verb: str, body: dict[str, Any]) -> bool:
        """Ask the gateway to ``verb`` the call; whether it did (a failure is logged)."""
        return await self._ask(verb, body) == "ok"

    async def _ask(self, verb: str, body: dict[str, Any]) -> Literal["ok", "refused", "failed"]:
        """Ask the gateway to ``verb`` the call: done, refused (its reply says no), or failed.

        Failed: no reply in time (or none could be sent), so it may still have been done. Not
        sent while the lease is unconfirmed (failed): another instance may serve the call now.
        """
        if not self._fence.open():
            log.warning("call %s: gateway command %s not sent: lease unconfirmed", self.call_id,
                        verb)
            return "failed"
        try:
            reply = await self.s.bus.nc.request(command_subject(self.call_id, verb),
                                                json.dumps(body).encode(),
                                                timeout=self.s.command_timeout_s)
            answer = json.loads(reply.data) if reply.data else {}
        except Exception as exc:
            log.warning("call %s: gateway command %s failed: %s", self.call_id, verb, exc)
            return "failed"
        if not answer.get("ok"):
            log.warning("call %s: gateway command %s failed: %s", self.call_id, verb,
                        answer.get("error") or f"refused: {reply.data!r}")
            return "refused"
        return "ok"

    # ------------------------------------------------------------------ output

    async def _publish(self, cls: type[Event], kind: str, *, key: tuple[object, ...] = (),
                       **fields: Any) -> None:
        """Publish the call's next ``kind`` event; its ack is checked in the background.

        Most of these are published while an audio frame is handled: waiting for the ack there
        held up the call's next frames for a JetStream round trip (for the whole publish
        timeout on a slow server, after which the frame's remaining work was skipped). The
        outbox publishes again what is not acknowledged; ``_close`` drains it before the call
        is handed over. The id is stable (call, kind, key), so a successor, or a second
        attempt, cannot store an event twice; one the call's past already has (read as a
        successor started) is not published again at all.
        """
        if not key:
            ordinal = self._ordinals.get(kind, 0)
            self._ordinals[kind] = ordinal + 1
            key = (self.turn_no, ordinal)
        event_id = stable_id(self.call_id, kind, *key)
        if event_id in self._stored:
            # Heard again by a successor (its lease resumed before it): stored once anyway, but
            # published again, live subscribers got the repeat (the brain took a repeated
            # turn.user_ended for a newer turn and cancelled the one running).
            return
        event = cls(id=event_id, org_id=self.org_id, call_id=self.call_id, **fields)
        await self._fence.put(event)
        self.s.on_event(kind)

    async def _record_usage(self) -> None:
        """Put the session's STT seconds and TTS characters, per provider, in the outbox.

        An id is unique to the session's claim (instance and lease revision): each session
        that served the call records its own, a call back on an instance that served it before
        included, and a publish of the same record again is dropped as a duplicate.
        """
        for event in usage_records(self.org_id, self.call_id, self._usage):
            await self._outbox.put(event)

    async def _record_predecessor_usage(self) -> None:
        """Record what the predecessor had used by its last renewal (the lease's usage).

        A predecessor killed mid-call never recorded it. Under the ids its own record has: one
        that was only frozen and records its usage as it ends after all is a duplicate of this,
        or this of it (the first stored is kept).
        """
        if self._predecessor_usage is not None:
            for event in usage_records(self.org_id, self.call_id, self._predecessor_usage):
                await self._outbox.put(event)
            self._predecessor_usage = None


def usage_records(org_id: str, call_id: str, usage: LeaseUsage) -> list[UsageRecorded]:
    """A session's ``usage.recorded``, per kind and provider, under its claim's ids."""
    def record(of: str, kind: Literal["stt_seconds", "tts_characters"], provider: str,
               quantity: float, unit: str) -> UsageRecorded:
        return UsageRecorded(
            id=stable_id(call_id, "usage", of, provider, usage.instance, usage.claim),
            org_id=org_id, call_id=call_id, kind=kind, quantity=quantity, unit=unit,
            provider=provider)
    return ([record("stt", "stt_seconds", provider, round(seconds, 3), "s")
             for provider, seconds in usage.stt_seconds.items() if provider and seconds > 0]
            + [record("tts", "tts_characters", provider, float(chars), "characters")
               for provider, chars in usage.tts_chars.items() if provider and chars > 0])
