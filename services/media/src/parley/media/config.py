"""Media service settings (``PARLEY_*`` variables; vendor keys also from their usual names)."""

from __future__ import annotations

import os

from parley.common.config import CommonConfig, Niceness


class MediaConfig(CommonConfig, kw_only=True):
    """Providers, their chains and the call-ownership timing."""

    stt_chain: str = ""  # e.g. "deepgram,whisper"; empty: deepgram first if keyed, then whisper
    tts_chain: str = ""  # e.g. "cartesia,piper"; empty: cartesia first if keyed, then piper
    deepgram_api_key: str = ""
    deepgram_url: str = ""  # base URL of Deepgram (or its emulator); empty: the SDK's default
    cartesia_api_key: str = ""
    cartesia_url: str = ""
    cartesia_voice: str = ""
    whisper_threads: int = 0  # 0: one per core (at most 4)
    whisper_max_streams: int = 8  # calls on local Whisper at once per process (0: no limit)
    preload_models: bool = True
    lease_renew_s: float = 1.0
    lease_timeout_s: float = 1.5
    command_timeout_s: float = 1.0
    agent_cache_s: float = 30.0
    # Every inbound frame is due within 20 ms, and media needs more CPU than the services it
    # shares cores with: at equal weight the kernel made it wait for its share (see
    # docs/architecture.md, "Running it"). Needs CAP_SYS_NICE; without it media runs at 0.
    nice: Niceness = -5

    def key(self, vendor: str) -> str:
        """The vendor's API key: ``PARLEY_<VENDOR>_API_KEY`` or else ``<VENDOR>_API_KEY``."""
        value = str(getattr(self, f"{vendor}_api_key"))
        return value or os.environ.get(f"{vendor.upper()}_API_KEY", "")

    def chain(self, kind: str) -> list[str]:
        """The default fallback chain for ``stt`` or ``tts``."""
        configured = self.stt_chain if kind == "stt" else self.tts_chain
        if configured:
            return [name.strip() for name in configured.split(",") if name.strip()]
        if kind == "stt":
            return ["deepgram", "whisper"] if self.key("deepgram") else ["whisper"]
        return ["cartesia", "piper"] if self.key("cartesia") else ["piper"]
