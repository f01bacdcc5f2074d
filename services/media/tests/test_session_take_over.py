"""A call taken over mid-call: the successor resumes from the lease and repeats no event.

The predecessor is driven frame by frame as live; it dies (stops being fed) and a successor
is built from its lease, as a take-over does, and fed the call's audio from the lease's resume
frame on, as its catch-up from the AUDIO stream delivers it. What both emit is read back from
the EVENTS stream.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import numpy as np
import pytest

from parley.common.bus import Bus, command_subject
from parley.common.configuration.models import AgentSettings
from parley.common.events import (
    AgentSpeechFinished,
    AgentSpeechInterrupted,
    AgentSpeechStarted,
    CallDtmf,
    Event,
    SpeechStarted,
    SpeechStopped,
    TurnUserEnded,
)
from parley.media.audio.codec import pcm16_array_to_ulaw
from parley.media.ownership import LeaseState
from parley.media.providers.base import Final, Partial
from parley.media.router import ProviderRouter
from parley.media.session import CallSession, SessionServices

ORG = "acme"
SILENCE = b"\xff" * 160
NOISE = pcm16_array_to_ulaw(np.clip(np.random.default_rng(1).normal(0.0, 3000.0, 160 * 50),
                                    -32768, 32767).astype(np.int16))
QUIET = AgentSettings(greeting="", idle_prompt_s=0, idle_hangup_s=0)


class Audio:
    """The call's inbound frames, as the gateway sent them (seq, timestamp, send time)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.start = time.time() - 60

    def silence(self, seconds: float) -> None:
        self.frames += [SILENCE] * round(seconds * 50)

    def speech(self, seconds: float) -> None:
        """A sound the VAD takes for speech (no words come of it: no recogniser here)."""
        self.frames += [NOISE[n % 50 * 160:n % 50 * 160 + 160]
                        for n in range(round(seconds * 50))]

    async def play(self, session: CallSession, first_seq: int, last_seq: int, *,
                   words: str = "", behind_until: int = 0) -> None:
        """Frames ``first_seq`` to ``last_seq``; ``words``: what a recogniser makes final of
        each stretch of speech the session hears, as it ends. Frames up to ``behind_until``
        come as a successor's catch-up from the AUDIO stream does (behind live)."""
        for seq in range(first_seq, last_seq + 1):
            speaking = session._speech_start_ms is not None
            await session._on_audio(self.frames[seq - 1], seq, (seq - 1) * 20,
                                    self.start + (seq - 1) * 0.02, seq <= behind_until)
            if words and speaking and session._speech_start_ms is None:
                await session._on_stt(Final(words, speech_final=True))


def session(bus: Bus, call_id: str, *, instance: str,
            resume: LeaseState | None = None) -> CallSession:
    services = SessionServices(
        bus=bus, leases=None,  # type: ignore[arg-type]  # run() is not called
        stt=ProviderRouter("stt", {"never": object()}, ["never"]),  # type: ignore[dict-item]
        tts=ProviderRouter("tts", {"never": object()}, ["never"]),  # type: ignore[dict-item]
        instance=instance)
    call = CallSession(services, call_id=call_id, org_id=ORG, agent_id="agent",
                       settings=QUIET, revision=1, resume=resume)
    call._history = None  # the call's past events are read
    return call


async def take_over(bus: Bus, call_id: str, lease: LeaseState) -> CallSession:
    """A successor's session from ``lease``, having read the call's past events (as run() does)."""
    successor = session(bus, call_id, instance="media-b", resume=lease)
    successor._history = {}
    for event in await bus.replay_call(call_id, org_id=ORG):
        successor._catch_up(event)
    await successor._caught_up()
    return successor


async def until_max_wait(audio: Audio, call: CallSession, *, partial: str) -> int:
    """Play frames until the caller's turn ends at max wait on ``partial`` (a recogniser slower
    than the max wait has said no more); return the last frame's seq."""
    seq = 0
    while call.turn_no == 0:
        seq += 1
        await audio.play(call, seq, seq)
        if call._speech_start_ms is not None and not call.detector.text:
            await call._on_stt(Partial(partial))
    return seq


