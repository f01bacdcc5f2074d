"""Caller utterances from text, spoken by Piper (offline), cached on disk.

Piper lives in the media service's package; the devkit imports it lazily, as ``parley
knowledge`` does the brain, so the CLI works without it until text is to be spoken. Each text
is synthesised once and kept as 8 kHz µ-law under ``cache_dir`` (keyed by the text), so a second
``parley demo`` skips loading the voice altogether.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from parley.devkit.infra import InfraError

_VERSION = "piper-joe-1"  # part of the cache key: change it when the voice or format changes


async def speak(texts: Sequence[str], cache_dir: Path | None = None) -> list[bytes]:
    """8 kHz µ-law audio of each text, in order."""
    audio: list[bytes | None] = [None] * len(texts)
    missing = []
    for index, text in enumerate(texts):
        cached = _cache_path(cache_dir, text)
        if cached is not None and cached.is_file():
            audio[index] = cached.read_bytes()
        else:
            missing.append(index)
    if missing:
        tts = _piper()
        for index in missing:
            stream = await tts.open()
            await stream.say(texts[index], last=True)
            spoken = b"".join([chunk.audio async for chunk in stream.audio()])
            audio[index] = spoken
            cached = _cache_path(cache_dir, texts[index])
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                partial = cached.with_suffix(".tmp")
                partial.write_bytes(spoken)
                partial.replace(cached)
    return [chunk or b"" for chunk in audio]


def _cache_path(cache_dir: Path | None, text: str) -> Path | None:
    if cache_dir is None:
        return None
    digest = hashlib.sha256(f"{_VERSION}\n{text}".encode()).hexdigest()[:24]
    return cache_dir / f"{digest}.ulaw"


def _piper():  # noqa: ANN202 - parley.media is optional for the devkit
    try:
        from parley.media.providers.local.piper_tts import PiperTts
    except ImportError as exc:
        raise InfraError("speaking text needs the parley-media package (Piper) installed; "
                         "or pass WAV files") from exc
    return PiperTts()
