"""Brain settings (``PARLEY_*``; vendor keys also from their usual variable names)."""

from __future__ import annotations

import os

from parley.common.config import CommonConfig


class BrainConfig(CommonConfig, kw_only=True):
    """LLM providers, their chain, and turn limits."""

    llm_chain: str = ""  # e.g. "anthropic,openai,local"; empty: whichever are configured + local
    anthropic_api_key: str = ""
    anthropic_url: str = ""  # base URL (an emulator in tests); empty: the SDK's default
    anthropic_model: str = "claude-haiku-4-5"
    openai_url: str = ""  # any OpenAI-compatible server, e.g. http://127.0.0.1:11434/v1
    openai_api_key: str = ""
    openai_model: str = "llama3.2"
    filler_after_ms: float = 1200.0
    filler_text: str = "One moment."
    # A round's tools still out this long after the agent last spoke: the filler is said (by
    # media, which knows when the audio has played; 0: never).
    tool_filler_after_ms: int = 1500
    turn_deadline_s: float = 30.0
    turn_concurrency: int = 64  # turns (of different calls) one instance handles at once
    # Preemptive generation: start the reply once the caller's words are known (the caller
    # stopped speaking, or a final; also a partial unchanged for preemptive_partial_stable_ms if
    # that is > 0, at the price of more discarded requests), publish it on turn end.
    preemptive_generation: bool = True
    preemptive_partial_stable_ms: float = 0.0
    preemptive_timeout_s: float = 10.0
    # Publish a speculative reply's first clause (agent.reply_prepared) so media can synthesise
    # it during the endpointing silence and play it the moment the turn ends; a discarded one
    # still costs its synthesis.
    prepare_replies: bool = True
    knowledge_k: int = 3
    agent_cache_s: float = 30.0
    brain_http_host: str = "127.0.0.1"  # the knowledge API (parley.brain.api)
    brain_http_port: int = 8083  # 0 picks a free port
    knowledge_max_upload_bytes: int = 20 * 1024 * 1024

    def key(self, vendor: str) -> str:
        """``PARLEY_<VENDOR>_API_KEY`` or else ``<VENDOR>_API_KEY``."""
        value = str(getattr(self, f"{vendor}_api_key"))
        return value or os.environ.get(f"{vendor.upper()}_API_KEY", "")

    def chain(self) -> list[str]:
        """Providers in fallback order; the local responder always ends the chain."""
        if self.llm_chain:
            names = [n.strip() for n in self.llm_chain.split(",") if n.strip()]
        else:
            names = [*(["anthropic"] if self.key("anthropic") else []),
                     *(["openai"] if self.openai_url else [])]
        return [*[n for n in names if n != "local"], "local"]
