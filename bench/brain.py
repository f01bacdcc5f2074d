"""Brain benchmarks: the brain's own overhead per turn, knowledge retrieval, folding a call.

``brain_overhead`` — ``turn.user_ended`` published → first ``agent.say`` received, with the brain
as ``python -m parley.brain`` composes it (``parley.brain.__main__.run``: the worker, its agent
cache, tools and profile lookups, retrieval, the knowledge API and RPC) running in this process
on real NATS and Postgres, and a zero-latency LLM: the real anthropic SDK against the
Anthropic-protocol emulator in its own process with no time to first token and no pacing (so it
writes the whole event stream at once). So the number is the brain's overhead: the work-queue
delivery, the fold of the call, retrieval over a few ingested documents, request building, the
SDK's HTTP request and SSE parsing up to the first clause, and the publishes in between
(``turn.started``, ``intent.detected`` and ``knowledge.retrieved`` are sent before the first
``agent.say`` without waiting for their acks; all acks are awaited before ``turn.completed``).
Calls of 10 turns (caller speech events, the turn, the agent's playback); each turn waits for
``turn.completed`` before the next. Every turn: ``speech.started``, ``speech.stopped``, 300 ms
(the endpointing silence media waits out), ``transcript.final``, then at once
``turn.user_ended``. Warm turns also publish a ``transcript.partial`` with the final words
before the caller stops (what the recogniser heard so far, as Deepgram's interim results and
local Whisper's re-decodes give it); cold turns have no words until the final, a fraction of a
millisecond before the turn ends (a recogniser that said nothing while the caller spoke). In
both, the caller profile was looked up once when the call started.

Everything is measured twice, in two brain runs on the same servers: with preemptive generation
(the default; the budget lines) and without it (info lines). What the speculation overlaps:
in warm turns the partial starts retrieval and intent (the warm-up), and ``speech.stopped`` —
the caller has stopped, these are the words — starts the whole LLM request, whose reply is
buffered during the endpointing silence — so the warm number is the turn's delivery, fold, its
own request built and compared with the speculative one, the publishes, and the buffered first
clause; the LLM's time is entirely off the path. In cold turns the speculation starts at the
final, a fraction of a millisecond before ``turn.user_ended``: it overlaps only the turn's
delivery and fold with retrieval and the SDK request, and everything runs on one CPU-bound event
loop against a zero-latency model, so there is almost nothing to gain there. The
``*_excluding_llm`` lines (preemption off) subtract the LLM's own time to first token.
The second brain run in the process is slower for that reason alone (swapping the order once:
warm with preemption 2.6 ms first, 3.7 ms second; without it 5.9 ms first, 6.1 ms second), so
the off lines, measured second, overstate the saving a little; cold shows none to speak of.

``brain_overhead.llm_request_{hot,after_idle}`` (info) — why cold turns cost more than their
parts measured back to back: the SDK request alone (a turn-sized request: system prompt with
knowledge, 20 messages, 5 tools → the first text delta), made 200 times back to back, then 40
times each after the brain has been idle for ``WARM_LEAD_S`` (as in a cold turn, where nothing
happens between ``speech.stopped`` and the final). On this VM the idle one is several times
slower because the caches have gone cold, in this process and in the emulator's. Waking the
vCPU costs little: a pipe ping-pong takes 61 µs after 300 ms asleep against 31 µs hot. Spinning
instead of sleeping barely helps either. Postgres's retrieval pays the same.

``knowledge_retrieval`` — :func:`parley.brain.knowledge.bench.bench_retrieval`: full-text
retrieval (k=4, round trip included) over 10,000 chunks (quick: 2,000).

``fold_turn`` — the CPU the brain spends folding a call's events into its
:class:`~parley.brain.conversation.Conversation` at each turn: a realistic 40-turn call
(``_workload.call_events``); at every ``turn.user_ended`` the events so far are folded, as the
worker does after replaying them. Per-turn fold p50/p99, decode + fold (what the replayed JSON
costs) and the whole call as info.
"""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from _stats import BenchResult, Budget, Line, latency_summary
from _workload import call_events

from parley.brain.__main__ import run as run_brain
from parley.brain.config import BrainConfig
from parley.brain.conversation import fold
from parley.brain.knowledge import ingest
from parley.brain.knowledge.bench import bench_retrieval
from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.llm.base import (
    AssistantMessage,
    LlmRequest,
    SystemPrompt,
    TextDelta,
    ToolSpec,
    UserMessage,
)
from parley.common import configuration as cfg
from parley.common import events as ev
from parley.common.metrics import Metrics
from parley.common.service import ServiceContext

