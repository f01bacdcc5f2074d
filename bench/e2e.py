"""e2e: a turn through every service, each its own process — platform overhead and voice-to-voice.

Budgets (ARCHITECTURE.md §8): platform overhead per turn p50 ≤ 5 ms and p99 ≤ 25 ms at 100 live
calls; offline voice-to-voice p50 ≤ 700 ms on this 2-core machine.

Processes (all on this machine's two cores): nats-server, Postgres, the gateway, the recorder,
media and brain (``python -m parley.<service>``), the provider emulators, and this process,
which plays Twilio for every call and reads the call events off the bus (core subscription).

``e2e.platform_overhead`` — N concurrent calls (100; quick 20) as in ``media_calls``: signed
webhook, WebSocket, 50 frames/s each way; each caller speaks 1 s noise bursts (the Deepgram
emulator answers with a scripted transcript), waits for the answer to play, pauses (0.6 ± 0.3 s,
drawn every turn, as ``media_calls``), speaks again.
Media runs on the Deepgram and Cartesia emulators (Cartesia: no first-byte delay, 20× real time),
the brain on the Anthropic emulator with no time to first token and no pacing (the real SDK over
loopback HTTP). The agent has no greeting. Per turn:

    overhead = (first agent frame received by the caller − turn.user_ended.at)
               − min(turn.completed.llm_wait_ms, ttft_ms) − agent.speech.started.tts_provider_ms

``turn.user_ended.at`` is media's wall clock when it built the event; the frame time is this
process's wall clock when its WebSocket reader got the first ``media`` message of the answer
(same host). Provider time is what each side measured around its provider: ``llm_wait_ms`` is
what the brain's turn waited from asking the LLM to its first token — the model's ``ttft_ms``
(the SDK's request, loopback HTTP, the emulator's own handling) for a request made when the turn
ended; less, usually 0, when the turn adopted a preemptive reply started on the caller's words
before the turn ended (the speculation's own ttft is then not subtracted, as it did not delay
the turn); ``tts_provider_ms`` is media's first clause sent (the SDK's ``send`` returned) → the
synthesiser's first audio chunk back (loopback, the Cartesia emulator's synthesis of a tone,
µ-law, base64, one WebSocket message, the SDK's parse). Everything else — bus hops, consumer
fetches, folds, lookups, retrieval, opening the TTS context, framing, the gateway, the telephony
socket — is platform time. ``agent.speech.started.tts_ttfb_ms`` (media's say → first frame,
synthesis included) is reported as a stage, not subtracted. The gross time (nothing subtracted)
is reported beside it. Where the time goes is broken down from the events' ``at`` stamps (wall
clock, one host): user_ended → turn.started (bus hop, consumer fetch, fold, agent/tools lookups,
retrieval, profile) → first agent.say (the LLM stream up to the first clause, ttft included) →
agent.speech.started (media receives the clause, opens TTS, first chunk, first frame published)
→ caller (audio bus hop, gateway, WebSocket).

Most turns play a prepared reply: the Deepgram emulator sends its final 200 ms into the caller's
silence (media asks for that endpointing, 100 ms before its own 300 ms end of turn), the brain
speculates on those words and publishes the reply's first clause, media synthesises it, and
the turn's answer starts the moment the turn ends. The note gives the share of such turns and
both groups' numbers. ``e2e.platform_overhead.nothing_ahead`` (info, full run only) runs the
same load again with the brain neither speculating nor preparing: every turn goes the whole
way — bus, brain, LLM request, ``agent.say``, TTS — after it ended.

``e2e.memory_per_call`` — the §8 budget of at most 1 MB per live call across all services, from
the same run: the gateway's, media's, the brain's and the recorder's RSS with every call live
at the end of the measured window, less their RSS once started and before the first call, ÷
calls. Anything first loaded by the first call (SDK clients, codecs) counts as per-call memory,
so the figure errs high. nats-server's growth is given beside it, not in the sum: it is the
bus, not a Parley service, and it grows while the AUDIO stream captures the calls' audio (about
2 MB/s at 100 calls) — 48 MB over a full run's 30 s of calls, 2026-12-05.

``e2e.voice_to_voice_offline`` — a few calls in sequence with local providers only (media:
WebRTC VAD + Whisper tiny.en + Piper; brain: the local responder), each caller saying several
Piper-synthesised sentences (leading/trailing silence trimmed, so the last frame sent is the end
of speech) through the caller simulator, waiting politely for each answer. Per turn: the
utterance's last frame sent → the first agent frame received (``CallResult.latencies_ms``),
broken down by ``turn.user_ended`` (``eou_delay_ms``, ``stt_final_ms``), the brain (user_ended →
first agent.say) and media's TTS (agent.say → agent.speech.started).

``E2E_PARTS=overhead`` or ``E2E_PARTS=voice`` runs one part (investigations);
``E2E_ROWS=<file>`` writes every measured turn's stages (with its ``turn.user_ended`` time, when
the caller's words became known and whether a prepared reply played) as JSON, to see when the
slow turns happened and where they lost their time (``<file>.nothing_ahead``: the second run).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import psycopg
from _stats import BenchResult, Budget, Line, percentile
from gateway_frames import (
    AGENT,
    CALLER,
    NUMBER,
    ORG,
    TOKEN,
    Gateway,
    _log_tail,
    _sample,
)
from media_calls import (
    CARTESIA_KEY,
    DEEPGRAM_KEY,
    TRANSCRIPT,
    Call,
    Media,
    _close,
    _emulator,
    _open,
    _pace,
    _spawn,
)
from nats.aio.msg import Msg

from parley.common.configuration import AgentSettings, assign_number, create_agent, create_org
from parley.common.events import decode
from parley.devkit.telephony import twilio_protocol as tp
from parley.devkit.telephony.audio_codec import ulaw_decode
from parley.devkit.telephony.call_script import CallScript, Utterance

OVERHEAD_P50_MS, OVERHEAD_P99_MS, OVERHEAD_CALLS = 5.0, 25.0, 100
MEMORY_PER_CALL_KB = 1024.0  # §8: memory per live call across all services ≤ 1 MB
SERVICES = ("gateway", "media", "brain", "recorder")
V2V_P50_MS = 700.0
ANSWER = "Sure, one moment, let me check."
ANTHROPIC_KEY = "sk-bench-e2e"
ANSWER_GAP_S = 0.5  # agent audio after this long a quiet spell starts a new answer
SENTENCES = (
    "Hi, how much does a teeth cleaning cost?",
    "Are you open on Friday afternoon?",
    "Do you take dental insurance?",
    "Can I book a cleaning for next Tuesday?",
)
_ANTHROPIC = f"""
from parley.common import runtime
from parley.devkit.emulators import serve_until_stopped
from parley.devkit.emulators.anthropic import AnthropicEmulator, ScriptedReply
emulator = AnthropicEmulator(api_key={ANTHROPIC_KEY!r}, ttft_s=0.0, tokens_per_second=None,
                             default_reply=ScriptedReply(text={ANSWER!r}))
