"""The live transcript of a call, from the bus, with each turn's latency.

Caller lines come from ``transcript.final`` (what speech recognition heard), agent lines from
``agent.say`` (each clause as the brain streams it). A turn's latency line is printed once the
agent's first audio frame has left for the carrier (``agent.speech.started``) and the brain has
reported its time to first token (``turn.completed``):

- EOU delay: silence waited after the caller stopped before the turn was declared over
  (``turn.user_ended.eou_delay_ms``);
- STT final: from the end of speech to the last final transcript (``stt_final_ms``);
- LLM TTFT: the model's time to first token (``turn.completed.ttft_ms``);
- TTS TTFB: first clause sent to TTS → first audio frame out (``tts_ttfb_ms``);
- voice-to-voice: caller stopped speaking → first agent frame out (``voice_to_voice_ms``);
- platform: voice-to-voice minus the provider times, floored at 0. The STT final arrives while
  the end-of-utterance silence is being waited out (both count from the end of speech), so the
  two overlap and only the longer one is subtracted; of the LLM, what the turn waited for its
  first token (``turn.completed.llm_wait_ms``: less than TTFT when a preemptive reply was under
  way), of the TTS its own time to first audio (``agent.speech.started.tts_provider_ms``):
  ``v2v − (max(EOU, STT final) + LLM wait + TTS provider)``. What is left is Parley itself: bus
  hops, the brain's fold and knowledge retrieval, clause splitting, framing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Log = Callable[[str], None]


@dataclass
class TurnLatency:
    """The latency figures of one caller turn, as its events arrive."""

    turn_id: str
    caller_text: str = ""
    eou_delay_ms: float | None = None
    stt_final_ms: float | None = None
    ttft_ms: float | None = None
    tts_ttfb_ms: float | None = None
    voice_to_voice_ms: float | None = None
    llm_wait_ms: float | None = None  # default: the TTFT
    tts_provider_ms: float | None = None  # default: the TTS TTFB
    shown: bool = False

    @property
    def complete(self) -> bool:
        """Every figure is known."""
        return None not in (self.eou_delay_ms, self.stt_final_ms, self.ttft_ms, self.tts_ttfb_ms,
                            self.voice_to_voice_ms)

    @property
    def platform_ms(self) -> float | None:
        """Voice-to-voice minus the provider times (see the module doc), at least 0."""
        if not self.complete:
            return None
        llm = self.ttft_ms if self.llm_wait_ms is None else min(self.llm_wait_ms,
                                                                  self.ttft_ms or 0.0)
        tts = self.tts_ttfb_ms if self.tts_provider_ms is None else self.tts_provider_ms
        providers = (max(self.eou_delay_ms or 0.0, self.stt_final_ms or 0.0)
                     + (llm or 0.0) + (tts or 0.0))
        return max(0.0, (self.voice_to_voice_ms or 0.0) - providers)

    def describe(self) -> str:
        """``EOU 600 ms · STT final 210 ms · …`` (``?`` for what never arrived)."""
        def ms(value: float | None) -> str:
            return "?" if value is None else f"{value:.0f} ms"

        return (f"EOU {ms(self.eou_delay_ms)} · STT final {ms(self.stt_final_ms)} · "
                f"LLM TTFT {ms(self.ttft_ms)} · TTS TTFB {ms(self.tts_ttfb_ms)} · "
                f"voice-to-voice {ms(self.voice_to_voice_ms)} · "
                f"platform {ms(self.platform_ms)}")


class LiveTranscript:
    """Follows one call's events on the bus and prints its transcript and latency per turn."""

    def __init__(self, log: Log) -> None:
        self._log = log
        self.turns: dict[str, TurnLatency] = {}
        self.agent_lines: list[str] = []
        self.caller_lines: list[str] = []
        self.ended = asyncio.Event()
        self.end_reason = ""
        self._bus: Any = None

    @property
    def following(self) -> bool:
        """Subscribed to a call's events."""
        return self._bus is not None

    async def follow(self, nats_url: str, call_id: str) -> None:
        """Subscribe to the call's events."""
        from parley.common.bus import Bus

        self._bus = await asyncio.wait_for(
            Bus.connect(nats_url, name="parley-transcript", max_reconnect_attempts=0), 5)
        await self._bus.subscribe_call(call_id, self.on_event)

    async def close(self) -> None:
        """Stop following; print what is left of incomplete turns."""
        for turn in self.turns.values():
            if not turn.shown and turn.voice_to_voice_ms is not None:
                self._show_latency(turn)
        if self._bus is not None:
            bus, self._bus = self._bus, None
            await bus.close()

    def summary(self) -> list[str]:
        """One line per answered caller turn: what they said and the latency figures."""
        return [f"{turn.turn_id}  {turn.describe()}   « {turn.caller_text} »"
                for turn in self.turns.values() if turn.voice_to_voice_ms is not None]

    async def on_event(self, event: Any) -> None:
        """Show and account one event of the call."""
        match event.type:
            case "transcript.final":
                self.caller_lines.append(event.text)
                self._log(f"caller: {event.text}")
            case "turn.user_ended":
                turn = self._turn(event.turn_id)
                turn.caller_text = event.text
                turn.eou_delay_ms, turn.stt_final_ms = event.eou_delay_ms, event.stt_final_ms
                if event.revises:
                    self._log(f"-- the recogniser's late final revises {event.revises}: "
                              f"{event.text!r}")
                if getattr(event, "reason", "") == "dtmf":  # no transcript: keys, not words
                    self._log(f"caller typed: {event.text}")
            case "agent.say" if getattr(event, "filler_after_ms", 0):
                self._log(f"-- ready if the tools are slow: {event.text!r}")
            case "agent.say" if event.text.strip():
                self.agent_lines.append(event.text)
                self._log(f"agent:  {event.text}")
            case "turn.completed" if event.turn_id in self.turns:
                turn = self.turns[event.turn_id]
                if turn.ttft_ms is None:  # the first round; tool rounds follow
                    turn.ttft_ms, turn.llm_wait_ms = event.ttft_ms, event.llm_wait_ms
                self._maybe_show(turn)
            case "agent.speech.started" if event.turn_id in self.turns:
                turn = self.turns[event.turn_id]
                turn.tts_ttfb_ms, turn.tts_provider_ms = event.tts_ttfb_ms, event.tts_provider_ms
                turn.voice_to_voice_ms = event.voice_to_voice_ms
                self._maybe_show(turn)
            case "agent.speech.interrupted":
                self._log(f"-- agent interrupted; the caller heard: {event.played_text!r}")
            case "tool.requested":
                self._log(f"-- tool {event.name}({_arguments(event.arguments)})")
            case "tool.completed":
                self._log(f"-- tool {event.name} done in {event.latency_ms:.0f} ms")
            case "call.dtmf":
                self._log(f"caller pressed {event.digit}")
            case "call.ended":
                self.end_reason = event.reason
                self._log(f"call ended: {event.reason}")
                self.ended.set()
            case _:
                pass

    def _turn(self, turn_id: str) -> TurnLatency:
        return self.turns.setdefault(turn_id, TurnLatency(turn_id))

    def _maybe_show(self, turn: TurnLatency) -> None:
        if not turn.shown and turn.complete:
            self._show_latency(turn)

    def _show_latency(self, turn: TurnLatency) -> None:
        turn.shown = True
        self._log(f"   ⏱ {turn.turn_id}: {turn.describe()}")


def _arguments(arguments: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in arguments.items())


def stopwatch() -> Callable[[str], None]:
    """A log function that prefixes each line with the seconds since it was made."""
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"{time.monotonic() - started:7.2f}s  {text}", flush=True)

    return log