OVERHEAD_BUDGET_MS = 3.0
RETRIEVAL_BUDGET_MS = 10.0
ORG, AGENT, API_KEY = "bench", "bench-agent", "sk-bench"
TURNS_PER_CALL = 10
WARM_LEAD_S = 0.3
REPLY = ("A cleaning is ninety five dollars, and whitening is two hundred. "
         "Would you like me to book one for you?")
QUESTIONS = [
    "how much does a teeth cleaning cost", "what are your opening hours on friday",
    "do you take dental insurance", "where can I park my car",
    "how much is whitening", "can I book a filling next week",
]
DOCUMENTS = {
    "prices.md": "# Prices\n\nTeeth cleaning costs $95. Whitening is $200 per session, and a "
                 "filling starts at $150. Crowns start at $900.\n\nWe accept all major dental "
                 "insurance plans and offer payment plans for larger treatments.",
    "hours.txt": "Opening hours\n\nThe clinic is open Monday to Friday from 9am to 5pm and "
                 "closed on weekends and public holidays. Emergency appointments are available "
                 "by phone.",
    "parking.txt": "Parking is free in the garage behind the building; take the ramp on Elm "
                   "Street. Bicycle racks are at the front entrance.",
    "booking.md": "# Booking\n\nAppointments can be booked by phone or online. Fillings and "
                  "cleanings can usually be booked within a week; cancellations need 24 hours "
                  "notice or a $25 fee applies.",
}
_EMULATOR = f"""
from parley.common import runtime
from parley.devkit.emulators import serve_until_stopped
from parley.devkit.emulators.anthropic import AnthropicEmulator, ScriptedReply
emulator = AnthropicEmulator(api_key={API_KEY!r}, ttft_s=0.0, tokens_per_second=None,
                             default_reply=ScriptedReply(text={REPLY!r}))
runtime.run(serve_until_stopped(emulator, port=0))
"""


class _Watch:
    """First agent.say and turn.completed per (call, turn), timed on arrival."""

    def __init__(self) -> None:
        self.first_say: dict[tuple[str, str], int] = {}
        self.ttft_ns: dict[tuple[str, str], int] = {}  # the LLM's own time to first token
        self._waiters: dict[tuple[str, str, str], asyncio.Future[int]] = {}

    def expect(self, kind: str, call_id: str, turn_id: str) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[(kind, call_id, turn_id)] = future
        return future

    async def on_message(self, msg: Any) -> None:
        now = time.perf_counter_ns()
        event = ev.decode(msg.data)
        kind = "say" if isinstance(event, ev.AgentSay) else "completed"
        if isinstance(event, ev.TurnCompleted):
            self.ttft_ns[(event.call_id, event.turn_id)] = int(event.ttft_ms * 1e6)
        future = self._waiters.pop((kind, event.call_id, getattr(event, "turn_id", "")), None)
        if future is not None and not future.done():
            future.set_result(now)


async def _start_emulator() -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _EMULATOR, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    if not line.startswith(b"http"):
        process.kill()
        raise RuntimeError(f"the Anthropic emulator did not start: {line!r}")
    return process, line.decode().strip()


Samples = dict[bool, list[int]]  # warm? → turn.user_ended published → first agent.say, ns