runtime.run(serve_until_stopped(emulator, port=0))
"""
VENDOR_VARIABLES = ("ANTHROPIC_API_KEY", "DEEPGRAM_API_KEY", "CARTESIA_API_KEY",
                    "OPENAI_API_KEY")


# -- what the bus said ------------------------------------------------------------------------


@dataclass
class TurnFacts:
    """One turn's events: publisher wall time (``at``) and what they carried."""

    user_ended: float = math.nan
    arrived: float = math.nan  # turn.user_ended reached this process
    started: float = math.nan  # turn.started
    first_say: float = math.nan
    speech_started: float = math.nan
    ttft_ms: float = math.nan
    llm_wait_ms: float = math.nan
    tts_ttfb_ms: float = math.nan
    tts_provider_ms: float = math.nan
    voice_to_voice_ms: float = math.nan
    eou_delay_ms: float = math.nan
    stt_final_ms: float = math.nan
    text: str = ""
    stopped: float = math.nan  # the call's last speech.stopped before the turn ended
    final: float = math.nan  # the call's last transcript.final before the turn ended
    reply_prepared: float = math.nan  # agent.reply_prepared for this turn
    prepared: bool = False  # media played a prepared reply at the turn's end


class Events:
    """Every call event, filed by (call, turn) as it arrives."""

    def __init__(self) -> None:
        self.turns: dict[tuple[str, str], TurnFacts] = defaultdict(TurnFacts)
        self.counts: dict[str, int] = defaultdict(int)
        self._heard: dict[tuple[str, str], float] = {}  # (call, event type) → its last ``at``

    async def on_message(self, msg: Msg) -> None:
        now = time.time()
        try:
            event = decode(msg.data)
        except Exception:
            return
        kind = event.type
        self.counts[kind] += 1
        turn_id = getattr(event, "turn_id", None)
        at = event.at.timestamp()
        if turn_id is None:
            if kind in ("speech.stopped", "transcript.final"):
                self._heard[(event.call_id, kind)] = at
            return
        facts = self.turns[(event.call_id, turn_id)]
        if kind == "turn.user_ended":
            facts.user_ended, facts.arrived, facts.text = at, now, event.text
            facts.eou_delay_ms, facts.stt_final_ms = event.eou_delay_ms, event.stt_final_ms
            facts.prepared = bool(event.prepared_text)
            facts.stopped = self._heard.get((event.call_id, "speech.stopped"), math.nan)
            facts.final = self._heard.get((event.call_id, "transcript.final"), math.nan)
        elif kind == "agent.reply_prepared" and math.isnan(facts.reply_prepared):
            facts.reply_prepared = at
        elif kind == "turn.started" and math.isnan(facts.started):
            facts.started = at
        elif kind == "agent.say" and math.isnan(facts.first_say):
            facts.first_say = at
        elif kind == "agent.speech.started" and math.isnan(facts.speech_started):
            facts.speech_started = at
            facts.tts_ttfb_ms, facts.voice_to_voice_ms = event.tts_ttfb_ms, event.voice_to_voice_ms
            facts.tts_provider_ms = event.tts_provider_ms
        elif kind == "turn.completed":
            facts.ttft_ms, facts.llm_wait_ms = event.ttft_ms, event.llm_wait_ms


