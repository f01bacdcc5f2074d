"""gateway_frames: Twilio Media Streams ``media`` message → core subscriber of the audio subject.

Budget (ARCHITECTURE.md §8 / issue 3): inbound frame path p99 ≤ 5 ms at 250 concurrent streams
on the 2-core benchmark machine.

The gateway runs as its own process (``python -m parley.gateway``, as deployed) against the
benchmark's nats-server and a fresh migrated database with one org, agent and number. For each
simulated stream this process plays Twilio: a signed ``POST /twilio/voice`` webhook, the TwiML's
``<Stream url>`` and ``<Parameter>``s, a signed WebSocket upgrade, ``connected`` and ``start``,
then one 20 ms ``media`` message (160 bytes of µ-law, base64 in JSON, exactly as Twilio sends
it, built with ``StreamMessages``) per stream every 20 ms. The same process subscribes (core
NATS, ``subscribe_frames`` — what the media service runs) to each call's ``parley.audio.<call>.in``
and matches every frame to its send time by (stream, Twilio sequenceNumber: the low bits of the
frame's seq, :func:`~parley.common.bus.audio.carrier_sequence`), so both ends read one
``perf_counter_ns`` clock. Latency is
``send_str`` called → frame handler entered: client framing and masking, loopback TCP, the
gateway's WebSocket read, JSON decode, base64 decode, ``nc.publish`` with headers, nats-server
routing (the AUDIO stream also stores the subject), the subscriber's read, parse and task hop.

One pacing task per level ticks every 20 ms. A tick is split into ``SLOTS`` equal slots, each
sending one frame on its share of the sockets, so every stream still gets exactly one frame per
20 ms but the streams' phases are spread over the tick, as independent calls are (a Twilio
stream's 20 ms clock starts when its call does). The budgeted lines use that. A last, info-only
level sends on all 250 sockets at the same instant every 20 ms (``aligned``), the worst case of
phase-locked arrivals: the gateway's one event loop then drains a 250-frame burst serially, and
this process cannot read frames back while it writes its own 250-frame burst (~2 ms), so that
line bounds rather than measures what a real gateway sees. Each level opens fresh calls, warms
up, measures a fixed window, waits for stragglers, then ends every stream with ``stop`` and
checks the gateway closed it (1000). The gateway gets SIGTERM at the end and must exit 0.

This process runs no garbage collection during a level (collect + freeze before, re-enabled
after): with 250 streams its own gen-2 passes took up to 50 ms and would have been charged to
the gateway. The gateway runs with its defaults.

Reported per level: p50/p99 latency, frames lost (sent in the window − received), and CPU: the
gateway process's user+sys seconds over the window / window seconds / calls, as % of one core
(plus the whole-process figure), and this process's and nats-server's own CPU, so a reader can
tell whether the load generator or the broker, sharing the same two cores, was the bottleneck.
The notes add each process's run-queue wait (``/proc/<pid>/task/*/schedstat``: time runnable
but not on a CPU), the pacing task's lateness and the gateway's RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import psycopg
from _stats import BenchResult, Budget, Line, latency_summary, percentile
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from parley.common.bus import subscribe_frames
from parley.common.bus.audio import carrier_sequence
from parley.common.configuration import AgentSettings, assign_number, create_agent, create_org
from parley.devkit.telephony import twilio_protocol as tp
from parley.devkit.telephony.twiml_reader import first_stream, parse_twiml

BUDGET_P99_MS = 5.0
BUDGET_STREAMS = 250
LEVELS = (50, 100, 250)
QUICK_LEVELS = (20,)
SLOTS = 10  # a 20 ms tick is sent in 10 slots of 2 ms (phases spread over the tick)
TICK_S = tp.FRAME_SECONDS
TOKEN = "bench-twilio-auth-token-0123456789"
ACCOUNT = "AC" + "0" * 32
ORG, AGENT, NUMBER, CALLER = "org_bench", "ag_bench", "+14155550100", "+14155559999"
SETUP_CONCURRENCY = 16  # webhooks + upgrades in flight while a level's calls are set up


@dataclass
class Stream:
    """One simulated Twilio Media Stream and what its subscriber saw."""

    index: int
    call_sid: str
    call_id: str
    url: str
    parameters: dict[str, str]
    messages: tp.StreamMessages
    audio: bytes
    ws: aiohttp.ClientWebSocketResponse | None = None
    subscription: Subscription | None = None
    sent: dict[int, int] = field(default_factory=dict)  # sequenceNumber → perf_counter_ns
    received: int = 0
    chunk_ms: int = 0
    alive: bool = True


@dataclass
class Level:
    """What one level measured."""

    streams: int
    aligned: bool
    latencies_ns: list[int]
    sent: int
    lost: int
    window_s: float
    cpu_s: dict[str, float]
    wait_s: dict[str, float]  # time runnable but waiting for a CPU (run queue), all threads
    tick_lag_ms: list[float]
    slot_send_ms: list[float]
    send_errors: int
    gateway_rss_mb: float

    def cpu_percent(self, who: str) -> float:
        """``who``'s CPU over the window as % of one core."""
        return 100 * self.cpu_s[who] / self.window_s

    def wait_ms_per_s(self, who: str) -> float:
        """How long ``who``'s threads were runnable but not running, ms per second."""
        return 1000 * self.wait_s[who] / self.window_s