async def _measure(ctx: Any, bus: Any, database_url: str, emulator_url: str, *,
                   preemptive: bool, turns: tuple[int, int]) -> tuple[Samples, Samples,
                                                                    dict[str, float]]:
    """Run the brain with or without preemptive generation; time its cold and warm turns.

    Returns the samples, the same minus the LLM's own time to first token, and the brain's
    speculation outcomes.
    """
    config = BrainConfig(nats_url=ctx.servers.nats().url, database_url=database_url,
                         llm_chain="anthropic", anthropic_api_key=API_KEY,
                         anthropic_url=emulator_url, brain_http_port=0, log_level="WARNING",
                         preemptive_generation=preemptive)
    metrics = Metrics("brain")
    service = ServiceContext(name="brain", config=config, bus=bus, metrics=metrics)
    stop = asyncio.Event()
    brain = asyncio.create_task(run_brain(service, stop), name="bench:brain")
    watch = _Watch()
    subs = [await bus.nc.subscribe(f"parley.ev.{ORG}.call.*.{kind}", cb=watch.on_message)
            for kind in ("agent.say", "turn.completed")]
    await bus.nc.flush()
    label = "p" if preemptive else "n"
    excluding_llm: Samples = {False: [], True: []}

    async def one_call(number: int, count: int, *, warm: bool) -> list[int]:
        call_id = f"call-{label}{'w' if warm else 'c'}{number}"
        common = {"org_id": ORG, "call_id": call_id}
        await bus.publish(ev.CallRequested(**common, direction="inbound", agent_id=AGENT,
                                           from_number="+14155550123",
                                           to_number="+14155550100"))
        await bus.publish(ev.CallStreamStarted(**common, stream_id="MZ", agent_id=AGENT,
                                               gateway_instance="bench"))
        samples = []
        for n in range(1, count + 1):
            turn_id, text = f"u{n}", QUESTIONS[(number + n) % len(QUESTIONS)]
            await bus.publish(ev.SpeechStarted(**common, offset_ms=n * 10_000))
            if warm:
                await bus.publish(ev.TranscriptPartial(**common, text=text))
            # The caller stops; media waits out the endpointing silence before the turn ends.
            await bus.publish(ev.SpeechStopped(**common, offset_ms=n * 10_000 + 1500))
            await asyncio.sleep(WARM_LEAD_S)
            await bus.publish(ev.TranscriptFinal(**common, text=text))
            said = watch.expect("say", call_id, turn_id)
            completed = watch.expect("completed", call_id, turn_id)
            began = time.perf_counter_ns()
            await bus.publish(ev.TurnUserEnded(**common, turn_id=turn_id, text=text))
            samples.append(await asyncio.wait_for(said, 10) - began)
            await asyncio.wait_for(completed, 10)
            excluding_llm[warm].append(samples[-1] - watch.ttft_ns[(call_id, turn_id)])
            await bus.publish(ev.AgentSpeechStarted(**common, turn_id=turn_id))
            await bus.publish(ev.AgentSpeechFinished(**common, turn_id=turn_id))
        await bus.publish(ev.CallEnded(**common, reason="completed"))
        return samples

    results: Samples = {False: [], True: []}
    try:
        await one_call(0, 3, warm=False)  # connections and caches warmed up: not timed
        await one_call(0, 2, warm=True)
        excluding_llm = {False: [], True: []}
        gc.collect()
        gc.freeze()  # as parley.common.service does after start-up
        for warm, total in ((False, turns[0]), (True, turns[1])):
            number = 1
            while len(results[warm]) < total:
                count = min(TURNS_PER_CALL, total - len(results[warm]))
                results[warm] += await one_call(number, count, warm=warm)
                number += 1
    finally:
        for sub in subs:
            await sub.unsubscribe()
        stop.set()
        await asyncio.wait_for(brain, 15)
        gc.unfreeze()
    outcomes = {sample.labels["outcome"]: sample.value
                for family in metrics.registry.collect() if family.name.endswith("preemptive")
                for sample in family.samples if sample.name.endswith("_total")}
    return results, excluding_llm, outcomes


def _turn_sized_request() -> LlmRequest:
    history: list[Any] = []
    for question in QUESTIONS * 2:
        history += [UserMessage(text=question), AssistantMessage(text=REPLY)]
    tools = tuple(ToolSpec(name=f"tool_{n}", description="Books, moves or cancels a visit.",
                           input_schema={"type": "object", "required": ["date"], "properties": {
                               "date": {"type": "string", "description": "ISO date"},
                               "name": {"type": "string"}}}) for n in range(5))
    return LlmRequest(system=SystemPrompt(text="You are the receptionist of Bench Dental. " * 12),
                      context="\n".join(DOCUMENTS.values())[:1500],
                      messages=(*history[-19:], UserMessage(text=QUESTIONS[0])), tools=tools)


async def _llm_request_idle_cost(emulator_url: str, *, hot: int, idle: int
                                 ) -> tuple[list[int], list[int]]:
    """The SDK's request → first text delta, back to back, then each after an idle pause."""
    llm = AnthropicLlm(api_key=API_KEY, base_url=emulator_url)
    request = _turn_sized_request()

    async def once() -> int:
        began = time.perf_counter_ns()
        stream = llm.stream(request)
        try:
            async for item in stream:
                if isinstance(item, TextDelta):
                    return time.perf_counter_ns() - began
        finally:
            await stream.aclose()
        raise RuntimeError("the emulator sent no text")

    try:
        for _ in range(20):
            await once()  # connection open, code paths warmed
        back_to_back = [await once() for _ in range(hot)]
        after_idle = []
        for _ in range(idle):
            await asyncio.sleep(WARM_LEAD_S)
            after_idle.append(await once())
    finally:
        await llm.aclose()
    return back_to_back, after_idle