def _rss(processes: dict[str, psutil.Process]) -> dict[str, int]:
    """Resident memory of every process but this one, bytes."""
    return {who: process.memory_info().rss for who, process in processes.items()
            if who != "bench"}


def _summary(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"n": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan}
    return {"n": len(finite), "p50": percentile(finite, 50), "p90": percentile(finite, 90),
            "p99": percentile(finite, 99), "max": max(finite), "min": min(finite)}


# -- processes --------------------------------------------------------------------------------


class Service:
    """``python -m parley.<name>`` with its log; ready when ``ready_line`` is logged."""

    def __init__(self, name: str, env: dict[str, str], root: Path, ready_line: str) -> None:
        self.name, self.env, self.ready_line = name, env, ready_line
        self.log_path = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, timeout_s: float = 90.0) -> psutil.Process:
        self.proc = _spawn(["-m", f"parley.{self.name}"], self.env, self.log_path)
        deadline = time.monotonic() + timeout_s
        while self.ready_line not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{_log_tail(self.log_path)}")
            await asyncio.sleep(0.05)
        return psutil.Process(self.proc.pid)

    async def stop(self) -> int:
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(proc.wait, 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
            return -9


async def _start_anthropic() -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _ANTHROPIC, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    if not line.startswith(b"http"):
        process.kill()
        raise RuntimeError(f"the Anthropic emulator did not start: {line!r}")
    return process, line.decode().strip()


async def _configure(database_url: str, settings: AgentSettings) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await create_org(conn, ORG, "Bench")
        await create_agent(conn, ORG, "Bench agent", settings, agent_id=AGENT)
        await assign_number(conn, ORG, NUMBER, AGENT)


def _base_env(nats_url: str, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in VENDOR_VARIABLES
           and not (k.startswith("PARLEY_") and k.endswith(("_API_KEY", "_URL")))}
    return {**env, "PARLEY_NATS_URL": nats_url, "PARLEY_DATABASE_URL": database_url,
            "PARLEY_LOG_LEVEL": "INFO"}


async def _stop_all(services: list[Service], others: list[Any]) -> None:
    for service in reversed(services):
        code = await service.stop()
        if code not in (0, -15):
            print(f"  {service.name} exited with {code}:\n{_log_tail(service.log_path, 8)}",
                  file=sys.stderr)
    for proc in others:
        with contextlib.suppress(ProcessLookupError):
            if isinstance(proc, asyncio.subprocess.Process):
                if proc.returncode is None:
                    proc.send_signal(signal.SIGINT)
                    try:
                        await asyncio.wait_for(proc.wait(), 5)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()
            elif proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.to_thread(proc.wait, 5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# -- (a) platform overhead --------------------------------------------------------------------


@dataclass
class Answers:
    """Per call: when each answer's first frame reached the caller (wall clock)."""

    first_frames: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


async def _receive(call: Call, answers: Answers) -> None:
    """Agent audio and marks; the first frame after a quiet spell starts an answer."""
    ws = call.ws
    assert ws is not None
    last_audio = 0.0
    async for message in ws:
        if message.type != aiohttp.WSMsgType.TEXT:
            break
        wall = time.time()
        event = tp.parse_server_message(message.data)
        now = time.perf_counter()
        if isinstance(event, tp.ServerMedia):
            if now - last_audio > ANSWER_GAP_S:
                answers.first_frames[call.call_id].append(wall)
            last_audio = now
            payload = event.media.payload
            size = len(payload) * 3 // 4 - payload.count("=", -2)
            call.out_bytes += size
            call.played_until = max(call.played_until, now) + size / 8000
            call.speak_at = call.played_until + call.pause
        elif isinstance(event, tp.ServerMark):
            call.marks.append((max(call.played_until, now), event.mark.name))
        elif isinstance(event, tp.Clear):
            call.played_until = now
            call.marks = [(now, name) for _, name in call.marks]
    call.closed_code = ws.close_code


def _overhead_turns(events: Events, answers: Answers, window: tuple[float, float],
                    rows_file: str = "") -> tuple[list[dict[str, float]], int]:
    """Each turn that ended in the window, matched with the first answer frame after it."""
    rows, unanswered = [], 0
    for (call_id, _turn_id), facts in events.turns.items():
        if math.isnan(facts.user_ended) or not window[0] <= facts.user_ended < window[1]:
            continue
        frame = next((t for t in answers.first_frames.get(call_id, ())
                      if t >= facts.user_ended), None)
        if frame is None:
            unanswered += 1
            continue
        gross = 1000 * (frame - facts.user_ended)
        ttft = 0.0 if math.isnan(facts.ttft_ms) else facts.ttft_ms
        # The provider's share of the turn's wait: never more than the model's own ttft (the
        # rest of a long wait is this brain's loop being busy, i.e. platform time).
        llm = 0.0 if math.isnan(facts.llm_wait_ms) else min(facts.llm_wait_ms, ttft)
        tts = 0.0 if math.isnan(facts.tts_provider_ms) else facts.tts_provider_ms
        rows.append({
            "at": facts.user_ended,
            "gross": gross, "overhead": gross - llm - tts, "ttft": ttft, "llm_wait": llm,
            "tts_provider": tts,
            "bus_to_bench": 1000 * (facts.arrived - facts.user_ended),
            "brain_to_started": 1000 * (facts.started - facts.user_ended),
            "brain_to_first_say": 1000 * (facts.first_say - facts.user_ended),
            "brain_without_llm": 1000 * (facts.first_say - facts.user_ended) - llm,
            "media_say_to_frame": 1000 * (facts.speech_started - facts.first_say),
            "tts_ttfb_ms": facts.tts_ttfb_ms,
            "frame_to_caller": 1000 * (frame - facts.speech_started),
            # When the caller's words were known, relative to the turn's end (negative: before).
            "stopped_to_end": 1000 * (facts.user_ended - facts.stopped),
            "final_to_end": 1000 * (facts.user_ended - facts.final),
            "prepared_to_end": 1000 * (facts.user_ended - facts.reply_prepared),
            "prepared": float(facts.prepared),
        })
    if rows_file:  # every turn's stages, to find where the slow ones lost time
        Path(rows_file).write_text(json.dumps(rows))
    for row in rows:
        del row["at"]  # a time, not a latency: not summarised
    return rows, unanswered


async def _platform_overhead(ctx: Any, result: BenchResult, *, ahead: bool = True) -> None:
    """Run (a); ``ahead=False``: the brain neither speculates nor prepares (info lines)."""
    count = 20 if ctx.quick else OVERHEAD_CALLS
    if os.environ.get("E2E_CALLS"):
        count = int(os.environ["E2E_CALLS"])
    warmup_s, measure_s = (4.0, 8.0) if ctx.quick else (6.0, 20.0)
    bus = await ctx.servers.clean_bus("bench-e2e")
    database_url = await ctx.servers.fresh_database(fsync=True)
    # No idle prompts or hang-ups: the calls are measured turn by turn, and a caller whose
    # burst got no words (or a call opened long before its first burst) is not a silent caller.
    await _configure(database_url, AgentSettings(record=False, max_duration_s=3600, greeting="",
                                                 idle_prompt_s=0, idle_hangup_s=0))
    root = Path(tempfile.mkdtemp(prefix="parley-bench-e2e-", dir="/tmp"))
    nats_url = ctx.servers.nats().url
    env = _base_env(nats_url, database_url)
    gateway = Gateway(nats_url=nats_url, database_url=database_url, root=root, liveness=True)
    services: list[Service] = []
    others: list[Any] = []
    events, answers = Events(), Answers()
    utterances = count * (math.ceil((warmup_s + measure_s + 6) / 3.5) + 4)
    connector = aiohttp.TCPConnector(limit=0)
    try:
        deepgram, deepgram_url = await _emulator(
            "parley.devkit.emulators.deepgram",
            ["--api-key", DEEPGRAM_KEY, *(["--utterance", TRANSCRIPT] * utterances)], root)
        others.append(deepgram)
        cartesia, cartesia_url = await _emulator(
            "parley.devkit.emulators.cartesia", ["--api-key", CARTESIA_KEY], root)
        others.append(cartesia)
        anthropic, anthropic_url = await _start_anthropic()
        others.append(anthropic)
        media_env = {**env, "PARLEY_PRELOAD_MODELS": "false",
                     "PARLEY_DEEPGRAM_API_KEY": DEEPGRAM_KEY, "PARLEY_DEEPGRAM_URL": deepgram_url,
                     "PARLEY_CARTESIA_API_KEY": CARTESIA_KEY, "PARLEY_CARTESIA_URL": cartesia_url}
        media = Media(media_env, root, "media")
        brain = Service("brain", {**env, "PARLEY_ANTHROPIC_API_KEY": ANTHROPIC_KEY,
                                  "PARLEY_ANTHROPIC_URL": anthropic_url,
                                  "PARLEY_LLM_CHAIN": "anthropic",
                                  "PARLEY_BRAIN_HTTP_PORT": "0",
                                  "PARLEY_PREEMPTIVE_GENERATION": str(ahead).lower(),
                                  "PARLEY_PREPARE_REPLIES": str(ahead).lower()},
                        root, "brain ready")
        recorder = Service("recorder", env, root, "recorder up")
        services += [recorder, brain]
        processes = {"recorder": await recorder.start(), "brain": await brain.start(),
                     "media": await media.start()}
        sub = await bus.nc.subscribe("parley.ev.*.call.*.>", cb=events.on_message)
        async with aiohttp.ClientSession(connector=connector) as http:
            await gateway.start(http)
            assert gateway.process is not None
            processes["gateway"] = gateway.process
            processes["bench"] = psutil.Process()
            if ctx.servers.nats().pid is not None:
                processes["nats-server"] = psutil.Process(ctx.servers.nats().pid)
            rss_idle = _rss(processes)
            calls = await _open(http, bus.nc, gateway, count, [])
            for call in calls:  # our own reader, which notes when each answer began
                assert call.receiver is not None
                call.receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call.receiver
                call.receiver = asyncio.create_task(_receive(call, answers))
            ctx.log(f"  {count} calls open; {warmup_s:g}s warm-up, {measure_s:g}s measured")
            gc.collect()
            gc.freeze()
            gc.disable()
            try:
                await _pace(calls, seconds=warmup_s, speaking=True, lags=[], sampled=False)
                cpu_start, start, wall_start = _sample(processes), time.perf_counter(), time.time()
                await _pace(calls, seconds=measure_s, speaking=True, lags=[], sampled=False)
                cpu_end, end, wall_end = _sample(processes), time.perf_counter(), time.time()
                rss_live = _rss(processes)
                await _pace(calls, seconds=4.0, speaking=False, lags=[], sampled=False)
            finally:
                gc.enable()
                gc.unfreeze()
                await sub.unsubscribe()
                problems = await _close(calls)
            if problems:
                ctx.log(f"  {len(problems)} calls did not end cleanly; first: {problems[0]}")
            await gateway.stop()
    finally:
        gateway.kill()
        with contextlib.suppress(Exception):
            await media.stop()
        await _stop_all(services, others)
        await bus.close()
        shutil.rmtree(root, ignore_errors=True)

    rows_file = os.environ.get("E2E_ROWS", "")
    rows, unanswered = _overhead_turns(events, answers, (wall_start, wall_end),
                                       rows_file + ("" if ahead or not rows_file
                                                    else ".nothing_ahead"))
    stats = {key: _summary([row[key] for row in rows])
             for key in (rows[0] if rows else {}) if key != "prepared"}
    cpu = {who: 100 * (cpu_end[who][0] - cpu_start[who][0]) / (end - start) for who in cpu_start}
    overhead = stats.get("overhead", _summary([]))
    gross = stats.get("gross", _summary([]))
    prepared = [row["overhead"] for row in rows if row["prepared"]]
    ordinary = _summary([row["overhead"] for row in rows if not row["prepared"]])
    budgeted = count == OVERHEAD_CALLS and ahead
    grown = {who: rss_live[who] - rss_idle[who] for who in rss_idle}
    per_call_kb = sum(grown[who] for who in SERVICES) / count / 1024
    memory = {"calls": count, "per_call_kb": per_call_kb,
              "idle_mb": {who: v / 2**20 for who, v in rss_idle.items()},
              "live_mb": {who: v / 2**20 for who, v in rss_live.items()},
              "per_call_kb_each": {who: v / count / 1024 for who, v in grown.items()}}
    summary = {"calls": count, "turns": overhead["n"], "unanswered": unanswered,
               "prepared_turns": len(prepared), "prepared_ms": _summary(prepared),
               "unprepared_ms": ordinary,
               "stages_ms": stats, "cpu_pct_core": cpu, "window_s": end - start,
               "subtracted": "turn.completed.llm_wait_ms (LLM: what the turn waited for the "
                             "first token — its ttft, or less when a preemptive reply was "
                             "adopted) and "
                             "agent.speech.started.tts_provider_ms (TTS: first clause sent → "
                             "first audio back)"}
    if not ahead:
        result.lines.append(Line(
            "e2e.platform_overhead.nothing_ahead", "ms", overhead["p50"], overhead["p99"],
            summary=summary, note=f"{count} calls, the brain neither speculating nor preparing "
                                  "replies: every turn asked of the LLM when it ended"))
        result.notes.append(
            f"platform overhead with nothing done ahead, {count} calls, {overhead['n']} turns: "
            f"p50 {overhead['p50']:.1f} ms, p99 {overhead['p99']:.1f} ms")
        ctx.log("  " + result.notes[-1])
        return
    result.lines += [
        Line("e2e.platform_overhead", "ms", overhead["p50"], overhead["p99"], summary=summary,
             budget=Budget("median", "<=", OVERHEAD_P50_MS) if budgeted else None,
             note=f"{count} calls: turn.user_ended → first agent frame at the caller, minus the "
                  "time the turn waited on the LLM and the TTS's time to first audio "
                  "(provider time)"),
        Line("e2e.platform_overhead.tail", "ms", overhead["p50"], overhead["p99"],
             budget=Budget("tail", "<=", OVERHEAD_P99_MS) if budgeted else None,
             summary=overhead, note="the same turns, held to the p99 budget"),
        Line("e2e.platform_overhead.gross", "ms", gross["p50"], gross["p99"], summary=gross,
             note="nothing subtracted"),
    ]
    result.lines.append(Line(
        "e2e.memory_per_call", "KB", per_call_kb, sum(rss_live[w] for w in SERVICES) / 2**20,
        tail_label="services RSS MB", summary=memory,
        budget=Budget("median", "<=", MEMORY_PER_CALL_KB) if budgeted else None,
        note=f"(RSS of {', '.join(SERVICES)} with {count} calls live at the window's end − their "
             "RSS before the first call) ÷ calls; second column the services' RSS"))
    result.notes.append(
        f"memory per live call: {per_call_kb:.0f} KB across the services ("
        + ", ".join(f"{who} {memory['per_call_kb_each'][who]:.0f}" for who in grown)
        + " KB/call; nats-server is not a Parley service and is not in the sum); RSS MB idle → "
        + "live: " + ", ".join(f"{who} {memory['idle_mb'][who]:.0f} → "
                               f"{memory['live_mb'][who]:.0f}" for who in grown))
    ctx.log("  " + result.notes[-1])
    stages = ("bus_to_bench", "brain_to_started", "brain_without_llm", "ttft", "llm_wait",
              "media_say_to_frame", "tts_ttfb_ms", "tts_provider", "frame_to_caller")
    result.notes.append(
        f"platform overhead, {count} calls, {overhead['n']} turns ({unanswered} unanswered): "
        f"p50 {overhead['p50']:.1f} ms, p99 {overhead['p99']:.1f} ms (gross p50 "
        f"{gross['p50']:.1f}, p99 {gross['p99']:.1f}); {len(prepared)} turns played a "
        f"prepared reply (p50 {_summary(prepared)['p50']:.1f}, p99 "
        f"{_summary(prepared)['p99']:.1f}), {ordinary['n']} did not (p50 {ordinary['p50']:.1f}, "
        f"p99 {ordinary['p99']:.1f}); stages p50/p99 ms: "
        + ", ".join(f"{s} {stats[s]['p50']:.1f}/{stats[s]['p99']:.1f}" for s in stages
                    if s in stats)
        + "; CPU % core: " + ", ".join(f"{who} {v:.0f}" for who, v in cpu.items()))
    ctx.log("  " + result.notes[-1])


# -- (b) offline voice-to-voice ---------------------------------------------------------------


def _trim(ulaw: bytes, threshold: int = 300) -> bytes:
    """Drop leading and trailing near-silence (|pcm| < threshold) of 8 kHz µ-law audio."""
    pcm = np.abs(ulaw_decode(ulaw).astype(np.int32))
    loud = np.flatnonzero(pcm >= threshold)
    if not len(loud):
        return ulaw
    return ulaw[int(loud[0]):int(loud[-1]) + 1]


async def _caller_sentences() -> list[bytes]:
    from parley.media.providers.local.piper_tts import PiperTts

    piper = PiperTts()
    audio = []
    for text in SENTENCES:
        stream = await piper.open()
        await stream.say(text, last=True)
        audio.append(_trim(b"".join([chunk.audio async for chunk in stream.audio()])))
    return audio


async def _voice_to_voice(ctx: Any, result: BenchResult) -> None:
    from parley.devkit.telephony.caller_simulator import CallerSimulator

    calls, turns_per_call = (1, 3) if ctx.quick else (3, 4)
    bus = await ctx.servers.clean_bus("bench-e2e-v2v")
    database_url = await ctx.servers.fresh_database(fsync=True)
    settings = AgentSettings(record=False, max_duration_s=600, idle_prompt_s=0, idle_hangup_s=0)
    await _configure(database_url, settings)
    root = Path(tempfile.mkdtemp(prefix="parley-bench-e2e-v2v-", dir="/tmp"))
    nats_url = ctx.servers.nats().url
    env = _base_env(nats_url, database_url)
    gateway = Gateway(nats_url=nats_url, database_url=database_url, root=root, liveness=True)
    recorder = Service("recorder", env, root, "recorder up")
    media = Service("media", {**env, "PARLEY_INSTANCE_ID": "media-v2v"}, root, "media ready")
    brain = Service("brain", {**env, "PARLEY_LLM_CHAIN": "local",
                              "PARLEY_BRAIN_HTTP_PORT": "0"}, root, "brain ready")
    services = [recorder, media, brain]
    events = Events()
    latencies: list[float] = []
    per_turn: list[tuple[str, int, float]] = []  # (call_id, utterance index, ms)
    unmeasured: list[tuple[str, int]] = []  # utterances the caller heard no answer after
    stop_reasons: list[str] = []
    try:
        sentences = await _caller_sentences()
        for service in services:
            await service.start(timeout_s=120)
        sub = await bus.nc.subscribe("parley.ev.*.call.*.>", cb=events.on_message)
        async with aiohttp.ClientSession() as http:
            await gateway.start(http)
            for number in range(calls):
                order = [sentences[(number + i) % len(sentences)] for i in range(turns_per_call)]
                call_ids: list[str] = []

                async def on_stream(parameters: dict[str, str], ids: list[str] = call_ids
                                    ) -> None:
                    ids.append(parameters.get("call_id", ""))

                simulator = CallerSimulator(
                    gateway_url=gateway.base, auth_token=TOKEN, from_number=CALLER,
                    to_number=NUMBER, session=http, script=CallScript(
                        utterances=tuple(Utterance(audio=a, label=f"u{i + 1}")
                                         for i, a in enumerate(order)),
                        reply_timeout=20.0, hang_up_when_done=True, hangup_after=120.0))
                simulator.on_stream = on_stream
                outcome = await simulator.run()
                stop_reasons.append(outcome.stop_reason)
                for index, latency in enumerate(outcome.latencies_ms):
                    if latency is not None:
                        latencies.append(latency)
                        per_turn.append((call_ids[0] if call_ids else "", index + 1, latency))
                    else:
                        unmeasured.append((call_ids[0] if call_ids else "", index + 1))
                ctx.log(f"  call {number + 1}: voice-to-voice ms "
                        + ", ".join("-" if v is None else f"{v:.0f}"
                                    for v in outcome.latencies_ms))
                await asyncio.sleep(1.0)  # the last events of the call
            await sub.unsubscribe()
            await gateway.stop()
    finally:
        gateway.kill()
        await _stop_all(services, [])
        await bus.close()
        shutil.rmtree(root, ignore_errors=True)

    user_turns = [(k, f) for k, f in events.turns.items() if not math.isnan(f.user_ended)]
    expected = calls * turns_per_call
    parts: dict[str, list[float]] = defaultdict(list)
    for call_id, index, latency in per_turn:
        facts = events.turns.get((call_id, f"t{index}"))
        if facts is None or math.isnan(facts.user_ended):
            continue
        brain_ms = 1000 * (facts.first_say - facts.user_ended)
        media_ms = 1000 * (facts.speech_started - facts.first_say)
        parts["eou_delay_ms"].append(facts.eou_delay_ms)
        parts["stt_final_ms"].append(facts.stt_final_ms)
        parts["brain_ms"].append(brain_ms)
        parts["tts_say_to_frame_ms"].append(media_ms)
        parts["media_voice_to_voice_ms"].append(facts.voice_to_voice_ms)
        # The caller's clock is not the services': what is left after the three parts above.
        parts["end_of_speech_to_turn_end_ms"].append(latency - brain_ms - media_ms)
    stats = {key: _summary(values) for key, values in parts.items()}
    v2v = _summary(latencies)
    summary = {"calls": calls, "turns_per_call": turns_per_call, "turns": v2v,
               "user_turns_ended": len(user_turns), "expected_turns": expected,
               "unmeasured": [f"{call_id} u{index}" for call_id, index in unmeasured],
               "stop_reasons": stop_reasons, "parts_ms": stats,
               "texts": [f.text for _, f in sorted(user_turns)]}
    result.lines += [
        Line("e2e.voice_to_voice_offline", "ms", v2v["p50"], v2v["p99"], summary=summary,
             budget=Budget("median", "<=", V2V_P50_MS),
             note=f"{calls} calls × {turns_per_call} turns, local Whisper + local responder + "
                  "Piper: the caller's last speech frame sent → first agent frame received"),
    ]
    result.notes.append(
        f"voice-to-voice offline, {v2v['n']} turns: p50 {v2v['p50']:.0f} ms, p99 "
        f"{v2v['p99']:.0f} ms; turns ended {len(user_turns)} of {expected} utterances; parts "
        "p50 ms: " + ", ".join(f"{k} {s['p50']:.0f}" for k, s in stats.items()))
    ctx.log("  " + result.notes[-1])
    for call_id, index in unmeasured:  # not in the numbers above: say what the services saw
        facts = events.turns.get((call_id, f"t{index}"), TurnFacts())
        result.notes.append(
            f"{call_id} utterance {index}: no agent audio reached the caller after it "
            f"ended; the services' turn t{index}: user_ended text {facts.text!r}, agent.say "
            f"{'yes' if not math.isnan(facts.first_say) else 'no'}, agent.speech.started "
            f"{'yes' if not math.isnan(facts.speech_started) else 'no'} (media's "
            f"voice_to_voice_ms {facts.voice_to_voice_ms:.0f}); user turns of the call: "
            + ", ".join(f"{turn}={f.text!r}" for (c, turn), f in sorted(events.turns.items())
                        if c == call_id and not math.isnan(f.user_ended)))
        ctx.log("  " + result.notes[-1])


async def run(ctx: Any) -> BenchResult:
    """Platform overhead at N calls with emulated providers; offline voice-to-voice."""
    parts = os.environ.get("E2E_PARTS", "overhead,voice").split(",")
    result = BenchResult("e2e", config={
        "platform_overhead": "gateway, media, brain, recorder as processes; Deepgram, Cartesia "
                             "(first byte 0, 20× real time) and Anthropic (ttft 0, unpaced) "
                             "emulators; callers as in media_calls (1 s noise bursts), answer "
                             f"{ANSWER!r}; no greeting",
        "voice_to_voice_offline": "gateway, media (WebRTC VAD, Whisper tiny.en, Piper), brain "
                                  "(local responder), recorder as processes; caller simulator "
                                  "with trimmed Piper sentences",
    })
    if "overhead" in parts:
        await _platform_overhead(ctx, result)
        if not ctx.quick:
            await _platform_overhead(ctx, result, ahead=False)
    if "voice" in parts:
        await _voice_to_voice(ctx, result)
    return result