def _run_queue_wait_s(pid: int) -> float:
    """Seconds the process's threads spent waiting on a run queue (/proc schedstat), or NaN."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[1])
    except OSError:
        return math.nan
    return total / 1e9


def _sample(processes: dict[str, psutil.Process]) -> dict[str, tuple[float, float]]:
    """(user+sys CPU seconds, run-queue wait seconds) of each process so far."""
    samples = {}
    for name, process in processes.items():
        times = process.cpu_times()
        samples[name] = (times.user + times.system, _run_queue_wait_s(process.pid))
    return samples


# -- the gateway process ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _spawn_gateway(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "parley.gateway"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _log_tail(log_path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no gateway log)"


class Gateway:
    """``python -m parley.gateway`` on a free port; :meth:`stop` checks it exits cleanly."""

    def __init__(self, *, nats_url: str, database_url: str, root: Path,
                 liveness: bool = False) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "gateway.log"
        self.env = dict(os.environ, PARLEY_NATS_URL=nats_url, PARLEY_DATABASE_URL=database_url,
                        PARLEY_HTTP_PORT=str(self.port), PARLEY_PUBLIC_BASE_URL=self.base,
                        PARLEY_TWILIO_AUTH_TOKEN=TOKEN, PARLEY_LOG_LEVEL="WARNING",
                        PARLEY_INSTANCE_ID="gw-bench")
        if not liveness:
            # This bench's callers send nothing while hundreds of calls are set up, and read
            # (so answer pings) only at the end, which no carrier does: the dead-socket checks
            # would close them mid-run. Callers that stream and read all along (media_calls,
            # e2e) keep them on, as deployed.
            self.env.update(PARLEY_GATEWAY_CARRIER_PING_S="0",
                            PARLEY_GATEWAY_CARRIER_SILENCE_S="0")
        self.proc: subprocess.Popen[bytes] | None = None
        self.process: psutil.Process | None = None

    async def start(self, http: aiohttp.ClientSession, timeout_s: float = 30.0) -> None:
        """Spawn and wait until HTTP answers."""
        self.proc = _spawn_gateway(self.env, self.log_path)
        self.process = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode} at start:\n"
                                   f"{_log_tail(self.log_path)}")
            try:
                async with http.get(self.base + "/no-such-page") as response:
                    if response.status == 404:
                        return
            except aiohttp.ClientConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not serving after {timeout_s:.0f}s:\n"
                                   f"{_log_tail(self.log_path)}")
            await asyncio.sleep(0.05)

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc is not None and self.proc.poll() is None

    async def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, wait; kill and raise if it does not exit in time."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
            raise RuntimeError(f"gateway did not exit within {timeout_s:.0f}s of SIGTERM; "
                               "killed") from None
        finally:
            self.proc = None
        return code

    def kill(self) -> None:
        """Last resort on the error path."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


