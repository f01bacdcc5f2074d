"""media_calls: concurrent live calls through gateway + media with emulated vendors.

Budget (ARCHITECTURE.md §8): ≥ 250 concurrent calls on one 2-core machine, everything local,
emulated providers, 50 frames/s each way, with zero lost frames and p99 inbound frame latency
≤ 20 ms.

Processes, all on this machine's two cores: nats-server, Postgres (config only), the gateway
(``python -m parley.gateway``), one media process (``python -m parley.media``, models not
preloaded: Whisper/Piper are only the fallbacks; ``MEDIA_CALLS_INSTANCES=2`` runs two, which
share the calls through the ``media-claims`` work queue) configured with the Deepgram and Cartesia
emulators, each emulator in its own process (``python -m parley.devkit.emulators.deepgram``,
``….cartesia``), and this process, which plays Twilio for every call and the brain.

Media runs as deployed, at its default niceness -5 (``PARLEY_NICE``; raising priority needs
CAP_SYS_NICE — without it media logs so and runs at 0, and every level's note says which it got).
At equal weight the kernel shares the cores between runnable threads by weight, not by need:
media, which needs the most CPU of all these processes, then waited for its share whenever the
others were busy too (250 calls on 2026-12-06: run-queue wait 27 % of the window, loop lag p99
16 ms, inbound p99 22–28 ms). The emulators run at nice 5 (``EMULATOR_NICE``): they stand in for
vendors' servers, which are other machines. A full run repeats the budget level with media at
``PARLEY_NICE=0`` as info lines (``media_calls.250_media_nice_0.*``), so what the weight buys
stays measured.

Calls are opened as in ``gateway_frames`` (signed ``/twilio/voice`` webhook, TwiML, signed
WebSocket upgrade, ``connected``, ``start``) and paced by one task: a 20 ms tick split into
``SLOTS`` slots, each sending one ``media`` message on its share of the sockets. Each caller
speaks a 1 s noise burst (webrtcvad and the Deepgram emulator both take it for speech; the
emulator answers with a scripted transcript), then silence until the agent has answered and the
answer has "played" (its audio length after it arrived) plus a pause (0.6 ± 0.3 s, uniform, drawn
every turn: a fixed pause phase-locks calls, see ``next_pause``), then speaks again; the first
utterance of each call starts at a random time so turns are spread out. The caller side
echoes every ``mark`` when the audio before it has played, as Twilio does, so media knows what
was heard and never sees a barge-in. This process plays the brain: on ``turn.user_ended`` it
publishes the ``agent.say`` clauses of ``ANSWER`` at once (no LLM time).

Per level (fresh calls and a fresh media process; gateway and emulators are shared):

- inbound latency: media's histogram ``media_inbound_frame_delay_seconds`` (the time the
  gateway published the frame, carried in the frame's prefix → its session's handler, wall
  clock on one host; live frames arrive over core NATS, missed ones from the AUDIO stream),
  scraped from media's ``/metrics`` at the window's edges; percentiles interpolated within
  buckets. ``gateway_path``: Twilio ``send_str`` → the gateway's publish of that frame, for
  every 10th call: the send time (wall clock) against the publish stamp in the frame's prefix,
  read by a core subscriber in this process. The two legs are in series and meet at that stamp,
  so "held" requires p99(gateway path) + p99(media leg) ≤ 20 ms. ``gateway_roundtrip`` (info) is
  what the gateway path used to be, ``send_str`` → that subscriber (what ``gateway_frames``
  measures): it also counts a NATS hop to this process, which media's path does not take, and
  this process's loop lag while it paces 250 callers (7.3 of the 24.7 ms p99 at 250 calls in the
  run of 2026-12-05 22:51).
- media loop lag (info): how late media's event loop woke its 50 ms lag timer
  (``event_loop_lag_seconds``, every service has it) over the window: the queueing every frame
  handled at that moment shared, so a media leg's tail close to it is the loop's, not the bus's.
- lost frames: inbound, every frame sent during the level − frames media's sessions handled
  (the histogram's count; media reads a call's audio from the start, so it must see them all);
  outbound, frames of every answered turn (the emulator's voice is deterministic: 60 ms of tone
  per character + 40 ms per word) − 20 ms frames the callers received.
- turn overhead: ``turn.user_ended``'s ``at`` (media, wall clock) → first agent frame at the
  caller: bus hop to the brain, ``agent.say`` publish, media's TTS request, the Cartesia
  emulator's first chunk (it paces audio at 20× real time: 5 ms for the first 100 ms chunk),
  media's frames out, gateway, WebSocket.
- CPU per process over the window (user+sys, % of one core), the time its threads waited on
  the run queue (``/proc/<pid>/task/*/schedstat``, % of the window: CPU they wanted and did not
  get) and media's RSS per call (RSS at the window's end − RSS before the first call, ÷ calls;
  summed over media instances).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
from _stats import BenchResult, Budget, Line, latency_summary, percentile
from gateway_frames import (
    TOKEN,
    Gateway,
    _answer,
    _configure,
    _free_port,
    _log_tail,
    _sample,
)
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from parley.common.bus import subscribe_frames
from parley.common.bus.audio import carrier_sequence, decode_frame
from parley.common.events import AgentSay, decode
from parley.devkit.telephony import twilio_protocol as tp
from parley.devkit.telephony.audio_codec import ulaw_encode

BUDGET_CALLS = 250
# The emulators stand in for Deepgram's and Cartesia's servers, which are not on this machine:
# they run at a lower priority, so that the services under test do not wait for them (what
# that costs their answers shows in the turn lines). The caller side, this process, keeps its
# priority: late callers would send in bursts, which no carrier does.
EMULATOR_NICE = 5
BUDGET_P99_MS = 20.0
LEVELS = (50, 100, 150, 200, 250)
QUICK_LEVELS = (50,)
SLOTS = 10
TICK_S = tp.FRAME_SECONDS
UTTERANCE_FRAMES = 50  # 1 s of noise per caller utterance
PAUSE_S = 0.6  # caller's pause after the agent's answer has played, on average …
PAUSE_JITTER_S = 0.3  # … give or take this much (uniform), drawn for every turn
REPLY_TIMEOUT_S = 6.0  # speak again anyway if no answer came
TRANSCRIPT = "I would like to book a cleaning please"
ANSWER = ("Sure, one moment,", "let me check.")
FRAMES_PER_ANSWER = sum(3 * len(word) + 2 for word in " ".join(ANSWER).split())
DEEPGRAM_KEY, CARTESIA_KEY = "bench-deepgram-key", "bench-cartesia-key"
LOOP_LAG = "event_loop_lag_seconds"
SAMPLE_EVERY = 10  # gateway-path subscriber on every 10th call
SETUP_CONCURRENCY = 16


def _noise_frames(count: int, seed: int = 1) -> list[bytes]:
    rng = np.random.default_rng(seed)
    pcm = np.clip(rng.normal(0.0, 3000.0, count * tp.FRAME_BYTES), -32768, 32767)
    audio = ulaw_encode(pcm.astype(np.int16))
    return [audio[i:i + tp.FRAME_BYTES] for i in range(0, len(audio), tp.FRAME_BYTES)]


NOISE = _noise_frames(UTTERANCE_FRAMES)
SILENCE = b"\xff" * tp.FRAME_BYTES
# The payloads in base64, encoded once: the callers send the same 51 frames over and over.
NOISE_B64 = [base64.b64encode(frame) for frame in NOISE]
SILENCE_B64 = base64.b64encode(SILENCE)


@dataclass
class Call:
    """One simulated caller (Twilio side) and what it received."""

    index: int
    call_id: str
    url: str
    parameters: dict[str, str]
    messages: tp.StreamMessages
    ws: aiohttp.ClientWebSocketResponse | None = None
    receiver: asyncio.Task[None] | None = None
    subscription: Subscription | None = None
    chunk_ms: int = 0
    speak_at: float = 0.0  # perf_counter time of the next utterance
    pause: float = PAUSE_S  # this turn's pause after the answer has played
    offset: int = -1  # frame of the utterance being spoken (-1: silent)
    played_until: float = 0.0  # when the agent audio received so far has finished playing
    marks: list[tuple[float, str]] = field(default_factory=list)  # (due, name) to echo
    awaiting: float | None = None  # turn.user_ended's wall time, until agent audio arrives
    out_bytes: int = 0
    answered: int = 0  # turns the brain answered
    sent: int = 0
    sent_at: dict[int, tuple[int, int]] = field(default_factory=dict)  # sampled calls:
    # seq → (perf_counter ns, wall-clock ns) when this side sent the frame
    closed_code: int | None = None


@dataclass
class Level:
    """What one level measured."""

    calls: int
    window_s: float
    media_buckets: list[tuple[float, float]]  # (le seconds, count in window), cumulative
    gateway_path_ns: list[int]  # send_str → the gateway's publish (the frame's own stamp)
    gateway_roundtrip_ns: list[int]  # send_str → back in this process through NATS
    sent_in: int
    handled_in: int
    expected_out: int
    received_out: int
    turn_ms: list[float]
    turns_unanswered: int
    interrupted: int
    switched: int
    cpu_s: dict[str, float]
    wait_s: dict[str, float]  # run-queue wait
    calls_per_media: list[int]
    media_rss_mb: float
    media_base_rss_mb: float
    tick_lag_ms: list[float]
    loop_lag_buckets: list[tuple[float, float]]  # media's event loop lag in the window
    media_nice: int  # the niceness media ran at (PARLEY_NICE, if it was allowed)

    def cpu_percent(self, who: str) -> float:
        """``who``'s CPU over the window as % of one core."""
        return 100 * self.cpu_s.get(who, math.nan) / self.window_s

    def media_cpu_percent(self) -> float:
        """Every media instance's CPU over the window, as % of one core."""
        return sum(self.cpu_percent(who) for who in self.cpu_s if who.startswith("media"))