async def run_overhead(ctx: Any) -> BenchResult:
    """Time turn.user_ended → first agent.say, cold and warmed, with and without preemption."""
    turns = (24, 16) if ctx.quick else (200, 200)
    bus = await ctx.servers.clean_bus("bench-brain")
    database_url = await ctx.servers.fresh_database(fsync=True)
    emulator, emulator_url = await _start_emulator()
    try:
        import psycopg

        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await cfg.create_org(conn, ORG, "Bench Dental")
            await cfg.create_agent(conn, ORG, "Reception", cfg.AgentSettings(
                prompt="You are the receptionist of Bench Dental."), agent_id=AGENT)
            for source, text in DOCUMENTS.items():
                await ingest(conn, ORG, AGENT if source.endswith(".md") else None, source,
                             text.encode())
        results, _, outcomes = await _measure(ctx, bus, database_url, emulator_url,
                                              preemptive=True, turns=turns)
        plain, excluding_llm, _ = await _measure(ctx, bus, database_url, emulator_url,
                                                 preemptive=False, turns=turns)
        hot, after_idle = await _llm_request_idle_cost(
            emulator_url, hot=50 if ctx.quick else 200, idle=10 if ctx.quick else 40)
    finally:
        emulator.terminate()
        await emulator.wait()
        await bus.close()

    cold, warm = latency_summary(results[False]), latency_summary(results[True])
    plain_cold, plain_warm = latency_summary(plain[False]), latency_summary(plain[True])
    counted = ", ".join(f"{k} {v:.0f}" for k, v in sorted(outcomes.items())) or "none"
    result = BenchResult("brain_overhead", config={
        "brain": "parley.brain.__main__.run in this process (worker + knowledge API + RPC), "
                 "LLM chain: anthropic SDK → Anthropic emulator (own process, ttft 0, "
                 "unpaced tokens)",
        "knowledge": f"{len(DOCUMENTS)} documents (2 agent, 2 org-wide), k=3 full-text",
        "turns": f"{turns[0]} cold + {turns[1]} warm, {TURNS_PER_CALL} per call, "
                 f"sequential; speech.stopped {WARM_LEAD_S * 1000:.0f} ms before "
                 "transcript.final + turn.user_ended; warm: a transcript.partial with the "
                 "words before speech.stopped; all measured twice: preemptive generation on "
                 "(the default, budget lines), then off (info lines)",
        "reply": f"{REPLY!r} (first clause = first agent.say)",
    }, notes=[
        f"preemptive generation saves {plain_cold['p50'] - cold['p50']:.2f} ms cold and "
        f"{plain_warm['p50'] - warm['p50']:.2f} ms warm at p50 (off → on: cold "
        f"{plain_cold['p50']:.2f} → {cold['p50']:.2f}, warm {plain_warm['p50']:.2f} → "
        f"{warm['p50']:.2f} ms)",
        f"speculations with preemption on (warm-up calls included): {counted}",
        f"warm-up without preemption saves {plain_cold['p50'] - plain_warm['p50']:.2f} ms at "
        f"p50 ({plain_cold['p50']:.2f} → {plain_warm['p50']:.2f} ms)"])
    result.lines.append(Line(
        "brain_overhead.cold", "ms", cold["p50"], cold["p99"],
        budget=Budget("median", "<=", OVERHEAD_BUDGET_MS), summary=cold,
        note="turn.user_ended publish → first agent.say received, no words before "
             "transcript.final just before the turn's end (the speculation it starts overlaps "
             "the turn's delivery and fold, not retrieval nor the LLM)"))
    result.lines.append(Line(
        "brain_overhead.warm", "ms", warm["p50"], warm["p99"],
        budget=Budget("median", "<=", OVERHEAD_BUDGET_MS), summary=warm,
        note="the same with the words known (a partial) when the caller stopped, 300 ms "
             "earlier (retrieval and intent while the caller spoke, the speculative LLM reply "
             "during the endpointing silence)"))
    for warm_turns, label, summary in ((False, "cold", plain_cold), (True, "warm", plain_warm)):
        result.lines.append(Line(
            f"brain_overhead.{label}_preemptive_off", "ms", summary["p50"], summary["p99"],
            summary=summary,
            note="the same with PARLEY_PREEMPTIVE_GENERATION=false (info): the LLM request "
                 "starts only when the turn is handled"))
        excluded = latency_summary(excluding_llm[warm_turns])
        result.lines.append(Line(
            f"brain_overhead.{label}_excluding_llm", "ms", excluded["p50"], excluded["p99"],
            summary=excluded,
            note="preemption off, minus the LLM's own time to first token as the SDK measured "
                 "it (turn.completed.ttft_ms: HTTP to the emulator process and its response)"))
    hot_summary, idle_summary = latency_summary(hot), latency_summary(after_idle)
    result.lines.append(Line(
        "brain_overhead.llm_request_hot", "ms", hot_summary["p50"], hot_summary["p99"],
        summary=hot_summary, note="a turn-sized SDK request → first text delta, back to back"))
    result.lines.append(Line(
        "brain_overhead.llm_request_after_idle", "ms", idle_summary["p50"],
        idle_summary["p99"], summary=idle_summary,
        note=f"the same request, each after {WARM_LEAD_S * 1000:.0f} ms idle (a cold turn's "
             "situation): what a halted vCPU and cold caches add"))
    result.notes.append(
        f"the SDK request alone: {hot_summary['p50']:.2f} ms back to back, "
        f"{idle_summary['p50']:.2f} ms after {WARM_LEAD_S * 1000:.0f} ms idle (p50)")
    return result