async def _configure(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await create_org(conn, ORG, "Bench")
        # record=False: no REST client anyway; max duration well beyond the run
        await create_agent(conn, ORG, "Bench agent", AgentSettings(record=False,
                                                                   max_duration_s=3600),
                           agent_id=AGENT)
        await assign_number(conn, ORG, NUMBER, AGENT)


# -- simulated Twilio streams -------------------------------------------------------------


async def _answer(http: aiohttp.ClientSession, gateway: Gateway, index: int) -> Stream:
    """POST a signed voice webhook; the stream to open from the TwiML it returns."""
    call_sid = tp.new_sid("CA")
    form = {"CallSid": call_sid, "AccountSid": ACCOUNT, "From": CALLER, "To": NUMBER,
            "CallStatus": "ringing", "Direction": "inbound"}
    path = "/twilio/voice"
    signature = tp.compute_signature(TOKEN, gateway.base + path, form)
    async with http.post(gateway.base + path, data=form,
                         headers={tp.SIGNATURE_HEADER: signature}) as response:
        body = await response.text()
        if response.status != 200:
            raise RuntimeError(f"/twilio/voice answered {response.status}: {body[:300]}")
    stream = first_stream(parse_twiml(body))
    call_id = stream.parameters.get("call_id", "")
    if not call_id:
        raise RuntimeError(f"TwiML without a call_id parameter: {body[:300]}")
    return Stream(index=index, call_sid=call_sid, call_id=call_id, url=stream.url,
                  parameters=stream.parameters, audio=os.urandom(tp.FRAME_BYTES),
                  messages=tp.StreamMessages(stream_sid=tp.new_sid("MZ"), account_sid=ACCOUNT,
                                             call_sid=call_sid))


async def _subscribe(nc: NATS, stream: Stream, latencies: list[int],
                     errors: list[str]) -> None:
    sent = stream.sent

    async def on_frame(payload: bytes, seq: int, _timestamp_ms: int, _msg: Msg) -> None:
        received = time.perf_counter_ns()
        stream.received += 1
        began = sent.pop(carrier_sequence(seq), None)  # seq: the stream's base + Twilio's
        if began is not None:
            latencies.append(received - began)
        if len(payload) != tp.FRAME_BYTES and len(errors) < 10:
            errors.append(f"call {stream.call_id} seq {seq}: {len(payload)} bytes")

    stream.subscription = await subscribe_frames(nc, stream.call_id, "in", on_frame)


async def _connect(http: aiohttp.ClientSession, stream: Stream) -> None:
    """Signed upgrade, then ``connected`` and ``start`` with the TwiML's parameters."""
    headers = {tp.SIGNATURE_HEADER: tp.websocket_signature(TOKEN, stream.url)}
    ws = await http.ws_connect(stream.url, headers=headers, autoping=True)
    stream.ws = ws
    await ws.send_str(tp.encode(stream.messages.connected()))
    await ws.send_str(tp.encode(stream.messages.start(stream.parameters)))


async def _open_streams(http: aiohttp.ClientSession, nc: NATS, gateway: Gateway, count: int,
                        latencies: list[int], errors: list[str]) -> list[Stream]:
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)
    streams: list[Stream] = []

    async def one(index: int) -> None:
        async with gate:
            stream = await _answer(http, gateway, index)
            streams.append(stream)  # before anything can fail half-way: closed at the end
            await _subscribe(nc, stream, latencies, errors)
            await nc.flush()  # the server knows the interest before the first frame
            await _connect(http, stream)

    results = await asyncio.gather(*(one(index) for index in range(count)),
                                   return_exceptions=True)
    streams.sort(key=lambda s: s.index)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await _close_streams(streams)
        raise RuntimeError(f"{len(failures)} of {count} streams failed to open; first: "
                           f"{failures[0]!r}")
    return streams