def lease_of(call: CallSession) -> LeaseState:
    """The lease as the predecessor last renewed it (what the successor is given)."""
    return msgspec.json.decode(msgspec.json.encode(call._lease_state()), type=LeaseState)


async def events(bus: Bus, call_id: str, *calls: CallSession) -> list[Event]:
    for call in calls:
        await call._outbox.drain(2)
    return await bus.replay_call(call_id, org_id=ORG)


async def test_a_noise_before_the_resume_point_does_not_cost_the_successors_speech_its_ids(
        bus) -> None:
    # A noise with no words (speech.started and .stopped, no turn), then the caller speaks and
    # the instance dies mid-speech. The successor resumes after the noise and counted its
    # events from 0 in the turn: the speech's speech.stopped got the noise's id and JetStream
    # dropped it as a repeat; the speech's end was never stored.
    audio = Audio()
    audio.silence(1)
    audio.speech(0.3)  # the noise
    audio.silence(3.5)  # past the max wait: no turn
    audio.speech(1.0)
    audio.silence(0.2)
    dies_at = len(audio.frames)  # mid-speech (within the VAD's hangover)
    audio.silence(1.0)
    first = session(bus, "call-take-over-1", instance="media-a")
    await audio.play(first, 1, dies_at)
    lease = lease_of(first)
    assert 0 < lease.resume_seq < 50 + 15 + 175  # after the noise, before the speech
    successor = session(bus, "call-take-over-1", instance="media-b", resume=lease)
    await audio.play(successor, lease.resume_seq, len(audio.frames))
    stored = await events(bus, "call-take-over-1", first, successor)
    starts = [e.offset_ms for e in stored if isinstance(e, SpeechStarted)]
    stops = [e.offset_ms for e in stored if isinstance(e, SpeechStopped)]
    assert len(starts) == len(stops) == 2, (starts, stops)
    assert starts[0] < stops[0] < starts[1] < stops[1]


async def test_a_turn_that_ended_just_before_the_take_over_is_not_heard_again_as_the_next(
        bus) -> None:
    # "Book me in for Friday." ends turn t1, the lease is renewed and the instance dies. The
    # lease named the new turn number, t1 done, but a resume frame from before t1's last
    # words: the successor heard their end again, as a turn of its own, t2 ("Friday."), and
    # the brain answered it.
    audio = Audio()
    audio.silence(1)
    audio.speech(1.2)
    audio.silence(3)
    first = session(bus, "call-take-over-2", instance="media-a")
    seq = 0
    while first.turn_no == 0:
        seq += 1
        await audio.play(first, seq, seq, words="Book me in for Friday.")
    lease = lease_of(first)  # renewed as the turn ended; the instance dies then
    successor = session(bus, "call-take-over-2", instance="media-b", resume=lease)
    await audio.play(successor, lease.resume_seq, len(audio.frames), words="Friday.")
    stored = await events(bus, "call-take-over-2", first, successor)
    assert [(e.turn_id, e.text) for e in stored if isinstance(e, TurnUserEnded)] == [
        ("t1", "Book me in for Friday.")]


