"""Media through the vendors' protocols, and falling back to the local providers mid-call.

Gateway, recorder and media run as processes (see ``conftest``); the Deepgram and Cartesia
emulators run in this process, so the test can break them while a call is live. Media gets both
vendors' keys and URLs, so its chains are ``deepgram → whisper`` and ``cartesia → piper``.
The caller's first utterance is a noise burst: webrtcvad and the Deepgram emulator both take it
for speech, and the emulator answers with its scripted transcript. After a switch to Whisper the
caller speaks a real (Piper-synthesised) sentence, since Whisper must understand it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from parley.devkit.emulators.cartesia import CartesiaEmulator
from parley.devkit.emulators.deepgram import DeepgramEmulator
from parley.devkit.telephony.audio_codec import ulaw_encode
from parley.devkit.telephony.call_script import CallScript, Utterance
from parley.media.audio.codec import ulaw_to_pcm16_array
from parley.media.audio.resample import pcm16_to_float32, resample
from parley.media.providers.local.whisper_stt import load_model, transcribe

from .conftest import Platform, stored_call
from .test_media_calls import Brain, simulator, synthesise, words

pytestmark = pytest.mark.timeout(180)

DEEPGRAM_KEY = "e2e-deepgram-key"
CARTESIA_KEY = "e2e-cartesia-key"
BOOKING = "I would like to book a cleaning."


def noise_burst(seconds: float, *, seed: int = 0) -> bytes:
    """Loud white noise as 8 kHz µ-law: speech to webrtcvad and to the Deepgram emulator."""
    rng = np.random.default_rng(seed)
    pcm = np.clip(rng.normal(0.0, 3000.0, round(seconds * 8000)), -32768, 32767)
    return ulaw_encode(pcm.astype(np.int16))


@pytest.fixture
async def deepgram() -> AsyncIterator[DeepgramEmulator]:
    emulator = DeepgramEmulator(api_key=DEEPGRAM_KEY, utterances=[BOOKING])
    await emulator.start()
    yield emulator
    await emulator.stop()


@pytest.fixture
async def cartesia() -> AsyncIterator[CartesiaEmulator]:
    emulator = CartesiaEmulator(api_key=CARTESIA_KEY)
    await emulator.start()
    yield emulator
    await emulator.stop()


async def start_media(platform: Platform, deepgram: DeepgramEmulator,
                      cartesia: CartesiaEmulator) -> None:
    name = "media-vendors"
    proc = platform.spawn("media", name, PARLEY_INSTANCE_ID=name,
                          PARLEY_DEEPGRAM_API_KEY=DEEPGRAM_KEY,
                          PARLEY_DEEPGRAM_URL=deepgram.base_url,
                          PARLEY_CARTESIA_API_KEY=CARTESIA_KEY,
                          PARLEY_CARTESIA_URL=cartesia.base_url)
    log = platform.logs / f"{name}.log"
    deadline = time.monotonic() + 60
    while "media ready" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        await asyncio.sleep(0.1)
    assert "stt deepgram,whisper, tts cartesia,piper" in log.read_text(), log.read_text()


async def understood(agent_audio: bytes) -> list[str]:
    """What Whisper makes of the agent audio the caller received."""
    model = await asyncio.to_thread(load_model)
    pcm = resample(pcm16_to_float32(ulaw_to_pcm16_array(agent_audio)), 8000, 16000)
    return words((await asyncio.to_thread(transcribe, model, np.asarray(pcm), words=False)).text)


async def test_a_call_runs_on_the_vendors(platform: Platform, bus, deepgram: DeepgramEmulator,
                                          cartesia: CartesiaEmulator) -> None:
    await start_media(platform, deepgram, cartesia)
    answer = ["Sure, we have a slot on Tuesday,", "does ten work for you?"]
    brain = Brain(bus, {"t1": answer})
    await brain.start()
    script = CallScript(utterances=(Utterance(audio=noise_burst(1.2), label="booking", at=0.5),),
                        reply_timeout=20.0)
    result = await simulator(platform, script).run()
    assert not result.protocol_errors

    final, = await brain.wait("transcript.final")
    assert final.provider == "deepgram" and final.text == BOOKING and final.words
    ended, = await brain.wait("turn.user_ended")
    assert ended.turn_id == "t1" and ended.text == BOOKING
    # Deepgram ends the utterance 100 ms before media's own end of turn (half the agent's
    # 600 ms endpointing): the words are known while the turn is still open.
    assert deepgram.sessions[0].params["endpointing"] == "200"
    assert final.at < ended.at
    await brain.wait("agent.speech.finished")
    assert not brain.of("media.provider_switched")
    latency = result.latencies_ms[0]
    assert latency is not None and latency < 3000, result.turns
    # The emulator speaks 60 ms of tone per character plus 40 ms per word.
    assert result.stream is not None
    agent_s = sum(len(audio) for _, audio in result.stream.agent_audio) / 8000
    expected_s = sum(len(w) * 0.06 + 0.04 for w in " ".join(answer).split())
    assert abs(agent_s - expected_s) < 0.3, (agent_s, expected_s)
    assert [request["transcript"] for request in cartesia.sessions[0].requests
            if not request.get("flush")] == answer
    assert not cartesia.sessions[0].undocumented  # flushes as Cartesia documents them

    await stored_call(platform.database_url, brain.call_id, until="usage.recorded")
    await brain.wait("usage.recorded", count=2)
    usage = {(u.kind, u.provider): u.quantity for u in brain.of("usage.recorded")}
    assert set(usage) == {("stt_seconds", "deepgram"), ("tts_characters", "cartesia")}, usage
    assert usage[("tts_characters", "cartesia")] == sum(map(len, answer))
    assert usage[("stt_seconds", "deepgram")] >= result.duration - 1.0


async def test_a_broken_recogniser_is_replaced_by_whisper(
        platform: Platform, bus, deepgram: DeepgramEmulator, cartesia: CartesiaEmulator) -> None:
    await start_media(platform, deepgram, cartesia)
    follow_up = await synthesise("Next Tuesday at three in the afternoon would be perfect.")
    brain = Brain(bus, {"t1": ["When would you like to come in?"], "t2": ["Perfect."]})
    await brain.start()
    script = CallScript(utterances=(Utterance(audio=noise_burst(1.2), label="booking", at=0.5),
                                    Utterance(audio=follow_up, label="when", pause=1.0)),
                        reply_timeout=20.0)
    call = asyncio.create_task(simulator(platform, script).run())

    first, = await brain.wait("turn.user_ended")
    assert first.text == BOOKING
    deepgram.faults.close_with_error = True  # the socket dies on the next audio it gets
    switched, = await brain.wait("media.provider_switched", timeout=10)
    assert (switched.kind, switched.from_provider, switched.to_provider) == (
        "stt", "deepgram", "whisper"), switched
    assert "deepgram" in switched.reason

    second = (await brain.wait("turn.user_ended", count=2, timeout=40))[1]
    # Whisper heard the follow-up. On a starved CPU its final may come after the turn's max
    # wait, which then ends the turn with the partial words; the final is that turn's late words.
    finals = await brain.wait("transcript.final", count=2, timeout=20)
    assert [f.provider for f in finals] == ["deepgram", "whisper"], finals
    assert {"tuesday", "afternoon"} <= set(words(finals[1].text)), finals[1].text
    assert second.reason == "max_wait" or second.text == finals[1].text, (second, finals)
    result = await call
    assert not result.protocol_errors
    assert all(latency is not None for latency in result.latencies_ms), result.turns

    await stored_call(platform.database_url, brain.call_id, until="usage.recorded")
    await brain.wait("usage.recorded", count=3)
    usage = {(u.kind, u.provider) for u in brain.of("usage.recorded")}
    assert {("stt_seconds", "deepgram"), ("stt_seconds", "whisper")} <= usage, usage


@pytest.mark.parametrize("fault", ["error", "stall"])
async def test_a_broken_synthesiser_is_replaced_by_piper(
        platform: Platform, bus, deepgram: DeepgramEmulator, cartesia: CartesiaEmulator,
        fault: str) -> None:
    await start_media(platform, deepgram, cartesia)
    answer = ["Your cleaning is booked for Tuesday morning."]
    brain = Brain(bus, {"t1": answer})
    await brain.start()
    if fault == "error":
        cartesia.faults.error_status = 503  # transient: the next request gets an error
    else:
        cartesia.faults.stall = True  # the socket stays open and says nothing
    script = CallScript(utterances=(Utterance(audio=noise_burst(1.2), label="booking", at=0.5),),
                        reply_timeout=20.0)
    result = await simulator(platform, script).run()
    assert not result.protocol_errors

    switched, = await brain.wait("media.provider_switched")
    assert (switched.kind, switched.from_provider, switched.to_provider) == (
        "tts", "cartesia", "piper"), switched
    await brain.wait("agent.speech.finished")
    assert result.latencies_ms[0] is not None, result.turns
    assert result.stream is not None
    heard = await understood(b"".join(audio for _, audio in result.stream.agent_audio))
    # Whisper tiny on Piper's voice (which varies from run to run) mishears a word here and
    # there ("booked" → "book", "cleaning" → "claiming" on a CI run): most of them will do.
    assert len({"cleaning", "book", "booked", "tuesday", "morning"} & set(heard)) >= 3, heard

    await stored_call(platform.database_url, brain.call_id, until="usage.recorded")
    await brain.wait("usage.recorded", count=2)
    usage = {(u.kind, u.provider): u.quantity for u in brain.of("usage.recorded")}
    assert usage[("tts_characters", "piper")] == len(answer[0]), usage