async def _close_streams(streams: list[Stream]) -> list[str]:
    """``stop`` on every socket, expect the gateway's 1000 close; returns the problems."""
    gate = asyncio.Semaphore(50)
    problems: list[str] = []

    async def one(stream: Stream) -> None:
        async with gate:
            ws = stream.ws
            try:
                if ws is not None and not ws.closed:
                    with contextlib.suppress(ConnectionError):
                        await ws.send_str(tp.encode(stream.messages.stop()))
                    while True:  # skip anything the gateway sent before closing
                        message = await ws.receive(timeout=10)
                        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                            aiohttp.WSMsgType.CLOSING,
                                            aiohttp.WSMsgType.ERROR):
                            break
                    if ws.close_code != 1000:
                        problems.append(f"call {stream.call_id}: closed with {ws.close_code} "
                                        f"{message.extra!r}")
                elif ws is not None:
                    problems.append(f"call {stream.call_id}: socket already closed "
                                    f"({ws.close_code})")
                    await ws.close()
            except Exception as exc:
                problems.append(f"call {stream.call_id}: {exc!r}")
                if ws is not None:
                    with contextlib.suppress(Exception):
                        await ws.close()
            finally:
                if stream.subscription is not None:
                    with contextlib.suppress(Exception):
                        await stream.subscription.unsubscribe()

    await asyncio.gather(*(one(stream) for stream in streams))
    return problems


async def _pace(streams: list[Stream], *, slots: int, warmup_s: float, measure_s: float,
                on_window: Any) -> tuple[int, int, list[float], list[float]]:
    """Send one frame per stream per 20 ms; returns (sent in window, send errors, tick lags,
    slot send durations), calling ``on_window("start"|"end")`` at the window's edges."""
    groups = [streams[slot::slots] for slot in range(slots)]
    warm_ticks = round(warmup_s / TICK_S)
    total_ticks = warm_ticks + round(measure_s / TICK_S)
    slot_s = TICK_S / slots
    lags: list[float] = []
    durations: list[float] = []
    sent = errors = 0
    origin = time.perf_counter()
    clock = time.perf_counter_ns
    for tick in range(total_ticks):
        measuring = tick >= warm_ticks
        if tick == warm_ticks:
            on_window("start")
        for slot, group in enumerate(groups):
            target = origin + tick * TICK_S + slot * slot_s
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            began = time.perf_counter()
            if measuring:
                lags.append(1000 * (began - target))
            for stream in group:
                ws = stream.ws
                if not stream.alive or ws is None:
                    continue
                message = stream.messages.media(stream.audio, stream.chunk_ms)
                text = tp.encode(message)
                stream.chunk_ms += 20
                try:
                    if measuring:
                        stream.sent[int(message.sequence_number)] = clock()
                        sent += 1
                    await ws.send_str(text)
                except (ConnectionError, RuntimeError):
                    stream.alive = False
                    errors += 1
            if measuring:
                durations.append(1000 * (time.perf_counter() - began))
    # the window ends once the last slot's frames are written
    on_window("end")
    return sent, errors, lags, durations