# -- processes ------------------------------------------------------------------------------


def _spawn(args: list[str], env: dict[str, str], log_path: Path, *,
           nice: int = 0) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=(lambda: os.nice(nice)) if nice else None)


async def _emulator(module: str, args: list[str], root: Path) -> tuple[subprocess.Popen[bytes],
                                                                      str]:
    """Spawn ``python -m <module> --port 0 …``; its URL (the first line it prints)."""
    log_path = root / f"{module.rsplit('.', 1)[-1]}.log"
    proc = _spawn(["-m", module, "--port", "0", *args], dict(os.environ), log_path,
                  nice=EMULATOR_NICE)
    for _ in range(300):
        text = log_path.read_text(errors="replace")
        match = re.search(r"^(http://\S+)$", text, re.MULTILINE)
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{module} did not start:\n{_log_tail(log_path)}")


class Media:
    """``python -m parley.media`` on the emulators, with its ops port for ``/metrics``."""

    def __init__(self, env: dict[str, str], root: Path, name: str, *,
                 profile: bool = True) -> None:
        self.profile = profile
        self.ops = f"http://127.0.0.1:{_free_port()}"
        self.env = {**env, "PARLEY_OPS_PORT": self.ops.rsplit(":", 1)[1],
                    "PARLEY_INSTANCE_ID": name}
        self.log_path = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, timeout_s: float = 60.0) -> psutil.Process:
        # MEDIA_CALLS_PROFILE=<file>: run media under cProfile (written when it exits).
        profile = os.environ.get("MEDIA_CALLS_PROFILE") if self.profile else None
        profiler = ["-m", "cProfile", "-o", profile] if profile else []
        self.proc = _spawn([*profiler, "-m", "parley.media"], self.env, self.log_path)
        deadline = time.monotonic() + timeout_s
        while "media ready" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"media did not start:\n{_log_tail(self.log_path)}")
            await asyncio.sleep(0.05)
        return psutil.Process(self.proc.pid)

    async def histogram(self, http: aiohttp.ClientSession,
                        metric: str = "inbound_frame_delay_seconds") -> list[tuple[float, float]]:
        """A histogram's cumulative buckets (le seconds, count): by default, inbound delay."""
        text = await self._metrics(http)
        buckets = []
        for match in re.finditer(metric + r'_bucket\{le="([^"]+)"\} (\S+)', text):
            buckets.append((float(match.group(1)), float(match.group(2))))
        return sorted(buckets)

    async def calls(self, http: aiohttp.ClientSession) -> int:
        """Calls this instance is serving (its ``media_calls`` gauge)."""
        match = re.search(r"^parley_media_calls(?:\{[^}]*\})? (\S+)$", await self._metrics(http),
                          re.MULTILINE)
        return int(float(match.group(1))) if match else 0

    async def _metrics(self, http: aiohttp.ClientSession) -> str:
        async with http.get(self.ops + "/metrics") as response:
            return await response.text()

    async def stop(self) -> int:
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            limit = 90 if "MEDIA_CALLS_PROFILE" in os.environ else 20  # profile is written last
            return await asyncio.to_thread(proc.wait, limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
            return -9


def _bucket_percentile(buckets: list[tuple[float, float]], q: float) -> float:
    """q-th percentile (ms) from cumulative buckets, linear within a bucket."""
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return math.nan
    rank = total * q / 100
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_le * 1000  # beyond the last finite bucket: report its edge
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1
            return 1000 * (lower_le + share * (le - lower_le))
        lower_le, lower_count = le, count
    return math.nan


# -- the simulated callers and the brain --------------------------------------------------------


async def _receive(call: Call) -> None:
    """Agent audio and marks from the gateway; marks echoed once their audio has played."""
    ws = call.ws
    assert ws is not None
    async for message in ws:
        if message.type != aiohttp.WSMsgType.TEXT:
            break
        event = tp.parse_server_message(message.data)
        now = time.perf_counter()
        if isinstance(event, tp.ServerMedia):
            payload = event.media.payload
            size = len(payload) * 3 // 4 - payload.count("=", -2)
            if call.awaiting is not None:
                call.awaiting, spoke = None, call.awaiting
                TURN_MS.append(1000 * (time.time() - spoke))
            call.out_bytes += size
            call.played_until = max(call.played_until, now) + size / 8000
            call.speak_at = call.played_until + call.pause
        elif isinstance(event, tp.ServerMark):
            call.marks.append((max(call.played_until, now), event.mark.name))
        elif isinstance(event, tp.Clear):
            call.played_until = now
            call.marks = [(now, name) for _, name in call.marks]
    call.closed_code = ws.close_code


TURN_MS: list[float] = []  # reset per level
_PAUSES = random.Random(11)


def next_pause() -> float:
    """A caller's pause before speaking again: people do not all pause alike.

    With one fixed pause every call's cycle is the same length, so calls whose turns once ended
    together (in a stall of a few ms) stay in step for good: turns then came in clumps (up to 7
    ending within 20 ms, every cycle, in e2e), a load no set of independent callers makes.
    """
    return PAUSE_S + _PAUSES.uniform(-PAUSE_JITTER_S, PAUSE_JITTER_S)


async def _open(http: aiohttp.ClientSession, nc: NATS, gateway: Gateway, count: int,
                gateway_path: list[tuple[int, int]]) -> list[Call]:
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)
    calls: list[Call] = []
    rng = random.Random(7)

    async def one(index: int) -> None:
        async with gate:
            stream = await _answer(http, gateway, index)
            call = Call(index=index, call_id=stream.call_id, url=stream.url,
                        parameters=stream.parameters, messages=stream.messages)
            calls.append(call)
            if index % SAMPLE_EVERY == 0:
                async def on_frame(_payload: bytes, seq: int, _ts: int, msg: Msg,
                                   call: Call = call) -> None:
                    began = call.sent_at.pop(carrier_sequence(seq), None)
                    if began is not None:
                        sent_ns = decode_frame(msg.data)[2]  # the gateway's publish, wall clock
                        gateway_path.append((sent_ns - began[1],
                                             time.perf_counter_ns() - began[0]))
                call.subscription = await subscribe_frames(nc, call.call_id, "in", on_frame)
                await nc.flush()
            headers = {tp.SIGNATURE_HEADER: tp.websocket_signature(TOKEN, call.url)}
            call.ws = await http.ws_connect(call.url, headers=headers, autoping=True)
            await call.ws.send_str(tp.encode(call.messages.connected()))
            await call.ws.send_str(tp.encode(call.messages.start(call.parameters)))
            call.receiver = asyncio.create_task(_receive(call), name=f"caller-{index}")

    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    calls.sort(key=lambda c: c.index)
    now = time.perf_counter()
    for call in calls:  # first utterances spread over 3 s
        call.speak_at = now + 0.5 + rng.random() * 3.0
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await _close(calls)
        raise RuntimeError(f"{len(failures)} of {count} calls failed to open: {failures[0]!r}")
    return calls