@pytest.mark.parametrize("answer", ["not begun", "playing", "played"])
async def test_a_turn_waiting_for_its_late_words_is_finished_by_the_successor(
        bus, answer: str) -> None:
    # "I would like to book an appointment on Friday.", and the recogniser, slower than the
    # max wait, had said only "I would like": the turn ended at max wait on that partial (t1),
    # its late final to revise it once it came. The instance died first. The lease resumed the
    # successor after t1, so its recogniser never heard those words: t1 stayed "I would
    # like", and the brain asked the caller to say it again.
    call_id = f"call-take-over-3-{answer.replace(' ', '-')}"
    cleared: list[bytes] = []

    async def gateway(msg) -> None:
        cleared.append(msg.data)
        await msg.respond(b'{"ok": true}')

    sub = await bus.nc.subscribe(command_subject(call_id, "clear"), cb=gateway)
    audio = Audio()
    audio.silence(1)
    audio.speech(2.0)
    audio.silence(5)
    first = session(bus, call_id, instance="media-a")
    seq = await until_max_wait(audio, first, partial="I would like")
    await audio.play(first, seq + 1, seq + 40)  # 0.8 s on, the lease renewed: it dies
    # The brain's answer to t1 ("Could you say that again?"), as the predecessor left it.
    said = {"not begun": [], "playing": [AgentSpeechStarted],
            "played": [AgentSpeechStarted, AgentSpeechFinished]}[answer]
    for kind in said:
        await bus.publish(kind(org_id=ORG, call_id=call_id, turn_id="t1"))
    successor = await take_over(bus, call_id, lease_of(first))
    await audio.play(successor, successor.lease.resume_seq, len(audio.frames),
                     words="I would like to book an appointment on Friday.")
    stored = await events(bus, call_id, first, successor)
    await sub.unsubscribe()
    assert [(e.turn_id, e.text, e.reason, e.revises) for e in stored
            if isinstance(e, TurnUserEnded)] == [
        ("t1", "I would like", "max_wait", ""),
        ("t2", "I would like to book an appointment on Friday.", "utterance_end", "t1")]
    assert successor.turn_no == 2
    # The answer to t1 stops. One not begun is cut off with nothing heard (never said). One
    # still playing on the carrier is cleared (the successor knows none of its audio, so what
    # the caller heard of it is unknown: nothing is claimed), else it played on before the
    # answer to t2 and never ended. One the predecessor played out is left to its events.
    assert [(e.turn_id, e.played_text) for e in stored
            if isinstance(e, AgentSpeechInterrupted)] == (
        [] if answer == "played" else [("t1", "")])
    assert len(cleared) == (1 if answer == "playing" else 0)


async def test_a_successors_offsets_after_a_stream_restart_are_on_the_calls_clock(bus) -> None:
    # The carrier's stream restarted (a reconnect, a DTMF redirect): a frame's timestamp starts
    # at 0 again on the new stream, and the owner's clock goes on (2 s of the first stream,
    # then the second's). The successor's clock started at its first frame's own timestamp,
    # so the speech it heard was published 2 s earlier in the call than it was.
    frames = [(SILENCE, seq, (seq - 1) * 20) for seq in range(1, 101)]  # the first stream
    second = Audio()
    second.silence(1)
    second.speech(1.0)
    second.silence(1.0)
    frames += [(frame, 5000 + n, (n - 1) * 20) for n, frame in enumerate(second.frames, 1)]
    start = time.time() - 60

    async def play(call: CallSession, first_seq: int = 1, count: int = len(frames)) -> None:
        for frame, seq, ts_ms in [f for f in frames if f[1] >= first_seq][:count]:
            await call._on_audio(frame, seq, ts_ms, start + seq * 0.02, False)

    first = session(bus, "call-take-over-4", instance="media-a")
    await play(first, count=140)  # the first stream and 0.8 s of the second: it dies
    lease = lease_of(first)
    assert lease.resume_seq > 5000
    successor = session(bus, "call-take-over-4", instance="media-b", resume=lease)
    await play(successor, lease.resume_seq)
    whole = session(bus, "call-take-over-5", instance="media-a")  # one session throughout
    await play(whole)
    offsets = [[(e.type, e.offset_ms) for e in await events(bus, call_id, call)
                if isinstance(e, SpeechStarted | SpeechStopped)]
               for call_id, call in (("call-take-over-4", successor),
                                     ("call-take-over-5", whole))]
    assert offsets[0] == offsets[1] and len(offsets[0]) == 2