async def _run_level(http: aiohttp.ClientSession, nc: NATS, gateway: Gateway,
                     processes: dict[str, psutil.Process], count: int, *, aligned: bool,
                     warmup_s: float, measure_s: float, log: Any) -> Level:
    latencies: list[int] = []
    errors: list[str] = []
    opened = time.perf_counter()
    streams = await _open_streams(http, nc, gateway, count, latencies, errors)
    log(f"  {count} streams{' (aligned)' if aligned else ''}: set up in "
        f"{time.perf_counter() - opened:.1f}s; {warmup_s:g}s warm-up, {measure_s:g}s measured")
    marks: dict[str, tuple[float, dict[str, tuple[float, float]]]] = {}

    def on_window(edge: str) -> None:
        marks[edge] = (time.perf_counter(), _sample(processes))

    # The load generator's own collector pauses would delay receive stamps (one gen-2 pass
    # over the set-up objects took up to 50 ms): collect and freeze now, no GC in the window.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        sent, send_errors, lags, durations = await _pace(
            streams, slots=1 if aligned else SLOTS, warmup_s=warmup_s, measure_s=measure_s,
            on_window=on_window)
        rss_mb = (gateway.process.memory_info().rss / 2**20) if gateway.process else 0.0
        for _ in range(60):  # up to 3 s for stragglers
            if not any(stream.sent for stream in streams):
                break
            await asyncio.sleep(0.05)
        lost = sum(len(stream.sent) for stream in streams)
        silent = [stream.call_id for stream in streams if stream.received == 0]
    finally:
        gc.enable()
        gc.unfreeze()
        problems = await _close_streams(streams)
    if silent:
        raise RuntimeError(f"{len(silent)} of {count} streams never delivered a frame "
                           f"(first: {silent[0]}):\n{_log_tail(gateway.log_path)}")
    if errors:
        raise RuntimeError(f"frames of the wrong size: {errors}")
    if problems:
        raise RuntimeError(f"{len(problems)} streams did not end cleanly; first: {problems[0]}")
    if not gateway.alive():
        raise RuntimeError(f"the gateway died:\n{_log_tail(gateway.log_path)}")
    (start, cpu_start), (end, cpu_end) = marks["start"], marks["end"]
    return Level(streams=count, aligned=aligned, latencies_ns=latencies, sent=sent, lost=lost,
                 window_s=end - start,
                 cpu_s={name: cpu_end[name][0] - cpu_start[name][0] for name in cpu_start},
                 wait_s={name: cpu_end[name][1] - cpu_start[name][1] for name in cpu_start},
                 tick_lag_ms=lags, slot_send_ms=durations, send_errors=send_errors,
                 gateway_rss_mb=rss_mb)


# -- the benchmark ------------------------------------------------------------------------


def _lines(level: Level) -> tuple[list[Line], str]:
    name = f"gateway_frames.{level.streams}" + ("_aligned" if level.aligned else "")
    if not level.latencies_ns:
        raise RuntimeError(f"{name}: no frame arrived in the measured window")
    summary = latency_summary(level.latencies_ns)
    gateway_pct = level.cpu_percent("gateway")
    per_call = gateway_pct / level.streams
    bench_pct, nats_pct = level.cpu_percent("bench"), level.cpu_percent("nats-server")
    lags = level.tick_lag_ms
    waits = {name: level.wait_ms_per_s(name) for name in level.wait_s}
    cpu = {"window_s": level.window_s, "calls": level.streams,
           "gateway_cpu_s": level.cpu_s["gateway"], "gateway_pct_core": gateway_pct,
           "gateway_pct_core_per_call": per_call, "bench_pct_core": bench_pct,
           "nats_server_pct_core": nats_pct, "gateway_rss_mb": level.gateway_rss_mb,
           "run_queue_wait_ms_per_s": waits,
           "tick_lag_ms": {"p50": percentile(lags, 50), "p99": percentile(lags, 99),
                           "max": max(lags, default=0.0)},
           "slot_send_ms": {"p50": percentile(level.slot_send_ms, 50),
                            "p99": percentile(level.slot_send_ms, 99),
                            "max": max(level.slot_send_ms, default=0.0)}}
    budget = (Budget("tail", "<=", BUDGET_P99_MS)
              if level.streams == BUDGET_STREAMS and not level.aligned else None)
    phases = ("all streams' frames sent at the same instant every 20 ms (phase-locked worst "
              "case, includes this process's own 250-send burst; info)" if level.aligned else
              f"phases spread over the 20 ms tick ({SLOTS} slots)")
    lines = [
        Line(name, "ms", summary["p50"], summary["p99"], budget=budget, summary=summary,
             note=f"{level.streams} streams × 50 frames/s, {phases}; `send_str` → "
                  "`subscribe_frames` handler"),
        Line(f"{name}.lost", "frames", level.lost, level.sent, tail_label="sent",
             summary={"lost": level.lost, "sent": level.sent,
                      "send_errors": level.send_errors},
             note="frames sent in the window that never reached the subscriber (3 s grace); "
                  "the second column is frames sent"),
        Line(f"{name}.cpu_per_call", "% core", per_call, gateway_pct, tail_label="gw total",
             summary=cpu,
             note="gateway process user+sys CPU over the window ÷ window ÷ calls, % of one "
                  "core; the second column is the whole gateway process"),
        Line(f"{name}.load_cpu", "% core", bench_pct, nats_pct, tail_label="nats-server",
             summary=cpu,
             note="CPU of this process (the simulated Twilio streams + the subscriber) and, "
                  "second column, of nats-server over the window, % of one core"),
    ]
    note = (f"{level.streams} streams{' aligned' if level.aligned else ''}: "
            f"{summary['n']:,} frames, p50 {summary['p50']:.2f} ms, p99 {summary['p99']:.2f} ms, "
            f"max {summary['max']:.1f} ms; lost {level.lost}; gateway {gateway_pct:.0f}% of a "
            f"core ({per_call:.2f}%/call), bench {bench_pct:.0f}%, nats-server {nats_pct:.0f}%; "
            "waiting for a CPU: " + ", ".join(f"{name} {value:.0f} ms/s"
                                              for name, value in waits.items()) +
            f"; pacing lag p99 {cpu['tick_lag_ms']['p99']:.1f} ms (max "
            f"{cpu['tick_lag_ms']['max']:.1f}); gateway RSS {level.gateway_rss_mb:.0f} MB")
    return lines, note