async def _close(calls: list[Call]) -> list[str]:
    problems = []
    for call in calls:
        if call.ws is not None and not call.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await call.ws.send_str(tp.encode(call.messages.stop()))
    receivers = [c.receiver for c in calls if c.receiver is not None]
    done, pending = await asyncio.wait(receivers, timeout=15) if receivers else (set(), set())
    for task in pending:
        task.cancel()
    for call in calls:
        if call.closed_code not in (1000, None) or (call.receiver in pending):
            problems.append(f"call {call.call_id}: closed {call.closed_code}")
        if call.ws is not None:
            with contextlib.suppress(Exception):
                await call.ws.close()
        if call.subscription is not None:
            with contextlib.suppress(Exception):
                await call.subscription.unsubscribe()
    del done
    return problems


class Brain:
    """Answers every user turn with ``ANSWER``; counts interruptions and provider switches."""

    def __init__(self, bus: Any, calls: dict[str, Call]) -> None:
        self.bus = bus
        self.calls = calls
        self.interrupted = self.switched = 0
        self.answering = True
        self.subs: list[Subscription] = []

    async def start(self) -> None:
        nc = self.bus.nc
        self.subs = [await nc.subscribe("parley.ev.*.call.*.turn.user_ended", cb=self._turn),
                     await nc.subscribe("parley.ev.*.call.*.agent.speech.interrupted",
                                        cb=self._count),
                     await nc.subscribe("parley.ev.*.call.*.media.provider_switched",
                                        cb=self._count)]

    async def stop(self) -> None:
        for sub in self.subs:
            await sub.unsubscribe()

    async def _count(self, msg: Msg) -> None:
        if msg.subject.endswith("interrupted"):
            self.interrupted += 1
        else:
            self.switched += 1

    async def _turn(self, msg: Msg) -> None:
        event = decode(msg.data)
        call = self.calls.get(event.call_id)
        if call is None or not self.answering:
            return
        call.awaiting = event.at.timestamp()
        call.answered += 1
        for seq, text in enumerate(ANSWER):
            await self.bus.publish(AgentSay(org_id=event.org_id, call_id=event.call_id,
                                            turn_id=event.turn_id, seq=seq, text=text,
                                            last=seq == len(ANSWER) - 1, causation_id=event.id))


