"""Test audio: realistic caller utterances, synthesised by the bundled Piper voice as a phone
line carries them (8 kHz µ-law), shared by the VAD, local STT and WER tests.
"""

from __future__ import annotations

import asyncio

import numpy as np

from parley.media.audio.codec import pcm16_array_to_ulaw, ulaw_to_pcm16_array
from parley.media.audio.frames import ULAW_FRAME_BYTES
from parley.media.providers.local.piper_tts import PiperTts

SILENCE_FRAME = b"\xff" * ULAW_FRAME_BYTES  # µ-law digital silence, 20 ms

# What callers say to a phone agent for a clinic, salon, restaurant or trades business.
UTTERANCES = [
    "Hi, I would like to book an appointment for next Tuesday morning.",
    "How much does a standard cleaning cost?",
    "What time do you open on Saturday?",
    "Are you open on Sunday afternoon?",
    "My name is Sarah Johnson.",
    "Can I reschedule my appointment to Friday at three?",
    "I need to cancel my booking for tomorrow.",
    "My phone number is five five five, two one three, four eight seven nine.",
    "Do you take walk ins or do I need a reservation?",
    "I would like a table for four people at seven thirty tonight.",
    "Is there parking near your office?",
    "Can you send me a confirmation by text message?",
    "What is your address?",
    "I am calling about the invoice I received last week.",
    "Do you accept credit cards?",
    "My date of birth is the twelfth of March, nineteen eighty five.",
    "Could I speak to a manager please?",
    "The heating in my apartment stopped working this morning.",
    "How long does the repair usually take?",
    "Yes, that works for me, thank you very much.",
    "No, I would prefer something later in the afternoon.",
    "My order number is seven four two nine one.",
    "Can you tell me your prices for a haircut and color?",
    "I would like to speak to someone about my insurance claim.",
    "My last name is Patel, that is P A T E L.",
    "Do you have anything available around half past two?",
    "My email is john dot smith at gmail dot com.",
    "We are a party of twelve, is that okay?",
]


async def synthesise_all(texts: list[str]) -> list[bytes]:
    """Each text as 8 kHz µ-law from the local Piper provider (one stream per text)."""
    tts = PiperTts()
    out = []
    for text in texts:
        stream = await tts.open()
        await stream.say(text, last=True)
        out.append(b"".join([chunk.audio async for chunk in stream.audio()]))
    return out


def synthesise(texts: list[str]) -> list[bytes]:
    """Synchronous :func:`synthesise_all`, for module-scoped fixtures."""
    return asyncio.run(synthesise_all(texts))


def phone_line(ulaw: bytes, *, seed: int = 0, noise_dbfs: float = -50.0) -> bytes:
    """What a phone line does to it: band-limit to 300-3400 Hz, add a little hiss, re-encode."""
    samples = ulaw_to_pcm16_array(ulaw).astype(np.float64)
    spectrum = np.fft.rfft(samples)
    frequencies = np.fft.rfftfreq(len(samples), 1 / 8000)
    spectrum[(frequencies < 300) | (frequencies > 3400)] = 0
    band = np.fft.irfft(spectrum, len(samples))
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 32768 * 10 ** (noise_dbfs / 20), len(samples))
    return pcm16_array_to_ulaw(np.clip(np.rint(band + noise), -32768, 32767).astype(np.int16))


def frames(ulaw: bytes) -> list[bytes]:
    """Whole 20 ms µ-law frames (the tail is padded with silence)."""
    padded = ulaw + b"\xff" * (-len(ulaw) % ULAW_FRAME_BYTES)
    return [padded[i : i + ULAW_FRAME_BYTES] for i in range(0, len(padded), ULAW_FRAME_BYTES)]