async def run(ctx: Any) -> BenchResult:
    """Each level on fresh calls against one gateway process; then stop it."""
    levels: list[tuple[int, bool]] = ([(n, False) for n in QUICK_LEVELS] if ctx.quick else
                                      [*((n, False) for n in LEVELS), (BUDGET_STREAMS, True)])
    warmup_s, measure_s = (1.0, 5.0) if ctx.quick else (2.0, 10.0)
    result = BenchResult("gateway_frames", config={
        "levels": ", ".join(f"{n} streams{' (aligned)' if a else ''}" for n, a in levels),
        "per level": f"fresh calls (signed /twilio/voice, TwiML, signed upgrade, connected, "
                     f"start), {warmup_s:g} s warm-up, {measure_s:g} s measured, then stop",
        "frames": "Twilio `media` JSON, 160 bytes µ-law base64, 50/s per stream, one pacing "
                  f"task ({SLOTS} slots per 20 ms tick; 1 slot when aligned)",
        "gateway": "`python -m parley.gateway` (own process, asyncio, LOG_LEVEL=WARNING) → "
                   "nats-server on 127.0.0.1 (AUDIO stream captures the subjects, file storage)",
        "subscriber": "`subscribe_frames` per call on one connection in this process; same "
                      "perf_counter_ns clock as the sender",
    })
    bus = await ctx.servers.clean_bus("bench-gateway-frames")  # empty AUDIO stream
    database_url = await ctx.servers.fresh_database(fsync=True)
    await _configure(database_url)
    root = Path(tempfile.mkdtemp(prefix="parley-bench-gateway-", dir="/tmp"))
    gateway = Gateway(nats_url=ctx.servers.nats().url, database_url=database_url, root=root)
    nats_pid = ctx.servers.nats().pid
    connector = aiohttp.TCPConnector(limit=0)  # 250 sockets at once, no pool cap
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            await gateway.start(http)
            assert gateway.process is not None
            ctx.log(f"  gateway pid {gateway.process.pid} on {gateway.base}")
            processes = {"gateway": gateway.process, "bench": psutil.Process()}
            if nats_pid is not None:
                processes["nats-server"] = psutil.Process(nats_pid)
            for count, aligned in levels:
                level = await _run_level(http, bus.nc, gateway, processes, count,
                                         aligned=aligned,
                                         warmup_s=warmup_s, measure_s=measure_s, log=ctx.log)
                lines, note = _lines(level)
                result.lines += lines
                result.notes.append(note)
                ctx.log(f"  {note}")
            code = await gateway.stop()
            if code != 0:
                raise RuntimeError(f"gateway exited with {code} after SIGTERM:\n"
                                   f"{_log_tail(gateway.log_path)}")
            ctx.log("  gateway stopped cleanly (exit 0)")
    finally:
        gateway.kill()
        await bus.close()
        shutil.rmtree(root, ignore_errors=True)
    return result