async def run_retrieval(ctx: Any) -> BenchResult:
    """bench_retrieval over 10,000 chunks (quick: 2,000)."""
    chunks, queries = (2_000, 200) if ctx.quick else (10_000, 500)
    database_url = await ctx.servers.fresh_database(fsync=True)
    measured = await bench_retrieval(database_url, chunks=chunks, queries=queries,
                                     log=ctx.log)
    summary = latency_summary(measured.samples_ns)
    return BenchResult("knowledge_retrieval", config={
        **measured.config, "ingest_seconds": round(measured.ingest_seconds, 1)},
        lines=[Line("knowledge_retrieval", "ms", summary["p50"], summary["p99"],
                    budget=Budget("median", "<=", RETRIEVAL_BUDGET_MS), summary=summary,
                    note=f"retrieve(k=4) over {measured.chunks:,} chunks, one connection, "
                         "round trip included; Zipf-distributed words, caller-like questions")])


def _time(work: Callable[[], object], repetitions: int) -> list[int]:
    samples = []
    for _ in range(repetitions):
        began = time.perf_counter_ns()
        work()
        samples.append(time.perf_counter_ns() - began)
    return samples


async def run_fold_turn(ctx: Any) -> BenchResult:
    """Fold the call's events at each of its 40 turns."""
    turns, repetitions = 40, (20 if ctx.quick else 200)
    events = call_events(random.Random(7), ORG, "call-fold", size=1_200)
    ends = [i for i, e in enumerate(events) if isinstance(e, ev.TurnUserEnded)][:turns]
    if len(ends) < turns:
        raise RuntimeError(f"the workload call has only {len(ends)} turns")
    events = events[:ends[-1] + 1]
    payloads = [ev.encode(e) for e in events]
    final = fold("call-fold", events)
    if len(final.turns) < turns // 2 or final.latest_user_turn != events[-1].turn_id:
        raise RuntimeError(f"unexpected fold: {len(final.turns)} agent turns")

    per_turn: list[int] = []
    decode_per_turn: list[int] = []
    for _ in range(repetitions):
        for end in ends:
            prefix = events[:end + 1]
            began = time.perf_counter_ns()
            fold("call-fold", prefix)
            per_turn.append(time.perf_counter_ns() - began)
            raw = payloads[:end + 1]
            began = time.perf_counter_ns()
            fold("call-fold", [ev.decode(p) for p in raw])
            decode_per_turn.append(time.perf_counter_ns() - began)
    whole = _time(lambda: fold("call-fold", events), repetitions * 5)
    fold_turn, decode_and_fold = latency_summary(per_turn), latency_summary(decode_per_turn)
    whole_summary = latency_summary(whole)
    return BenchResult("fold_turn", config={
        "call": f"{len(events)} events, {turns} caller turns, {len(final.messages)} messages "
                "after the fold (_workload.call_events: partials, finals, clauses, marks, "
                "tools, barge-ins)",
        "repetitions": f"{repetitions} × {turns} turns",
    }, lines=[
        Line("fold_turn.fold", "ms/turn", fold_turn["p50"], fold_turn["p99"],
             summary=fold_turn,
             note="fold of the call's events up to each turn.user_ended (turns 1..40), "
                  "already decoded (info)"),
        Line("fold_turn.decode_and_fold", "ms/turn", decode_and_fold["p50"],
             decode_and_fold["p99"], summary=decode_and_fold,
             note="decode of the replayed JSON + fold, per turn (info)"),
        Line("fold_turn.whole_call", "ms/call", whole_summary["p50"], whole_summary["p99"],
             summary=whole_summary, note=f"fold of all {len(events)} events (info)"),
    ])
