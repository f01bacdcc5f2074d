"""A call's agent speech: a synthesiser that fails mid-turn is replaced, and turns never mix."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

from nats.aio.msg import Msg

from parley.common.bus import Bus, audio_subject, command_subject
from parley.common.bus.audio import decode_frame
from parley.common.configuration.models import AgentSettings
from parley.common.events import (
    AgentReplyPrepared,
    AgentSay,
    AgentSpeechFinished,
    AgentSpeechInterrupted,
    AgentSpeechProgress,
    MediaProviderSwitched,
    UsageRecorded,
)
from parley.media.playback import mark_seq
from parley.media.providers.base import ProviderError, TtsChunk
from parley.media.router import ProviderRouter
from parley.media.session import CallSession, SessionServices
from parley.media.turns import TurnEnd

ORG, CALL = "acme", "call-1"


class Stream:
    """A synthesiser stream: a chunk per clause after ``delay_s``; ``fail()`` breaks it.

    With ``stuck_second_say``, its second ``say`` is in the socket when the socket breaks.
    """

    def __init__(self, name: str, said: list[tuple[str, str, bool]], *, delay_s: float,
                 stuck_second_say: bool) -> None:
        self.name = name
        self.said = said
        self.delay_s = delay_s
        self.stuck_second_say = stuck_second_say
        self.chunks: asyncio.Queue[object] = asyncio.Queue()
        self.dead = asyncio.Event()
        self.clauses = 0
        self._synthesis: list[asyncio.Task[None]] = []

    async def say(self, text: str, *, last: bool = False) -> None:
        self.said.append((self.name, text, last))
        clause = self.clauses
        self.clauses += 1
        if self.stuck_second_say and clause == 1:
            await self.dead.wait()
        if self.dead.is_set():
            raise ProviderError(self.name, "send failed: ConnectionClosed")
        previous = self._synthesis[-1] if self._synthesis else None
        self._synthesis.append(asyncio.create_task(self._synthesise(text, clause, last,
                                                                    previous)))

    async def _synthesise(self, text: str, clause: int, last: bool,
                          previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await previous
        await asyncio.sleep(self.delay_s)
        if text:  # 100 ms of audio whose bytes are the clause's first letter
            self.chunks.put_nowait(TtsChunk(text[:1].encode() * 800, [], clause))
        if last:
            self.chunks.put_nowait(None)

    def fail(self) -> None:
        self.dead.set()
        self.chunks.put_nowait(ProviderError(self.name, "socket failed"))

    async def audio(self):
        while (item := await self.chunks.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item

    async def cancel(self) -> None:
        for task in self._synthesis:
            task.cancel()
        self.chunks.put_nowait(None)


class Synthesiser:
    def __init__(self, name: str, said: list[tuple[str, str, bool]], *, delay_s: float = 0.0,
                 stuck_second_say: bool = False) -> None:
        self.name = name
        self.said = said
        self.delay_s = delay_s
        self.stuck_second_say = stuck_second_say
        self.streams: list[Stream] = []

    async def open(self, *, voice: str = "", language: str = "en-US") -> Stream:
        stream = Stream(self.name, self.said, delay_s=self.delay_s,
                        stuck_second_say=self.stuck_second_say)
        self.streams.append(stream)
        return stream


def session(bus: Bus, *synthesisers: Synthesiser,
            settings: AgentSettings | None = None) -> CallSession:
    providers = {s.name: s for s in synthesisers}
    services = SessionServices(
        bus=bus, leases=None,  # type: ignore[arg-type]  # run() is not called
        stt=ProviderRouter("stt", {"never": object()}, ["never"]),  # type: ignore[dict-item]
        tts=ProviderRouter("tts", providers, list(providers)),  # type: ignore[arg-type]
        instance="test", command_timeout_s=0.05)
    call = CallSession(services, call_id=CALL, org_id=ORG, agent_id="agent",
                       settings=settings or AgentSettings(), revision=1)
    call._history = None  # the call's past events are read
    return call


def say(turn_id: str, seq: int, text: str, *, last: bool = False) -> AgentSay:
    return AgentSay(org_id=ORG, call_id=CALL, turn_id=turn_id, seq=seq, text=text, last=last)


async def wait_for(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def stop(call: CallSession, speaker: asyncio.Task[None]) -> None:
    """End the call's speaking as the session's run ends it: its tasks cancelled, then awaited
    (awaited uncancelled, a turn's synthesis still waiting on a synthesiser hung the test)."""
    speaker.cancel()
    for task in call._tasks:
        task.cancel()
    await asyncio.gather(speaker, *call._tasks, return_exceptions=True)
    await call._outbox.drain(1)


@contextlib.asynccontextmanager
async def speaking_with_cartesia(bus: Bus, *fallbacks: object, voice: object = None,
                                 model_id: str | None = None,
                                 settings: AgentSettings | None = None):
    """A session speaking whose synthesisers are Cartesia (its emulator, with ``voice`` if
    given), then ``fallbacks``. Yields (call, the Cartesia emulator)."""
    from parley.devkit.emulators.cartesia import CartesiaEmulator
    from parley.media.providers.cartesia_tts import CartesiaTts

    emulator = CartesiaEmulator(api_key="key", **({"voice": voice} if voice is not None else {}))
    await emulator.start()
    cartesia = CartesiaTts("key", base_url=emulator.base_url,
                           **({"model_id": model_id} if model_id else {}))
    call = session(bus, cartesia, *fallbacks, settings=settings)  # type: ignore[arg-type]
    speaker = asyncio.create_task(call._speaker())
    try:
        yield call, emulator
    finally:
        await stop(call, speaker)
        await cartesia.close()
        await emulator.stop()


async def until_spoken(call: CallSession, turn_id: str) -> None:
    """Wait (10 s at most) for the speaker to be done with the agent's turn ``turn_id``."""
    await wait_for(lambda: turn_id in call._turns and call._turns[turn_id].spoken, timeout=10)


async def cartesia_given_up(bus: Bus, call_id: str) -> MediaProviderSwitched:
    """The call's one media.provider_switched: from Cartesia to no synthesiser at all."""
    switched = [e for e in await bus.replay_call(call_id, org_id=ORG)
                if isinstance(e, MediaProviderSwitched)]
    assert [(e.kind, e.from_provider, e.to_provider) for e in switched] == [
        ("tts", "cartesia", "")]
    return switched[0]


async def test_a_send_that_fails_with_the_synthesiser_falls_back_to_the_next(bus) -> None:
    said: list[tuple[str, str, bool]] = []
    first = Synthesiser("first", said, stuck_second_say=True)
    call = session(bus, first, Synthesiser("second", said))
    speaker = asyncio.create_task(call._speaker())
    try:
        call._on_say(say("t1", 0, "Let me check that."))
        await wait_for(lambda: len(said) == 1)
        call._on_say(say("t1", 1, "One moment please.", last=True))  # the feeder sends it
        await wait_for(lambda: len(said) == 2)
        first.streams[0].fail()
        await wait_for(lambda: ("second", "One moment please.", True) in said)
        await wait_for(lambda: call._turns["t1"].audio.text_done)
    finally:
        await stop(call, speaker)


async def test_characters_count_to_the_synthesiser_each_clause_was_sent_to(bus) -> None:
    said: list[tuple[str, str, bool]] = []
    first = Synthesiser("first", said, stuck_second_say=True)
    call = session(bus, first, Synthesiser("second", said))
    speaker = asyncio.create_task(call._speaker())
    try:
        call._on_say(say("t1", 0, "Let me check that."))
        await wait_for(lambda: len(said) == 1)
        call._on_say(say("t1", 1, "One moment please.", last=True))
        await wait_for(lambda: len(said) == 2)
        first.streams[0].fail()  # its second say fails: only the first clause reached it
        await wait_for(lambda: call._turns["t1"].audio.text_done)
        await call._record_usage()
        await call._outbox.drain(1)
    finally:
        await stop(call, speaker)
    usage = {event.provider: event.quantity for event in await bus.replay_call(CALL, org_id=ORG)
             if isinstance(event, UsageRecorded) and event.kind == "tts_characters"}
    # The fallback synthesised the turn from the clause that broke, the first one.
    assert usage == {"first": len("Let me check that."),
                     "second": len("Let me check that.") + len("One moment please.")}


async def test_a_synthesiser_whose_streams_open_but_fail_before_audio_is_skipped(bus) -> None:
    # Each turn's stream opens, then breaks before its first audio: counted on open, the
    # breaker never opened and every turn waited for the failure before falling back.
    said: list[tuple[str, str, bool]] = []
    first, second = Synthesiser("first", said, delay_s=10), Synthesiser("second", said)
    call = session(bus, first, second)
    speaker = asyncio.create_task(call._speaker())
    try:
        for n in range(3):
            call._on_say(say(f"t{n}", 0, "Hello.", last=True))
            await wait_for(lambda n=n: len(first.streams) == n + 1)
            first.streams[n].fail()
            await wait_for(lambda n=n: call._turns[f"t{n}"].audio.text_done)
        assert not call.s.tts.health["first"].available
        assert call.s.tts.health["second"].available
        call._on_say(say("t3", 0, "Hello.", last=True))
        await wait_for(lambda: call._turns["t3"].audio.text_done)
        assert len(first.streams) == 3 and len(second.streams) == 4  # t3 began on second
    finally:
        await stop(call, speaker)


async def test_a_turn_closed_without_a_last_clause_survives_a_synthesiser_failure(bus) -> None:
    said: list[tuple[str, str, bool]] = []
    first = Synthesiser("first", said, delay_s=0.3)
    call = session(bus, first, Synthesiser("second", said, delay_s=0.05))
    speaker = asyncio.create_task(call._speaker())
    try:
        call._on_say(say("t1", 0, "Let me check that for you."))  # no last clause comes
        await wait_for(lambda: len(said) == 1)
        call._on_say(say("t2", 0, "Sorry, go ahead.", last=True))  # a newer turn closes t1
        await wait_for(lambda: len(said) == 2)  # t1's end: an empty last clause
        first.streams[0].fail()
        await wait_for(lambda: ("second", "", True) in said)  # t1 retried, to its end
        # t2 is not held up behind t1 (the first synthesiser still takes calls: one failure)
        await wait_for(lambda: any((text, last) == ("Sorry, go ahead.", True)
                                   for _, text, last in said))
    finally:
        await stop(call, speaker)


async def test_a_prepared_reply_plays_after_the_agent_turn_still_being_voiced(bus) -> None:
    # interruption_mode "dtmf": the caller spoke over the agent's t1 without stopping it, and
    # their turn ends with the words of the reply prepared for it while t1 is still
    # synthesised. The turn waits for t1 to play (the brain would cut t1 short for it), and
    # then the prepared reply plays.
    said: list[tuple[str, str, bool]] = []
    call = session(bus, Synthesiser("tts", said, delay_s=0.15),
                   settings=AgentSettings(interruption_mode="dtmf"))
    call.turn_no = 1  # the caller's t1 was answered by the agent's t1
    out: list[int] = []

    async def on_out(msg: Msg) -> None:
        out.extend(decode_frame(msg.data)[3][::160])  # a marker byte per 20 ms frame

    sub = await bus.nc.subscribe(audio_subject(CALL, "out"), cb=on_out)
    await bus.nc.flush()
    speaker = asyncio.create_task(call._speaker())
    try:
        call._on_say(say("t1", 0, "A one"))
        call._on_say(say("t1", 1, "A two"))
        call._on_say(say("t1", 2, "A three", last=True))
        await wait_for(lambda: len(out) > 0)
        await call._on_prepared(AgentReplyPrepared(org_id=ORG, call_id=CALL, turn_id="t2",
                                                   words="book friday", text="B sure",
                                                   last=True))
        await call._end_turn(TurnEnd("Book Friday.", "silence", 0, 600, 0, 0))
        t1 = call._turns["t1"]
        await wait_for(lambda: t1.audio.text_done and len(out) == 15)  # 5 frames a clause
        await asyncio.sleep(0.2)
        assert len(out) == 15  # nothing of the reply while t1 plays
        await call._on_progress(AgentSpeechProgress(  # t1 has played
            org_id=ORG, call_id=CALL, turn_id="t1", mark="t1:15", seq=mark_seq(0, 15)))
        await call._on_audio(b"\xff" * 160, 1, 0, time.time(), False)  # the next inbound frame
        await wait_for(lambda: len(out) == 20)
        await asyncio.sleep(0.1)
        voices = "".join("A" if byte == ord("A") else "B" for byte in out)
        assert voices == "A" * 15 + "B" * 5
    finally:
        await sub.unsubscribe()
        await stop(call, speaker)


async def test_agent_audio_paused_again_while_resuming_goes_on_once_the_lease_is_confirmed(
        bus) -> None:
    # A renewal confirmed the lease and the paused audio went on; while it waited for the
    # gateway's answer to t1's end mark, the lease went unconfirmed again (the confirmation
    # had come late) and t2's audio was paused, and the renewal that confirmed the lease again
    # came before that resume was over: it was not resumed again, and t2 waited in silence
    # for the next renewal (a second in production).
    said: list[tuple[str, str, bool]] = []
    call = session(bus, Synthesiser("tts", said))
    call.s.command_timeout_s = 2.0
    out: list[int] = []

    async def on_out(msg: Msg) -> None:
        out.extend(decode_frame(msg.data)[3][::160])  # a marker byte per 20 ms frame

    async def on_mark(msg: Msg) -> None:  # the gateway, as the lease goes unconfirmed again
        call._fence.until = time.monotonic()
        call._on_say(say("t2", 0, "B two", last=True))
        await wait_for(lambda: "t2" in call._turns and call._turns["t2"].audio.text_done)
        call._fence.confirm(math.inf)
        await msg.respond(b'{"ok": true}')

    subs = [await bus.nc.subscribe(audio_subject(CALL, "out"), cb=on_out),
            await bus.nc.subscribe(command_subject(CALL, "mark"), cb=on_mark)]
    await bus.nc.flush()
    speaker = asyncio.create_task(call._speaker())
    try:
        call._on_say(say("t1", 0, "A one"))
        await wait_for(lambda: len(out) == 5)
        call._fence.until = time.monotonic()  # unconfirmed: t1's end mark is paused
        call._on_say(say("t1", 1, "", last=True))
        await wait_for(lambda: call._turns["t1"].audio.text_done)
        call._fence.confirm(math.inf)
        await wait_for(lambda: len(out) == 10)
        assert bytes(out) == b"A" * 5 + b"B" * 5
    finally:
        for sub in subs:
            await sub.unsubscribe()
        await stop(call, speaker)


async def test_paused_agent_turns_go_on_in_the_order_they_are_spoken(bus) -> None:
    # The reply prepared for the caller's t2 came before t1.1 (what the agent said after its
    # transfer failed) began, and was released once t2 ended, after t1.1; all of it paused
    # while the lease was unconfirmed. Resumed in the order the turns were first heard of,
    # the answer to t2 went out before the rest of t1.1 and the caller heard them swapped.
    said: list[tuple[str, str, bool]] = []
    call = session(bus, Synthesiser("tts", said))
    call.turn_no = 1
    out: list[int] = []

    async def on_out(msg: Msg) -> None:
        out.extend(decode_frame(msg.data)[3][::160])  # a marker byte per 20 ms frame

    sub = await bus.nc.subscribe(audio_subject(CALL, "out"), cb=on_out)
    await bus.nc.flush()
    speaker = asyncio.create_task(call._speaker())
    try:
        call._fence.until = time.monotonic()  # unconfirmed from here on
        await call._on_prepared(AgentReplyPrepared(org_id=ORG, call_id=CALL, turn_id="t2",
                                                   words="book friday", text="B sure",
                                                   last=True))
        call._on_say(say("t1.1", 0, "A one"))
        call._on_say(say("t1.1", 1, "A two", last=True))
        await call._end_turn(TurnEnd("Book Friday.", "silence", 0, 600, 0, 0))
        await wait_for(lambda: call._current is call._turns["t2"]
                       and call._turns["t2"].spoken)
        assert out == []  # paused
        call._fence.confirm(math.inf)
        await wait_for(lambda: len(out) == 15)
        await asyncio.sleep(0.1)
        assert bytes(out) == b"A" * 10 + b"B" * 5
    finally:
        await sub.unsubscribe()
        await stop(call, speaker)


# -- the filler for slow tools -------------------------------------------------------------
# The brain sends "One moment." with a round's tool requests (filler_after_ms); media says it
# only if the turn's audio so far has played out and nothing more came for that long.

def filler(turn_id: str, seq: int, after_ms: int = 300) -> AgentSay:
    return AgentSay(org_id=ORG, call_id=CALL, turn_id=turn_id, seq=seq, text="One moment.",
                    filler_after_ms=after_ms)


async def played(call: CallSession, turn_id: str) -> None:
    """The carrier echoes the mark after the turn's audio so far: all of it was heard."""
    turn = call._turns[turn_id]
    await wait_for(lambda: turn.audio.frames and turn.audio.sent == len(turn.audio.frames))
    seq = mark_seq(turn.audio.generation, len(turn.audio.frames))
    await call._on_progress(AgentSpeechProgress(org_id=ORG, call_id=CALL, turn_id=turn_id,
                                                mark=f"{turn_id}:{seq}", seq=seq))


async def test_the_filler_is_said_once_the_tools_keep_the_caller_waiting(bus) -> None:
    said: list[tuple[str, str, bool]] = []
    call = session(bus, Synthesiser("tts", said))
    speaker = asyncio.create_task(call._speaker())
    try:
        call._on_say(say("t1", 0, "Let me check."))
        call._on_say(filler("t1", 1))
        await played(call, "t1")
        heard_at = time.monotonic()
        await wait_for(lambda: ("tts", "One moment.", False) in said, timeout=2)
        assert time.monotonic() - heard_at >= 0.25  # not before 300 ms of silence
        call._on_say(say("t1", 2, "It shipped yesterday.", last=True))
        await wait_for(lambda: [t for _, t, _ in said] == [
            "Let me check.", "One moment.", "It shipped yesterday."])
    finally:
        await stop(call, speaker)


async def test_no_filler_when_the_tools_answer_in_time(bus) -> None:
    said: list[tuple[str, str, bool]] = []
    call = session(bus, Synthesiser("tts", said))
    speaker = asyncio.create_task(call._speaker())
    try:
        call._on_say(filler("t1", 0))  # the model went straight to its tool
        await asyncio.sleep(0.1)
        call._on_say(say("t1", 1, "It shipped yesterday.", last=True))
        await wait_for(lambda: call._turns["t1"].audio.text_done)
        await asyncio.sleep(0.4)
        assert [t for _, t, _ in said] == ["It shipped yesterday."]
    finally:
        await stop(call, speaker)


async def test_the_filler_waits_for_the_audio_before_it_to_play_out(bus) -> None:
    said: list[tuple[str, str, bool]] = []
    call = session(bus, Synthesiser("tts", said))
    speaker = asyncio.create_task(call._speaker())
    try:
        call._on_say(say("t1", 0, "Let me look that up for you."))
        call._on_say(filler("t1", 1))
        await asyncio.sleep(0.6)  # its audio sent, the carrier still playing it (no echo yet)
        assert ("tts", "One moment.", False) not in said
        await played(call, "t1")
        await wait_for(lambda: ("tts", "One moment.", False) in said, timeout=2)
    finally:
        await stop(call, speaker)


async def test_a_broken_cartesia_socket_is_reopened_when_no_fallback_can_speak(bus) -> None:
    # A Spanish agent: Piper's bundled voice speaks English only, so Cartesia has no fallback.
    # Cartesia's shared socket breaks mid-turn (a redeploy, or another call's stalled context
    # taking it down): Cartesia itself must take the turn again on a new socket; skipping to
    # Piper, which refuses it, dropped the rest of the turn and the caller heard half a sentence.
    from parley.devkit.emulators.cartesia import Voice
    from parley.media.providers.local.piper_tts import PiperTts

    voice = Voice(seconds_per_character=0.06, gap_s=0.04, chunk_s=0.1, speed=2.0)
    async with speaking_with_cartesia(bus, PiperTts(), voice=voice,
                                      settings=AgentSettings(language="es-ES")) as (call, emulator):
        call._on_say(say("t1", 0, "Hola, gracias por llamar a la clínica dental."))
        call._on_say(say("t1", 1, "¿En qué puedo ayudarle hoy?", last=True))
        await wait_for(lambda: "t1" in call._turns and call._turns["t1"].audio.frames)
        await asyncio.gather(*(ws.close(code=1011, message=b"going away")
                               for ws in list(emulator.sockets)))
        turn = call._turns["t1"]
        await wait_for(lambda: turn.audio.text_done, timeout=10)
        assert len(emulator.sessions) == 2  # a new socket took the turn up again
        assert [r["transcript"] for r in emulator.sessions[1].requests][-1] == (
            "¿En qué puedo ayudarle hoy?")
        assert [w.text for w in turn.audio.words][-1] == "hoy?"


async def test_a_turn_no_synthesiser_can_finish_ends_with_the_audio_it_has(bus) -> None:
    # Cartesia alone, and down for good mid-turn (its socket breaks, reconnecting is refused):
    # the rest of the turn cannot be said. The audio already sent still plays, and the turn
    # must end when it has: left without its end, it never finished, no agent.speech.finished
    # came, and the idle clock counted the call busy for the rest of it.
    from parley.devkit.emulators.cartesia import Voice

    voice = Voice(seconds_per_character=0.06, gap_s=0.04, chunk_s=0.1, speed=2.0)
    async with speaking_with_cartesia(bus, voice=voice) as (call, emulator):
        call._on_say(say("t1", 0, "Thanks for calling the dental clinic."))
        call._on_say(say("t1", 1, "How can I help you today?", last=True))
        await wait_for(lambda: "t1" in call._turns and call._turns["t1"].audio.frames)
        emulator.faults.reject_status = 503
        await asyncio.gather(*(ws.close(code=1011, message=b"going away")
                               for ws in list(emulator.sockets)))
        turn = call._turns["t1"]
        await wait_for(lambda: turn.spoken, timeout=10)
        await played(call, "t1")
        assert turn.audio.finished
        await call._outbox.drain(1)
        events = await bus.replay_call(CALL, org_id=ORG)
        assert [e.turn_id for e in events if isinstance(e, AgentSpeechFinished)] == ["t1"]


async def test_a_fallback_mid_clause_says_only_the_rest_of_it(bus) -> None:
    # Cartesia breaks for good while saying a clause (its socket closes, reconnecting is
    # refused): Piper takes the turn. The clause's first words have already gone out to the
    # caller; said again from the clause's start, the caller heard them twice, and so did what
    # the caller heard (played_text) record them.
    from parley.devkit.emulators.cartesia import Voice
    from parley.media.providers.local.piper_tts import PiperTts

    clause = "Thanks for calling the dental clinic, how can I help you today?"
    voice = Voice(seconds_per_character=0.06, gap_s=0.04, chunk_s=0.1, speed=1.0)
    async with speaking_with_cartesia(bus, PiperTts(), voice=voice) as (call, emulator):
        call._on_say(say("t1", 0, clause, last=True))
        await wait_for(lambda: "t1" in call._turns and len(call._turns["t1"].audio.words) >= 3)
        emulator.faults.reject_status = 503
        await asyncio.gather(*(ws.close(code=1011, message=b"going away")
                               for ws in list(emulator.sockets)))
        turn = call._turns["t1"]
        await wait_for(lambda: turn.audio.text_done, timeout=20)
        assert turn.provider == "piper"
        assert [w.text for w in turn.audio.words] == clause.split()
        await played(call, "t1")
        await call._interrupt(turn, time.monotonic())  # the caller cuts in at its very end
        await call._outbox.drain(1)
    interrupted, = [e for e in await bus.replay_call(CALL, org_id=ORG)
                    if isinstance(e, AgentSpeechInterrupted)]
    assert interrupted.played_text == clause


async def test_a_synthesiser_that_refuses_the_call_for_good_is_not_asked_again(bus) -> None:
    # An Italian agent on sonic-2, which Cartesia sunset for Italian: every request is a
    # model_sunsetted error (permanent, 400), and Cartesia has no fallback. Each turn asked
    # Cartesia, then the whole chain again, Cartesia again: two refused requests a turn for the
    # rest of the call. Refused for good, Cartesia is not asked again on this call; the turns
    # end (with no audio) and media.provider_switched (to none) says why the agent is silent.
    async with speaking_with_cartesia(bus, model_id="sonic-2",
                                      settings=AgentSettings(language="it-IT")) as (call, emulator):
        call.s.tts.retry_initial_s = 0.01
        call._on_say(say("t1", 0, "Grazie per aver chiamato lo studio dentistico.", last=True))
        await until_spoken(call, "t1")
        call._on_say(say("t2", 0, "Come posso aiutarla oggi?", last=True))
        await until_spoken(call, "t2")
        requests = [r for s in emulator.sessions for r in s.requests if r["transcript"]]
        assert len(requests) == 1  # refused once; not asked again, that turn or the next
        assert call._turns["t2"].audio.text_done
        await call._outbox.drain(1)
        assert "sunset" in (await cartesia_given_up(bus, CALL)).reason


async def test_calls_refused_a_sunset_model_leave_cartesia_to_the_other_calls(bus) -> None:
    # Italian calls on sonic-2, which Cartesia sunset for Italian (model_sunsetted, since
    # dbc0270): each is refused, rightly for that call, and goes to the fallback; but each
    # refusal counted against Cartesia's breaker, shared by every call of the process, which
    # opened after three: the English calls Cartesia serves fine were switched to the fallback
    # voice for the next 30 s. A refusal of the call's own request leaves Cartesia's health
    # alone (the call still does not ask it again); an outage still counts.
    from parley.devkit.emulators.cartesia import CartesiaEmulator
    from parley.media.providers.cartesia_tts import CartesiaTts

    emulator = CartesiaEmulator(api_key="key")
    await emulator.start()
    cartesia = CartesiaTts("key", base_url=emulator.base_url, model_id="sonic-2")
    said: list[tuple[str, str, bool]] = []
    services = SessionServices(
        bus=bus, leases=None,  # type: ignore[arg-type]  # run() is not called
        stt=ProviderRouter("stt", {"never": object()}, ["never"]),  # type: ignore[dict-item]
        tts=ProviderRouter("tts", {"cartesia": cartesia, "backup": Synthesiser("backup", said)},
                           ["cartesia", "backup"], retry_initial_s=0.01),  # type: ignore[dict-item]
        instance="test", command_timeout_s=0.05)
    calls: list[tuple[CallSession, asyncio.Task[None]]] = []

    async def one_turn(call_id: str, language: str, text: str) -> str:
        call = CallSession(services, call_id=call_id, org_id=ORG, agent_id="agent",
                           settings=AgentSettings(language=language), revision=1)
        call._history = None  # the call's past events are read
        calls.append((call, asyncio.create_task(call._speaker())))
        call._on_say(AgentSay(org_id=ORG, call_id=call_id, turn_id="t1", seq=0, text=text,
                              last=True))
        await wait_for(lambda: "t1" in call._turns and call._turns["t1"].audio.text_done,
                       timeout=10)
        assert call._tts_refused == ({"cartesia"} if language == "it-IT" else set())
        return call._turns["t1"].provider

    try:
        for n in range(5):
            assert await one_turn(f"call-it-{n}", "it-IT", "Grazie per aver chiamato.") == (
                "backup")
        assert services.tts.health["cartesia"].available  # (before: open after three)
        assert await one_turn("call-en", "en-US", "Thanks for calling.") == "cartesia"
    finally:
        for call, speaker in calls:
            await stop(call, speaker)
        await cartesia.close()
        await emulator.stop()


async def test_an_error_for_no_context_is_no_calls_refusal_of_cartesia(bus) -> None:
    # Cartesia's error event names its context only "when available". One without it fails
    # every turn waiting for audio on the shared socket (ead306e); a permanent one (a 400)
    # marked Cartesia refused for the rest of each of those calls, though it was about one
    # request at most: here two calls on one socket, with no fallback, were left with no
    # synthesiser at all. Since it cannot be said whose it was, it is no call's refusal: each
    # waiting turn fails transiently, is taken up again on Cartesia and said.
    from parley.devkit.emulators.cartesia import CartesiaEmulator, Voice
    from parley.media.providers.cartesia_tts import CartesiaTts

    emulator = CartesiaEmulator(api_key="key", voice=Voice(first_byte_s=0.5))
    await emulator.start()
    cartesia = CartesiaTts("key", base_url=emulator.base_url)
    services = SessionServices(
        bus=bus, leases=None,  # type: ignore[arg-type]  # run() is not called
        stt=ProviderRouter("stt", {"never": object()}, ["never"]),  # type: ignore[dict-item]
        tts=ProviderRouter("tts", {"cartesia": cartesia}, ["cartesia"],  # type: ignore[dict-item]
                           retry_initial_s=0.01),
        instance="test", command_timeout_s=0.05)
    calls: list[tuple[CallSession, asyncio.Task[None]]] = []

    def speaking(call_id: str, text: str) -> CallSession:
        call = CallSession(services, call_id=call_id, org_id=ORG, agent_id="agent",
                           settings=AgentSettings(), revision=1)
        call._history = None  # the call's past events are read
        calls.append((call, asyncio.create_task(call._speaker())))
        call._on_say(AgentSay(org_id=ORG, call_id=call_id, turn_id="t1", seq=0, text=text,
                              last=True))
        return call

    def waiting_for_audio() -> int:
        connection = cartesia._connection
        return sum(stream.awaiting_audio for stream in connection.streams.values()) if (
            connection is not None) else 0

    try:
        first = speaking("call-a", "Thanks for calling.")
        await wait_for(lambda: waiting_for_audio() == 1, timeout=10)
        emulator.faults.error_status = 400  # the second call's request, for no context
        emulator.faults.error_without_context = True
        second = speaking("call-b", "Good morning.")
        for call in (first, second):
            await wait_for(lambda call=call: "t1" in call._turns and (
                call._turns["t1"].audio.text_done), timeout=10)
        assert len(emulator.sessions) == 1  # (one socket, both calls on it)
        for call in (first, second):
            assert not call._tts_refused, call.call_id
            assert call._turns["t1"].audio.frames, call.call_id  # said, on Cartesia
            assert not call.stopped.is_set()
        # a 400 about some call's request is not Cartesia failing: not held against its health
        # (once per turn it failed, it could open the breaker for every call in the process)
        assert services.tts.health["cartesia"].error_rate == 0
    finally:
        for call, speaker in calls:
            await stop(call, speaker)
        await cartesia.close()
        await emulator.stop()


@contextlib.asynccontextmanager
async def cartesia_only_call(bus: Bus, call_id: str, *, settings: AgentSettings | None = None,
                             model_id: str | None = None):
    """A live call whose only synthesiser is Cartesia (its emulator), hangups noted.

    Yields (call, the Cartesia emulator, hangups: (reason, monotonic time) of each).
    """
    import json

    from parley.devkit.emulators.cartesia import CartesiaEmulator
    from parley.devkit.emulators.deepgram import DeepgramEmulator
    from parley.media.ownership import Leases, LeaseState
    from parley.media.providers.cartesia_tts import CartesiaTts
    from parley.media.providers.deepgram_stt import DeepgramStt

    deepgram, cartesia_server = DeepgramEmulator(api_key="dg"), CartesiaEmulator(api_key="key")
    await deepgram.start()
    await cartesia_server.start()
    cartesia = CartesiaTts("key", base_url=cartesia_server.base_url,
                           **({"model_id": model_id} if model_id else {}))
    leases = Leases(bus, "media-a")
    services = SessionServices(
        bus=bus, leases=leases, instance="media-a",
        stt=ProviderRouter("stt", {"deepgram": DeepgramStt("dg", base_url=deepgram.base_url)},
                           ["deepgram"]),  # type: ignore[dict-item]
        tts=ProviderRouter("tts", {"cartesia": cartesia}, ["cartesia"],  # type: ignore[dict-item]
                           retry_initial_s=0.01))
    revision = await leases.claim(call_id, LeaseState(owner="media-a", org_id=ORG))
    assert revision is not None
    hangups: list[tuple[str, float]] = []

    async def gateway(msg: Msg) -> None:
        if msg.subject.endswith(".hangup"):
            hangups.append((json.loads(msg.data)["reason"], time.monotonic()))
        await msg.respond(b'{"ok": true}')

    sub = await bus.nc.subscribe(f"parley.cmd.gateway.{call_id}.*", cb=gateway)
    await bus.nc.flush()
    call = CallSession(services, call_id=call_id, org_id=ORG, agent_id="agent",
                       settings=settings or AgentSettings(), revision=revision)
    call.running = asyncio.create_task(call.run())  # type: ignore[attr-defined]
    try:
        await wait_for(lambda: call._history is None, timeout=10)  # live
        yield call, cartesia_server, hangups
    finally:
        call.stop("test")
        await asyncio.gather(call.running, return_exceptions=True)  # type: ignore[attr-defined]
        await sub.unsubscribe()
        await leases.close()
        await cartesia.close()
        await cartesia_server.stop()
        await deepgram.stop()


def said(call_id: str, turn_id: str, text: str) -> AgentSay:
    return AgentSay(org_id=ORG, call_id=call_id, turn_id=turn_id, seq=0, text=text, last=True)


async def test_a_call_no_synthesiser_can_speak_for_is_hung_up(bus) -> None:
    # The agent's only synthesiser refuses it for good (an Italian agent on sonic-2, which
    # Cartesia sunset for Italian). The turn ended silent, and so did every later one: the
    # caller heard nothing for the rest of the call while the brain kept answering, and the
    # call was never hung up. Now, as when no recogniser is left, the call is hung up (reason
    # error; the agent has no transfer for it) and media.provider_switched says why.
    async with cartesia_only_call(bus, CALL, settings=AgentSettings(language="it-IT"),
                                  model_id="sonic-2") as (call, _, hangups):
        await bus.publish(say("t1", 0, "Grazie per aver chiamato.", last=True))
        done, _ = await asyncio.wait([call.running], timeout=10)
        assert done, "the call was not ended"  # (before: it went on, silent)
        assert call.end_reason == "tts_failed"
        assert [reason for reason, _ in hangups] == ["error"]
        assert "sunset" in (await cartesia_given_up(bus, CALL)).reason


async def test_the_hang_up_for_no_synthesiser_waits_for_the_agent_audio_already_out(bus) -> None:
    # The agent's answer was synthesised and sent to the carrier, which plays it over some
    # seconds; then Cartesia went down (its socket dropped, every reconnect a 503) and the next
    # turn found no synthesiser to open. The call was hung up at once, cutting off the answer
    # the caller was still hearing, though nothing stopped it from playing. Now the hang-up
    # waits for the audio already out to play (its last mark echoed, or its length at most).
    # (Its give-up bound at 0: the first turn with no synthesiser ends the call.)
    call_id = "call-tts-gone-after-audio"
    async with cartesia_only_call(bus, call_id) as (call, cartesia_server, hangups):
        call.tts_give_up_after_s = 0.0
        # About 10 s of audio at the emulator's pace: all of it sent at once.
        await bus.publish(said(call_id, "t1", "Your appointment is confirmed for Friday the "
                                              "twelfth at ten in the morning with doctor "
                                              "Patel, please arrive fifteen minutes early."))
        await wait_for(lambda: "t1" in call._turns, timeout=10)
        t1 = call._turns["t1"].audio
        await wait_for(lambda: t1.text_done and t1.frames and t1.sent == len(t1.frames),
                       timeout=20)
        cartesia_server.faults.reject_status = 503
        for ws in list(cartesia_server.sockets):
            await ws.close()
        await bus.publish(said(call_id, "t2", "Is there anything else?"))
        await wait_for(lambda: call.end_reason == "tts_failed" or any(
            turn.audio.text_done for turn_id, turn in call._turns.items() if turn_id == "t2"),
            timeout=10)
        await asyncio.sleep(0.5)
        assert hangups == []  # (before: hung up at once, t1 cut off as it played)
        seq = mark_seq(t1.generation, len(t1.frames))
        echoed = time.monotonic()
        await call._on_progress(AgentSpeechProgress(org_id=ORG, call_id=call_id, turn_id="t1",
                                                    mark=f"t1:{seq}", seq=seq))
        done, _ = await asyncio.wait([call.running], timeout=10)
        assert done, "the call was not ended"
        assert call.end_reason == "tts_failed"
        assert [reason for reason, _ in hangups] == ["error"] and hangups[0][1] >= echoed
        await cartesia_given_up(bus, call_id)


async def test_a_turn_no_synthesiser_opened_for_does_not_end_the_call_the_next_serves(
        bus) -> None:
    # Cartesia, the agent's only synthesiser, answered 503 to both opening attempts of one
    # turn (0.1 s apart): since 02181c6 the call was hung up (tts_failed) at that first turn,
    # though Cartesia was back a second later. Now that turn ends unsaid, and the call is hung
    # up only once every synthesiser refused it for good, or none has spoken for 30 s.
    call_id = "call-tts-blip"
    async with cartesia_only_call(bus, call_id) as (call, cartesia_server, hangups):
        cartesia_server.faults.reject_status = 503
        await bus.publish(said(call_id, "t1", "One moment please."))
        await wait_for(lambda: "t1" in call._turns and call._turns["t1"].audio.text_done,
                       timeout=10)
        assert call._turns["t1"].audio.frames == []  # unsaid
        await asyncio.sleep(0.3)
        assert hangups == [] and not call.end_reason and not call.running.done()
        cartesia_server.faults.reject_status = None  # back
        await bus.publish(said(call_id, "t2", "Your appointment is on Friday."))
        await wait_for(lambda: "t2" in call._turns and call._turns["t2"].audio.text_done,
                       timeout=10)
        assert call._turns["t2"].audio.frames  # said
        assert hangups == [] and not call.end_reason


async def test_a_synthesiser_at_its_concurrency_limit_is_asked_again_not_refused(bus) -> None:
    # Cartesia's concurrency limit counts the contexts active at once across the account: at a
    # peak, a turn's context gets an error event with status 429, concurrency_limited (its API
    # Errors page). Taken as permanent like any 4xx, since 44b94e0 Cartesia was refused for the
    # rest of the call, and with no fallback the call was hung up (tts_failed) over a moment's
    # peak. A 429 is transient: the turn is taken up again on Cartesia and said, and the call
    # goes on.
    async with speaking_with_cartesia(bus) as (call, emulator):
        call.s.tts.retry_initial_s = 0.01
        emulator.faults.error_status = 429  # the turn's first request
        call._on_say(say("t1", 0, "Thanks for calling the dental clinic.", last=True))
        await until_spoken(call, "t1")
        turn = call._turns["t1"]
        assert [w.text for w in turn.audio.words] == "Thanks for calling the dental clinic.".split()
        assert not call.stopped.is_set() and not call._tts_refused
        call._on_say(say("t2", 0, "How can I help?", last=True))
        await until_spoken(call, "t2")
        assert call._turns["t2"].audio.frames


async def test_a_synthesiser_that_opens_but_fails_every_stream_ends_the_call_in_time(bus) -> None:
    # Cartesia, the agent's only synthesiser, takes every context and answers each request
    # with an error before any audio (a 503 from its backend, transient). Each turn's stream
    # opened, failed, was taken up once more on a new context, failed again, and the turn
    # ended unsaid; but the give-up bound started only when no synthesiser opened at all, so
    # it never started: every turn went unsaid, the brain kept answering a caller who heard
    # nothing, and the call was never hung up. No audio for tts_give_up_after_s while turns
    # wanted some now counts, whether or not the streams open.
    from parley.devkit.emulators.cartesia import CartesiaFaults

    class EveryRequestFails(CartesiaFaults):
        @property  # type: ignore[override]
        def error_status(self) -> int:
            return 503

        @error_status.setter
        def error_status(self, value: object) -> None:
            pass  # (the emulator spends a fault by setting it back to None: this one stays)

    call_id = "call-tts-opens-then-fails"
    async with cartesia_only_call(bus, call_id) as (call, cartesia_server, hangups):
        call.tts_give_up_after_s = 1.0
        cartesia_server.faults = EveryRequestFails()
        await bus.publish(said(call_id, "t1", "One moment please."))
        await wait_for(lambda: "t1" in call._turns and call._turns["t1"].spoken, timeout=10)
        assert call._turns["t1"].audio.frames == []  # unsaid
        assert any(session.requests for session in cartesia_server.sessions)  # (it opened)
        await asyncio.sleep(0.2)
        assert hangups == [] and not call.end_reason  # one turn unsaid ends no call
        for n in range(2, 12):  # the brain goes on answering
            if call.running.done():  # type: ignore[attr-defined]
                break
            await bus.publish(said(call_id, f"t{n}", "Are you still there?"))
            await asyncio.sleep(0.3)
        done, _ = await asyncio.wait([call.running], timeout=5)  # type: ignore[attr-defined]
        assert done, "the call was not ended"  # (before: it went on, every turn unsaid)
        assert call.end_reason == "tts_failed"
        assert [reason for reason, _ in hangups] == ["error"]