async def test_keys_held_for_the_callers_words_wait_for_the_successor_to_hear_them(bus) -> None:
    # "My account number is", then 1234# while the turn is still open: the owner holds the
    # keys for the words' turn, and dies. The successor learnt the keys from the call's events
    # and published them at once, before the words it then heard again from the caught-up
    # audio: the brain answered the keys first, and the model read the words as said after.
    audio = Audio()
    audio.silence(1)
    audio.speech(1.5)
    audio.silence(3)
    first = session(bus, "call-take-over-6", instance="media-a")
    await audio.play(first, 1, 50 + 60)  # 1.2 s into the speech
    await first._on_stt(Final("my account number is"))
    for key in "1234#":  # the gateway's call.dtmf, stored and heard live
        press = CallDtmf(org_id=ORG, call_id="call-take-over-6", digit=key)
        await bus.publish(press)
        await first._on_event(press)
    assert first._keys_after_words  # held for the words' turn; the instance dies
    successor = await take_over(bus, "call-take-over-6", lease_of(first))
    await audio.play(successor, successor.lease.resume_seq, len(audio.frames),
                     words="my account number is", behind_until=110)
    stored = await events(bus, "call-take-over-6", first, successor)
    assert [(e.turn_id, e.text) for e in stored if isinstance(e, TurnUserEnded)] == [
        ("t1", "my account number is"), ("k1", "1234#")]


@pytest.mark.parametrize("after", ["revised", "no more words", "caller spoke again"])
async def test_a_turn_that_can_no_longer_be_revised_does_not_hold_the_resume_point(
        bus, after: str) -> None:
    # A turn ended at max wait on "I would like", and the lease resumed before it while its
    # late words might revise it. Then its late words came and the recogniser ended the
    # utterance (the revision published, or none due), or the caller spoke again (a cough: no
    # revision comes after that). The lease still resumed before the turn, for as long as the
    # caller said nothing more: after a long silence a successor read all of it again, and
    # past JetStream's duplicate window (2 min) published that turn's events a second time.
    call_id = f"call-take-over-7-{after.replace(' ', '-')}"
    audio = Audio()
    audio.silence(1)
    audio.speech(2.0)
    audio.silence(4)
    if after == "caller spoke again":
        audio.speech(0.3)
    audio.silence(10)
    first = session(bus, call_id, instance="media-a")
    seq = await until_max_wait(audio, first, partial="I would like")
    ended_ms = first.audio_ms
    if after == "revised":
        await first._on_stt(Final("I would like to book an appointment on Friday.",
                                  speech_final=True))
    elif after == "no more words":
        await first._on_stt(Final("I would like", speech_final=True))
    await audio.play(first, seq + 1, len(audio.frames))
    assert first.turn_no == (2 if after == "revised" else 1)
    assert lease_of(first).resume_ms > ended_ms


async def test_a_successor_publishes_nothing_the_call_already_has(bus) -> None:
    # The lease was last renewed while the caller was speaking; the turn then ended (t1
    # published) and the instance died. The successor, resuming before the turn, heard it
    # again and published its speech.stopped, transcript.final and turn.user_ended again under
    # their ids: JetStream stored each once, but live subscribers got the repeats, and in a
    # chaos run the brain cancelled the caller's next turn (keys) as if the caller had moved on.
    audio = Audio()
    audio.silence(1)
    audio.speech(1.0)
    audio.silence(3)
    first = session(bus, "call-take-over-repeat", instance="media-a")
    await audio.play(first, 1, 50 + 40)  # mid-speech: the lease's last renewal
    lease = lease_of(first)
    words = "Book me in for Friday."
    await audio.play(first, 50 + 41, len(audio.frames), words=words)
    heard: list[Event] = []

    async def live(event: Event) -> None:
        heard.append(event)

    sub = await bus.subscribe_call("call-take-over-repeat", live, org_id=ORG)
    successor = await take_over(bus, "call-take-over-repeat", lease)
    await audio.play(successor, lease.resume_seq, len(audio.frames), words=words)
    stored = await events(bus, "call-take-over-repeat", first, successor)
    await sub.unsubscribe()
    assert [(e.turn_id, e.text) for e in stored if isinstance(e, TurnUserEnded)] == [
        ("t1", words)]
    assert successor.turn_no == 1
    assert [e.type for e in heard] == []  # nothing new: every event was the predecessor's