async def _pace(calls: list[Call], *, seconds: float, speaking: bool, lags: list[float],
                sampled: bool) -> None:
    """One ``media`` frame per call per 20 ms for ``seconds``; callers speak if ``speaking``."""
    groups = [calls[slot::SLOTS] for slot in range(SLOTS)]
    slot_s = TICK_S / SLOTS
    origin = time.perf_counter()
    clock = time.perf_counter_ns
    for tick in range(round(seconds / TICK_S)):
        for slot, group in enumerate(groups):
            target = origin + tick * TICK_S + slot * slot_s
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.perf_counter()
            lags.append(1000 * (now - target))
            for call in group:
                ws = call.ws
                if ws is None or ws.closed:
                    continue
                if call.offset < 0 and speaking and now >= call.speak_at:
                    call.offset = 0
                if call.offset >= 0:
                    payload = NOISE_B64[call.offset]
                    call.offset += 1
                    if call.offset == UTTERANCE_FRAMES:
                        call.offset = -1
                        call.speak_at = now + REPLY_TIMEOUT_S  # unless an answer comes
                        call.pause = next_pause()
                else:
                    payload = SILENCE_B64
                # The text tp.encode(messages.media(audio, ...)) would be, sent as that TEXT frame
                text = call.messages.media_text(payload, call.chunk_ms)
                call.chunk_ms += 20
                call.sent += 1
                if sampled and call.subscription is not None:
                    call.sent_at[call.messages.sequence] = (clock(), time.time_ns())
                try:
                    await ws.send_frame(text, aiohttp.WSMsgType.TEXT)
                    while call.marks and call.marks[0][0] <= now:
                        _, name = call.marks.pop(0)
                        await ws.send_str(tp.encode(call.messages.mark(name)))
                except (ConnectionError, RuntimeError):
                    pass


