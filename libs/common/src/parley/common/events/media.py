"""Audio-side events, emitted by the media service."""

from __future__ import annotations

from typing import Literal

import msgspec

from .envelope import CallEvent


class Word(msgspec.Struct, frozen=True, array_like=True):
    """A recognised or spoken word with its timing in seconds from the segment start."""

    text: str
    start: float
    end: float


class SpeechStarted(CallEvent, frozen=True, kw_only=True, tag="speech.started"):
    """Voice activity detected from the caller, ``offset_ms`` into the call's audio.

    The call's audio clock: milliseconds of the caller's audio since the call's first frame,
    going on across the carrier's stream restarts and a take-over by another media instance.
    """

    offset_ms: int


class SpeechStopped(CallEvent, frozen=True, kw_only=True, tag="speech.stopped"):
    """The caller's voice activity ended, ``offset_ms`` into the call's audio (as started)."""

    offset_ms: int


class TranscriptPartial(CallEvent, frozen=True, kw_only=True, tag="transcript.partial"):
    """An interim hypothesis of what the caller is saying; later partials supersede it."""

    text: str
    utterance_id: str = ""


class TranscriptFinal(CallEvent, frozen=True, kw_only=True, tag="transcript.final"):
    """A stable transcript segment with word timings."""

    text: str
    utterance_id: str = ""
    words: list[Word] = msgspec.field(default_factory=list)
    confidence: float = 1.0
    provider: str = ""
    latency_ms: float = 0.0


class TurnUserEnded(CallEvent, frozen=True, kw_only=True, tag="turn.user_ended"):
    """The caller finished a turn; the brain answers it.

    ``turn_id``: media's spoken turns are ``t1``, ``t2``…, its turns of keys ``k1``, ``k2``…
    (numbered apart); ConversationRelay's are ``turn_<uuid7>``. ``reason`` ``dtmf``: a turn of
    keys the caller typed (``parley.common.keypad``), ``text`` the keys, the end key included
    ("1234#"); no transcript precedes it. ``prompt``: a ConversationRelay prompt.
    """

    turn_id: str
    text: str
    reason: Literal["silence", "utterance_end", "max_wait", "dtmf", "prompt"] = "silence"
    eou_delay_ms: float = 0.0
    stt_final_ms: float = 0.0
    # the agent.reply_prepared clause media started playing as this turn's answer ("" if none)
    prepared_text: str = ""
    prepared_last: bool = False
    # the turn this one replaces: it ended at max wait on a stale partial and the recogniser's
    # late final said more (this text is the whole of it; the brain answers this one instead)
    revises: str = ""


class AgentSpeechStarted(CallEvent, frozen=True, kw_only=True, tag="agent.speech.started"):
    """The first agent audio frame of a turn left for the telephony socket.

    The turn normally ends with ``agent.speech.finished`` (all of it played) or
    ``agent.speech.interrupted`` (cut off, with what was heard). It may end with neither when
    no one can tell: its audio went to a carrier stream that closed before playing it out (a
    reconnect, a DTMF redirect, the call ending), or it was playing when the media instance
    died (its successor knows none of its audio). The brain counts such a turn's clauses as
    said.
    """

    turn_id: str
    # media: the first agent.say received → this frame published (synthesis included)
    tts_ttfb_ms: float = 0.0
    # the synthesiser alone: the first clause sent to it → its first audio back
    tts_provider_ms: float = 0.0
    voice_to_voice_ms: float = 0.0


class AgentSpeechProgress(CallEvent, frozen=True, kw_only=True, tag="agent.speech.progress"):
    """The carrier acknowledged playing audio up to a mark (Twilio mark / Plivo checkpoint)."""

    turn_id: str
    mark: str
    seq: int


class AgentSpeechInterrupted(CallEvent, frozen=True, kw_only=True,
                             tag="agent.speech.interrupted"):
    """The caller spoke over the agent; ``played_text`` is what the caller actually heard."""

    turn_id: str
    played_text: str
    cut_seq: int = 0
    cut_ms: int = 0


class AgentSpeechFinished(CallEvent, frozen=True, kw_only=True, tag="agent.speech.finished"):
    """All of the agent's audio for a turn was played."""

    turn_id: str


class CallerIdle(CallEvent, frozen=True, kw_only=True, tag="caller.idle"):
    """The caller has said nothing for ``silent_s`` while nothing was pending.

    Media emits it (on managed calls, which media does not serve, the gateway's
    ConversationRelay bridge) after the agent's ``idle_prompt_s`` (``action`` "prompt": the
    brain asks whether the caller is still there) and ``idle_hangup_s`` (``action`` "hangup":
    the brain says goodbye and ends the call, ``call.ended`` reason "idle"), and another
    "hangup" after each further 15 s of silence (the goodbye's audio not counted) if the call
    did not end. ``silent_s`` counts only the silence after the agent's audio ended with no
    caller turn waiting for its answer (the prompt's own audio not counted); caller speech, a
    key press, a caller turn or new agent audio (other than the prompt) start it again from 0.
    """

    turn_id: str  # the agent turn the brain says it in: "i0", "i1"… (one per caller.idle)
    action: Literal["prompt", "hangup"]
    silent_s: float = 0.0


class MediaProviderSwitched(CallEvent, frozen=True, kw_only=True, tag="media.provider_switched"):
    """STT or TTS moved to the next provider in the fallback chain.

    ``to_provider`` is "" when none could take over (each failed or refused, or is full, or
    refused this call for good before), or when recognition kept failing (each stream soon
    after it opened) for longer than the session allows: for STT the call is then hung up
    (reason ``error``); for TTS the rest of the turn goes unsaid, and if no provider of the
    chain would open, the call is hung up too (reason ``error``). ``reason`` is the failed
    provider's error.
    """

    kind: Literal["stt", "tts"]
    from_provider: str
    to_provider: str
    reason: str = ""