async def test_providers_that_refused_the_call_are_not_asked_again_by_its_successor(
        bus) -> None:
    # An Italian agent on Cartesia's sonic-2, which Cartesia sunset for Italian (every request
    # refused, model_sunsetted), and Deepgram closing the call's audio with 1008 DATA-0000 (a
    # misconfigured encoding): both refused the call for good, and its session went on with
    # the fallbacks, asking neither again. The call was then taken over by another instance,
    # which knew nothing of it: it opened Deepgram again (refused again at its first audio)
    # and asked Cartesia again at its first turn. The lease carries the call's refused
    # providers: the successor starts with them.
    from parley.devkit.emulators.cartesia import CartesiaEmulator
    from parley.devkit.emulators.deepgram import DeepgramEmulator
    from parley.media.providers.cartesia_tts import CartesiaTts
    from parley.media.providers.deepgram_stt import DeepgramStt

    from .test_session_recognition import Recogniser
    from .test_session_speech import Synthesiser, say, wait_for

    call_id = "call-refused-take-over"
    deepgram, cartesia_server = DeepgramEmulator(api_key="dg"), CartesiaEmulator(api_key="key")
    await deepgram.start()
    await cartesia_server.start()
    said: list[tuple[str, str, bool]] = []
    clients: list[CartesiaTts] = []
    tasks: list[asyncio.Task[None]] = []

    def instance(name: str, resume: LeaseState | None) -> CallSession:
        """The call's session on media instance ``name``: its own providers and health."""
        clients.append(CartesiaTts("key", base_url=cartesia_server.base_url, model_id="sonic-2"))
        services = SessionServices(
            bus=bus, leases=None,  # type: ignore[arg-type]  # run() is not called
            stt=ProviderRouter("stt", {"deepgram": DeepgramStt("dg", base_url=deepgram.base_url),
                                       "backup": Recogniser("backup")},  # type: ignore[dict-item]
                               ["deepgram", "backup"], retry_initial_s=0.01),
            tts=ProviderRouter("tts", {"cartesia": clients[-1],
                                       "backup": Synthesiser("backup", said)},  # type: ignore[dict-item]
                               ["cartesia", "backup"], retry_initial_s=0.01),
            instance=name, command_timeout_s=0.05)
        call = CallSession(services, call_id=call_id, org_id=ORG, agent_id="agent",
                           settings=AgentSettings(language="it-IT"), revision=1, resume=resume)
        call._history = None  # the call's past events are read
        return call

    async def start(call: CallSession) -> None:
        """Open its recogniser as run() does, and follow it; its speaker speaks."""
        call._stt_name, call._stt = await call.s.stt.open(call._stt_chain, call._open_stt,
                                                          refused=call._stt_refused)
        call._stt_task = asyncio.create_task(call._recognise())
        tasks.extend([call._stt_task, asyncio.create_task(call._speaker())])

    def spoken(call: CallSession, turn_id: str, text: str) -> None:
        call._on_say(msgspec.structs.replace(say(turn_id, 0, text, last=True), call_id=call_id))

    try:
        predecessor = instance("media-a", None)
        await start(predecessor)
        assert predecessor._stt_name == "deepgram"
        deepgram.faults.undecodable_audio = True
        for n in range(10):
            await predecessor._inbound_frame(SILENCE, n * 20)
        await predecessor._stt_flush()
        await wait_for(lambda: predecessor._stt_name == "backup", timeout=10)
        spoken(predecessor, "t1", "Grazie per aver chiamato.")
        await wait_for(lambda: "t1" in predecessor._turns and predecessor._turns["t1"].spoken,
                       timeout=10)
        assert predecessor._turns["t1"].provider == "backup"
        assert predecessor._stt_refused == {"deepgram"}
        assert predecessor._tts_refused == {"cartesia"}
        asked = [r for s in cartesia_server.sessions for r in s.requests if r["transcript"]]
        assert len(deepgram.sessions) == 1 and len(asked) == 1

        # Killed: another instance takes the call over from its lease.
        successor = instance("media-b", lease_of(predecessor))
        await start(successor)
        assert successor._stt_name == "backup"
        assert len(deepgram.sessions) == 1  # (before: opened again, refused again)
        spoken(successor, "t2", "Come posso aiutarla oggi?")
        await wait_for(lambda: "t2" in successor._turns and successor._turns["t2"].spoken,
                       timeout=10)
        assert successor._turns["t2"].provider == "backup"
        asked = [r for s in cartesia_server.sessions for r in s.requests if r["transcript"]]
        assert len(asked) == 1  # (before: asked again, refused again)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()
        await cartesia_server.stop()
        await deepgram.stop()


