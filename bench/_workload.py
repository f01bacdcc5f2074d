"""Realistic call traffic from the event catalog, deterministic for a seed.

A call is set up (requested → ringing → answered → stream started), then runs conversational
turns — caller speech with partial and final transcripts, end of turn, the brain's clauses, the
agent's playback with marks, usage — with the odd intent, retrieval, tool call and barge-in, and
ends with ``call.ended``. Many calls overlap in time, so the stream interleaves them the way a
busy platform would.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from parley.common import events as ev

_CALLER_LINES = [
    "hi I'd like to move my appointment to Thursday afternoon if that's possible",
    "yes it's under Jordan Smith", "what time do you close on Saturdays",
    "can you tell me how much the annual plan costs", "no that's all thank you very much",
    "I was charged twice for the same order last week", "my order number is 4 8 1 5 1 6 2 3",
    "could you send the receipt to my email instead",
]
_AGENT_CLAUSES = [
    "Sure, I can help with that.", "Let me check the calendar for Thursday.",
    "I have a slot at 2:30 or at 4 o'clock.", "Which one works better for you?",
    "Thanks, I found your booking.", "Our Saturday hours are 9 to 5.",
    "The annual plan is 120 dollars, billed once a year.", "Is there anything else?",
]
_INTENTS = ["reschedule", "billing_question", "opening_hours", "pricing", "goodbye"]
BASE_TIME = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)


class _Clock:
    def __init__(self, rng: random.Random, start: datetime) -> None:
        self.rng, self.now = rng, start

    def tick(self, low_ms: float = 20, high_ms: float = 400) -> datetime:
        self.now += timedelta(milliseconds=self.rng.uniform(low_ms, high_ms))
        return self.now


def _turn(rng: random.Random, clock: _Clock, org: str, call: str,
          index: int) -> list[ev.Event]:
    turn = f"t{index}"
    text = rng.choice(_CALLER_LINES)
    words = text.split()
    common = {"org_id": org, "call_id": call}
    out: list[ev.Event] = [ev.SpeechStarted(**common, at=clock.tick(), offset_ms=index * 9000)]
    for cut in sorted(rng.sample(range(1, len(words) + 1), k=min(3, len(words)))):
        out.append(ev.TranscriptPartial(**common, at=clock.tick(150, 350),
                                        text=" ".join(words[:cut]), utterance_id=f"u{index}"))
    out.append(ev.SpeechStopped(**common, at=clock.tick(), offset_ms=index * 9000 + 2500))
    out.append(ev.TranscriptFinal(
        **common, at=clock.tick(50, 150), text=text, utterance_id=f"u{index}",
        words=[ev.Word(w, i * 0.3, i * 0.3 + 0.25) for i, w in enumerate(words)],
        confidence=round(rng.uniform(0.8, 0.99), 3), provider="deepgram",
        latency_ms=rng.uniform(80, 250)))
    out.append(ev.TurnUserEnded(**common, at=clock.tick(100, 300), turn_id=turn, text=text,
                                eou_delay_ms=rng.uniform(150, 400),
                                stt_final_ms=rng.uniform(50, 200)))
    out.append(ev.TurnStarted(**common, at=clock.tick(1, 5), turn_id=turn, provider="openai"))
    if rng.random() < 0.3:
        out.append(ev.IntentDetected(**common, at=clock.tick(5, 30), turn_id=turn,
                                     intent=rng.choice(_INTENTS), confidence=0.9))
    if rng.random() < 0.3:
        out.append(ev.KnowledgeRetrieved(
            **common, at=clock.tick(5, 30), turn_id=turn, query=text,
            chunk_ids=[f"kb-{rng.randrange(10_000)}" for _ in range(3)],
            scores=[0.83, 0.79, 0.71], latency_ms=12.5))
    if rng.random() < 0.1:
        tool_call = f"tc{index}"
        out.append(ev.ToolRequested(**common, at=clock.tick(), turn_id=turn,
                                    tool_call_id=tool_call, name="lookup_booking",
                                    arguments={"name": "Jordan Smith"}))
        out.append(ev.ToolCompleted(**common, at=clock.tick(), tool_call_id=tool_call,
                                    name="lookup_booking", latency_ms=140.0,
                                    result={"booking_id": "b-1234", "when": "2025-01-09T14:30"}))
    clauses = rng.randint(2, 4)
    for seq in range(clauses):
        out.append(ev.AgentSay(**common, at=clock.tick(40, 200), turn_id=turn, seq=seq,
                               text=rng.choice(_AGENT_CLAUSES), last=seq == clauses - 1))
        if seq == 0:
            out.append(ev.AgentSpeechStarted(**common, at=clock.tick(60, 150), turn_id=turn,
                                             tts_ttfb_ms=rng.uniform(60, 150),
                                             voice_to_voice_ms=rng.uniform(500, 900)))
    if rng.random() < 0.1:
        out.append(ev.AgentSpeechInterrupted(**common, at=clock.tick(), turn_id=turn,
                                             played_text=_AGENT_CLAUSES[0], cut_seq=1,
                                             cut_ms=1200))
    else:
        for seq in range(clauses):
            out.append(ev.AgentSpeechProgress(**common, at=clock.tick(500, 1500), turn_id=turn,
                                              mark=f"{turn}-{seq}", seq=seq))
        out.append(ev.AgentSpeechFinished(**common, at=clock.tick(), turn_id=turn))
    out.append(ev.TurnCompleted(
        **common, at=clock.tick(1, 10), turn_id=turn, provider="openai", model="gpt-4o-mini",
        usage=ev.TokenUsage(input_tokens=rng.randint(800, 2500), output_tokens=rng.randint(20, 90)),
        ttft_ms=rng.uniform(180, 450), duration_ms=rng.uniform(600, 1800)))
    out.append(ev.UsageRecorded(**common, at=clock.tick(1, 5), kind="llm_output_tokens",
                                quantity=float(rng.randint(20, 90)), unit="token",
                                provider="openai", cost_usd=0.00004))
    return out


def call_events(rng: random.Random, org: str, call: str, *, size: int,
                start: datetime = BASE_TIME) -> list[ev.Event]:
    """One call of exactly ``size`` events (≥ 6), lifecycle first and ``call.ended`` last."""
    clock = _Clock(rng, start)
    common = {"org_id": org, "call_id": call}
    out: list[ev.Event] = [
        ev.CallRequested(**common, at=clock.now, direction=rng.choice(["inbound", "outbound"]),
                         agent_id=f"agent-{rng.randrange(20)}", from_number="+15550100123",
                         to_number="+15550199876", carrier="twilio",
                         carrier_call_id=f"CA{rng.getrandbits(64):016x}",
                         metadata={"campaign": "winter"}),
        ev.CallRinging(**common, at=clock.tick()),
        ev.CallAnswered(**common, at=clock.tick(2000, 6000)),
        ev.CallStreamStarted(**common, at=clock.tick(50, 200), stream_id=f"MZ{call}",
                             gateway_instance="gw-1", agent_id="agent-1"),
    ]
    index = 0
    while len(out) < size - 2:
        out.extend(_turn(rng, clock, org, call, index))
        index += 1
    del out[size - 2:]
    started = out[0].at
    ended = clock.tick()
    out.append(ev.UsageRecorded(**common, at=ended, kind="call_minutes",
                                quantity=(ended - started).total_seconds() / 60, unit="minute",
                                provider="twilio", cost_usd=0.013))
    out.append(ev.CallEnded(**common, at=clock.tick(1, 5), reason="caller_hangup",
                            duration_s=(ended - started).total_seconds()))
    return out


def traffic(total: int, *, calls: int, concurrent: int = 250, orgs: int = 5,
            seed: int = 7) -> list[ev.Event]:
    """``total`` events from ``calls`` overlapping calls, in time order (as the stream sees them).

    Calls start staggered so that about ``concurrent`` are live at once; the stream is cut at
    ``total`` events, so the last calls are still in progress — as they would be in real life.
    """
    rng = random.Random(seed)
    per_call = max(total // calls, 6)
    # A call of ~per_call events lasts roughly per_call * 0.45 s of event time.
    window = timedelta(seconds=calls * per_call * 0.45 / concurrent)
    streams: list[Iterator[tuple[datetime, int, ev.Event]]] = []
    for number in range(calls):
        start = BASE_TIME + window * rng.random()
        size = max(6, int(per_call * rng.uniform(0.8, 1.2)))
        events = call_events(rng, f"org-{number % orgs}", f"call-{number:05d}", size=size,
                             start=start)
        streams.append((e.at, number, e) for e in events)
    merged = heapq.merge(*streams, key=lambda item: (item[0], item[1]))
    out = [event for _, _, event in merged][:total]
    if len(out) < total:  # sizes are random around per_call: top up with one more call
        out += call_events(rng, "org-0", "call-extra", size=max(6, total - len(out)),
                           start=out[-1].at)
    return out[:total]