def _sum_buckets(histograms: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """One histogram from several instances' (same buckets)."""
    if any(not h for h in histograms):
        return []
    return [(le, sum(h[i][1] for h in histograms)) for i, (le, _) in enumerate(histograms[0])]


async def _run_level(http: aiohttp.ClientSession, bus: Any, gateway: Gateway,
                     media_env: dict[str, str], root: Path, others: dict[str, psutil.Process],
                     count: int, *, instances: int, warmup_s: float, measure_s: float,
                     log: Any) -> Level:
    medias = [Media(media_env, root, f"media-{count}" + (f"-{i + 1}" if instances > 1 else ""),
                    profile=i == 0) for i in range(instances)]
    media_processes = {("media" if instances == 1 else f"media-{i + 1}"): await media.start()
                       for i, media in enumerate(medias)}
    processes = {**others, **media_processes}
    media_nice = max(process.nice() for process in media_processes.values())

    def media_rss() -> float:
        return sum(p.memory_info().rss for p in media_processes.values()) / 2**20

    async def histogram(metric: str = "inbound_frame_delay_seconds"
                        ) -> list[tuple[float, float]]:
        return _sum_buckets([await media.histogram(http, metric) for media in medias])

    def window(before: list[tuple[float, float]], after: list[tuple[float, float]]
               ) -> list[tuple[float, float]]:
        return [(le, count_after - count_before)
                for (le, count_before), (_, count_after) in zip(before, after, strict=True)]

    base_rss = media_rss()
    gateway_path: list[tuple[int, int]] = []
    TURN_MS.clear()
    opened = time.perf_counter()
    calls = await _open(http, bus.nc, gateway, count, gateway_path)
    by_id = {call.call_id: call for call in calls}
    brain = Brain(bus, by_id)
    await brain.start()
    log(f"  {count} calls: set up in {time.perf_counter() - opened:.1f}s; {warmup_s:g}s "
        f"warm-up, {measure_s:g}s measured")
    lags: list[float] = []
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        await _pace(calls, seconds=warmup_s, speaking=True, lags=[], sampled=False)
        before, lag_before = await histogram(), await histogram(LOOP_LAG)
        cpu_start, start = _sample(processes), time.perf_counter()
        gateway_path.clear()
        turns_before = len(TURN_MS)
        await _pace(calls, seconds=measure_s, speaking=True, lags=lags, sampled=True)
        cpu_end, end = _sample(processes), time.perf_counter()
        after, lag_after = await histogram(), await histogram(LOOP_LAG)
        rss = media_rss()
        calls_per_media = [await media.calls(http) for media in medias]
        window_turns = TURN_MS[turns_before:]
        # Grace: callers stay on the line (silence) until every answer has been sent.
        brain.answering = False
        await _pace(calls, seconds=4.0, speaking=False, lags=[], sampled=False)
        await asyncio.sleep(0.5)  # the last frames sent are still on their way
        final = await histogram()
    finally:
        gc.enable()
        gc.unfreeze()
        await brain.stop()
        problems = await _close(calls)
        codes = [await media.stop() for media in medias]
    if problems:
        log(f"  {len(problems)} calls did not end cleanly; first: {problems[0]}")
    for media, code in zip(medias, codes, strict=True):
        if code != 0:
            log(f"  {media.log_path.stem} exited with {code}:\n{_log_tail(media.log_path, 8)}")
    if not before or not final:
        raise RuntimeError(f"no inbound histogram on media's /metrics:\n"
                           f"{_log_tail(medias[0].log_path)}")
    return Level(
        media_nice=media_nice, calls=count, window_s=end - start,
        media_buckets=window(before, after),
        gateway_path_ns=[to_publish for to_publish, _ in gateway_path],
        gateway_roundtrip_ns=[roundtrip for _, roundtrip in gateway_path],
        sent_in=sum(call.sent for call in calls),
        handled_in=int(final[-1][1]),
        expected_out=FRAMES_PER_ANSWER * sum(call.answered for call in calls),
        received_out=sum(call.out_bytes for call in calls) // tp.FRAME_BYTES,
        turn_ms=window_turns,
        turns_unanswered=sum(1 for call in calls if call.awaiting is not None),
        interrupted=brain.interrupted, switched=brain.switched,
        cpu_s={name: cpu_end[name][0] - cpu_start[name][0] for name in cpu_start},
        wait_s={name: cpu_end[name][1] - cpu_start[name][1] for name in cpu_start},
        calls_per_media=calls_per_media, media_rss_mb=rss, media_base_rss_mb=base_rss,
        tick_lag_ms=lags, loop_lag_buckets=window(lag_before, lag_after))


# -- the benchmark ---------------------------------------------------------------------------


def _lines(level: Level, tag: str = "") -> tuple[list[Line], str, bool]:
    name = f"media_calls.{level.calls}{tag}"
    media_p50 = _bucket_percentile(level.media_buckets, 50)
    media_p99 = _bucket_percentile(level.media_buckets, 99)
    gw = latency_summary(level.gateway_path_ns) if level.gateway_path_ns else {
        "p50": math.nan, "p99": math.nan, "n": 0}
    roundtrip = latency_summary(level.gateway_roundtrip_ns) if level.gateway_roundtrip_ns else {
        "p50": math.nan, "p99": math.nan, "n": 0}
    inbound_p99 = gw["p99"] + media_p99
    loop_lag = {"p50": _bucket_percentile(level.loop_lag_buckets, 50),
                "p99": _bucket_percentile(level.loop_lag_buckets, 99),
                "buckets": level.loop_lag_buckets}
    lost_in = level.sent_in - level.handled_in
    lost_out = level.expected_out - level.received_out
    turn = ({"p50": percentile(level.turn_ms, 50), "p99": percentile(level.turn_ms, 99),
             "n": len(level.turn_ms), "max": max(level.turn_ms)} if level.turn_ms else
            {"p50": math.nan, "p99": math.nan, "n": 0, "max": math.nan})
    held = (lost_in == 0 and lost_out == 0 and inbound_p99 <= BUDGET_P99_MS
            and level.interrupted == 0)
    cpu = {who: level.cpu_percent(who) for who in level.cpu_s}
    wait = {who: 100 * level.wait_s[who] / level.window_s for who in level.wait_s}
    media_cpu = level.media_cpu_percent()
    rss_per_call_kb = 1024 * (level.media_rss_mb - level.media_base_rss_mb) / level.calls
    budget = (Budget("tail", "<=", BUDGET_P99_MS) if level.calls == BUDGET_CALLS and not tag
              else None)
    summary = {"media_leg_ms": {"p50": media_p50, "p99": media_p99,
                                "buckets": level.media_buckets},
               "gateway_path_ms": gw, "gateway_roundtrip_ms": roundtrip,
               "inbound_p99_bound_ms": inbound_p99,
               "lost_in": lost_in, "sent_in": level.sent_in, "lost_out": lost_out,
               "expected_out": level.expected_out, "turn_ms": turn,
               "turns_unanswered_at_end": level.turns_unanswered,
               "interrupted": level.interrupted, "provider_switches": level.switched,
               "cpu_pct_core": cpu, "run_queue_wait_pct": wait,
               "media_instances": len(level.calls_per_media), "media_nice": level.media_nice,
               "calls_per_media": level.calls_per_media, "window_s": level.window_s,
               "media_rss_mb": level.media_rss_mb, "media_base_rss_mb": level.media_base_rss_mb,
               "media_rss_kb_per_call": rss_per_call_kb,
               "tick_lag_ms": {"p50": percentile(level.tick_lag_ms, 50),
                               "p99": percentile(level.tick_lag_ms, 99)}, "held": held}
    lines = [
        Line(f"{name}.inbound", "ms", gw["p50"] + media_p50, inbound_p99, budget=budget,
             summary=summary,
             note="gateway path (send_str → the gateway's publish, the stamp the frame "
                  "carries) + media leg (that publish → session handler); sum of the two legs' "
                  "p50 / p99"),
        Line(f"{name}.gateway_roundtrip", "ms", roundtrip["p50"], roundtrip["p99"],
             summary=roundtrip,
             note="send_str → gateway → NATS → a core subscriber back in this (busy) process: "
                  "the gateway path as measured before the frame's stamp was used; it adds a "
                  "hop media's path does not take and this process's own loop lag"),
        Line(f"{name}.media_leg", "ms", media_p50, media_p99, summary=summary["media_leg_ms"],
             note="gateway published the frame → media's session handler (histogram buckets)"),
        Line(f"{name}.media_loop_lag", "ms", loop_lag["p50"], loop_lag["p99"], summary=loop_lag,
             note="how late media's event loop woke a 50 ms timer (its "
                  "event_loop_lag_seconds histogram over the window): the wait every frame "
                  "handled at that moment shared"),
        Line(f"{name}.lost", "frames", lost_in, lost_out, tail_label="out",
             summary=summary, note="inbound frames lost (sent − handled by media); second "
                                   "column: outbound (expected agent frames − received)"),
        Line(f"{name}.turn", "ms", turn["p50"], turn["p99"], summary=turn,
             note="turn.user_ended (media) → first agent frame at the caller, emulated brain "
                  "and TTS"),
        Line(f"{name}.media_cpu", "% core", media_cpu, cpu["gateway"], tail_label="gateway",
             summary={"cpu_pct_core": cpu, "run_queue_wait_pct": wait},
             note="media CPU (all instances); second column gateway CPU (% of a core)"),
        Line(f"{name}.media_rss_per_call", "KB", rss_per_call_kb, level.media_rss_mb,
             tail_label="RSS MB", summary=summary,
             note="(media RSS at the window's end − before the first call) ÷ calls; second "
                  "column media's RSS"),
    ]
    note = (f"{level.calls} calls{tag.replace('_', ' ')}: media at nice {level.media_nice}; "
            f"inbound p50 {gw['p50']:.2f}+{media_p50:.2f} ms, p99 "
            f"{gw['p99']:.2f}+{media_p99:.2f} = {inbound_p99:.1f} ms; media loop lag p99 "
            f"{loop_lag['p99']:.1f} ms; lost in {lost_in} of "
            f"{level.sent_in}, out {lost_out} of {level.expected_out}; turn p50 "
            f"{turn['p50']:.1f} ms p99 {turn['p99']:.1f} ms ({turn['n']} turns); CPU % core: "
            + ", ".join(f"{who} {value:.0f}" for who, value in cpu.items())
            + "; run-queue wait %: " + ", ".join(f"{who} {value:.0f}"
                                                 for who, value in wait.items())
            + f"; calls per media {level.calls_per_media}; media RSS "
            f"{level.media_rss_mb:.0f} MB ({rss_per_call_kb:.0f} KB/call); "
            f"interrupted {level.interrupted}, switches {level.switched}; "
            f"{'HELD' if held else 'NOT held'}")
    return lines, note, held


async def run(ctx: Any) -> BenchResult:
    """Levels of concurrent calls against one gateway and a fresh media process each."""
    levels = QUICK_LEVELS if ctx.quick else LEVELS
    if os.environ.get("MEDIA_CALLS_LEVELS"):  # e.g. "100" or "150,200" (investigations)
        levels = tuple(int(n) for n in os.environ["MEDIA_CALLS_LEVELS"].split(","))
    warmup_s, measure_s = (4.0, 6.0) if ctx.quick else (5.0, 20.0)
    instances = int(os.environ.get("MEDIA_CALLS_INSTANCES", "1"))
    result = BenchResult("media_calls", config={
        "levels": ", ".join(f"{n} calls" for n in levels),
        "media": f"{instances} process(es), PARLEY_NICE "
                 f"{os.environ.get('PARLEY_NICE', 'unset: -5, media’s default')}",
        "per level": f"fresh calls and media process; {warmup_s:g} s warm-up, {measure_s:g} s "
                     "measured, 4 s grace (silence) for the last answers",
        "caller": f"Twilio `media` 50/s; {UTTERANCE_FRAMES * 20} ms noise bursts, then silence "
                  f"until the answer has played + {PAUSE_S:g} ± {PAUSE_JITTER_S:g} s (uniform, "
                  "drawn every turn); marks echoed at play time",
        "brain": f"this process: agent.say {list(ANSWER)} on turn.user_ended",
        "providers": f"Deepgram and Cartesia emulators, one process each at nice "
                     f"{EMULATOR_NICE}; media chains deepgram→whisper, cartesia→piper "
                     "(fallbacks not preloaded)",
    })
    bus = await ctx.servers.clean_bus("bench-media-calls")
    database_url = await ctx.servers.fresh_database(fsync=True)
    await _configure(database_url)
    root = Path(tempfile.mkdtemp(prefix="parley-bench-media-calls-", dir="/tmp"))
    nats_url = ctx.servers.nats().url
    gateway = Gateway(nats_url=nats_url, database_url=database_url, root=root, liveness=True)
    period_s = 1.0 + 1.0 + FRAMES_PER_ANSWER * 0.02 + PAUSE_S
    media_nice_0 = BUDGET_CALLS in levels and not ctx.quick  # the budget level again, media at 0
    runs = sum(levels) + (BUDGET_CALLS if media_nice_0 else 0)
    utterances = runs * (math.ceil((warmup_s + measure_s + 4) / period_s) + 3)
    emulators: list[subprocess.Popen[bytes]] = []
    connector = aiohttp.TCPConnector(limit=0)
    try:
        deepgram, deepgram_url = await _emulator(
            "parley.devkit.emulators.deepgram",
            ["--api-key", DEEPGRAM_KEY, *(["--utterance", TRANSCRIPT] * utterances)], root)
        emulators.append(deepgram)
        cartesia, cartesia_url = await _emulator(
            "parley.devkit.emulators.cartesia", ["--api-key", CARTESIA_KEY], root)
        emulators.append(cartesia)
        media_env = dict(os.environ, PARLEY_NATS_URL=nats_url, PARLEY_DATABASE_URL=database_url,
                         PARLEY_LOG_LEVEL="INFO", PARLEY_PRELOAD_MODELS="false",
                         PARLEY_DEEPGRAM_API_KEY=DEEPGRAM_KEY, PARLEY_DEEPGRAM_URL=deepgram_url,
                         PARLEY_CARTESIA_API_KEY=CARTESIA_KEY, PARLEY_CARTESIA_URL=cartesia_url)
        async with aiohttp.ClientSession(connector=connector) as http:
            await gateway.start(http)
            assert gateway.process is not None
            others = {"gateway": gateway.process, "bench": psutil.Process(),
                      "deepgram-emu": psutil.Process(deepgram.pid),
                      "cartesia-emu": psutil.Process(cartesia.pid)}
            if ctx.servers.nats().pid is not None:
                others["nats-server"] = psutil.Process(ctx.servers.nats().pid)
            largest_held = 0
            for count in levels:
                level = await _run_level(http, bus, gateway, media_env, root, others, count,
                                         instances=instances, warmup_s=warmup_s,
                                         measure_s=measure_s, log=ctx.log)
                lines, note, held = _lines(level)
                result.lines += lines
                result.notes.append(note)
                ctx.log(f"  {note}")
                if held:
                    largest_held = count
            result.notes.append(f"largest level held (0 lost frames, inbound p99 ≤ "
                                f"{BUDGET_P99_MS:g} ms, no barge-in): {largest_held} calls")
            if media_nice_0 and level.media_nice != 0:
                # The same load with media at nice 0 (info): what its priority buys.
                level = await _run_level(http, bus, gateway, dict(media_env, PARLEY_NICE="0"),
                                         root, others, BUDGET_CALLS, instances=instances,
                                         warmup_s=warmup_s, measure_s=measure_s, log=ctx.log)
                lines, note, _ = _lines(level, "_media_nice_0")
                result.lines += lines
                result.notes.append(note)
                ctx.log(f"  {note}")
            await gateway.stop()
    finally:
        gateway.kill()
        for proc in emulators:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in emulators:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        await bus.close()
        shutil.rmtree(root, ignore_errors=True)
    return result