async def test_a_provider_refused_just_before_the_owner_dies_is_in_the_lease_already(
        bus) -> None:
    # Deepgram refused the call for good (1008 for audio it cannot decode) and the session went
    # on with its fallback, but the lease carried the refusal only from its next renewal, up to
    # a renewal period later. An owner dying in that second left a lease without it: its
    # successor opened Deepgram again, refused again. The lease is written at once (through the
    # renewer: the same compare-and-set on the revision it holds, one writer per lease).
    from parley.devkit.emulators.deepgram import DeepgramEmulator
    from parley.media.ownership import Leases
    from parley.media.providers.deepgram_stt import DeepgramStt

    from .test_session_recognition import Recogniser
    from .test_session_speech import wait_for

    call_id = "call-refused-lease-at-once"
    deepgram = DeepgramEmulator(api_key="dg")
    await deepgram.start()
    # Renewed every 3 s (the renewer ticks every 0.3 s): none falls within the test's second.
    leases = Leases(bus, "media-a", renew_s=3.0)
    tasks: list[asyncio.Task[None]] = []

    def instance(name: str, resume: LeaseState | None) -> CallSession:
        services = SessionServices(
            bus=bus, leases=leases,
            stt=ProviderRouter("stt", {"deepgram": DeepgramStt("dg", base_url=deepgram.base_url),
                                       "backup": Recogniser("backup")},  # type: ignore[dict-item]
                               ["deepgram", "backup"], retry_initial_s=0.01),
            tts=ProviderRouter("tts", {"never": object()}, ["never"]),  # type: ignore[dict-item]
            instance=name)
        call = CallSession(services, call_id=call_id, org_id=ORG, agent_id="agent",
                           settings=QUIET, revision=1, resume=resume)
        call._history = None
        return call

    async def start(call: CallSession) -> None:
        call._stt_name, call._stt = await call.s.stt.open(call._stt_chain, call._open_stt,
                                                          refused=call._stt_refused)
        call._stt_task = asyncio.create_task(call._recognise())
        tasks.append(call._stt_task)

    try:
        kv = await leases.kv()
        predecessor = instance("media-a", None)
        revision = await leases.claim(call_id, predecessor.lease)
        assert revision is not None
        await leases.hold(call_id, revision, predecessor._lease_state, predecessor._lease_lost,
                          fence=predecessor._fence)
        await start(predecessor)
        assert predecessor._stt_name == "deepgram"
        deepgram.faults.undecodable_audio = True
        for n in range(10):
            await predecessor._inbound_frame(SILENCE, n * 20)
        await predecessor._stt_flush()
        await wait_for(lambda: predecessor._stt_name == "backup", timeout=10)
        assert predecessor._stt_refused == {"deepgram"}

        # It dies now, well within a renewal period: the lease as the bucket has it.
        async def written() -> tuple[int, LeaseState]:
            entry = await kv.get(call_id)
            return entry.revision, msgspec.json.decode(entry.value, type=LeaseState)

        deadline = time.monotonic() + 1.0
        at, lease = await written()
        while lease.refused.get("stt") != ["deepgram"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            at, lease = await written()
        assert lease.refused.get("stt") == ["deepgram"]  # (before: not until the next renewal)
        assert at == revision + 1  # written once since the claim: for the refusal
        await leases.let_go(call_id)

        successor = instance("media-b", lease)
        await start(successor)
        assert successor._stt_name == "backup"
        assert len(deepgram.sessions) == 1  # not opened again, to be refused again
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await leases.close()
        await deepgram.stop()
