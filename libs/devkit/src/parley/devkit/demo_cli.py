"""``parley demo``: one real call across every service on the embedded default, then a clean stop.

1. Starts embedded NATS + Postgres (``.parley/``) and every service as its own supervised
   process; their logs go to ``.parley/demo/services.log`` (warnings are shown).
2. Creates or refreshes Bright Smile Dental's receptionist (:mod:`parley.devkit.demo.clinic`):
   a knowledge file, the ``book_appointment`` tool served by an endpoint inside this process,
   and a number.
3. Places an inbound call with the caller simulator: three utterances spoken by Piper, heard by
   Whisper, answered by the local responder, spoken back by Piper — no API keys (set
   ``ANTHROPIC_API_KEY`` / ``DEEPGRAM_API_KEY`` / ``CARTESIA_API_KEY`` and the services use
   those providers instead; the environment is passed through).
4. Shows the live transcript with each turn's latency, writes the stereo WAV, prints the call's
   event timeline from Postgres, and stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TextIO

from parley.devkit.demo import clinic
from parley.devkit.demo.booking import BookingEndpoint
from parley.devkit.demo.transcript import LiveTranscript, stopwatch
from parley.devkit.demo.voice import speak
from parley.devkit.events_cli import timeline
from parley.devkit.infra import free_port
from parley.devkit.infra_cli import add_dir_argument, report
from parley.devkit.local_infra import DATABASE_URL_VAR, NATS_URL_VAR, ensure_infra
from parley.devkit.supervisor import Supervisor
from parley.devkit.up_cli import SERVICES, prepare_platform, service_commands

CALLER_SAYS = (
    "Hi, how much is a teeth cleaning?",
    "Can I book an appointment for Friday at 10 am?",
    "Thanks, goodbye.",
)
AUTH_TOKEN = "demo-twilio-auth-token-0123456789"  # the gateway checks the simulator's signatures
# A service has started when it logs one of these (the media service after loading its models).
READY_MESSAGES = {"gateway": "gateway listening", "media": "media ready", "brain": "brain ready",
                  "tools": "tools up", "recorder": "recorder up"}
HIDDEN_IN_TIMELINE = {"agent.speech.progress"}  # a mark every half second of agent audio
PROVIDER_KEYS = ("ANTHROPIC_API_KEY", "DEEPGRAM_API_KEY", "CARTESIA_API_KEY")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo`` to the ``parley`` parser."""
    demo = subparsers.add_parser("demo", help="run the platform, place one real call, stop",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dir_argument(demo)
    demo.add_argument("--say", action="append", metavar="TEXT",
                      help="what the caller says instead of the default script (repeatable)")
    demo.add_argument("--wav", type=Path, help="where to write the stereo recording "
                      "(default: <dir>/demo/call.wav)")
    demo.add_argument("--verbose", action="store_true", help="show every service log line")
    demo.add_argument("--ready-timeout", type=float, default=120.0,
                      help="how long the services may take to start (s)")
    demo.set_defaults(handler=run_demo)


class ServiceOutput:
    """Where the supervisor writes: every line to a log file; warnings and up to the terminal.

    Also notices each service's "ready" log line, so the demo calls once all are up.
    """

    def __init__(self, log_path: Path, *, verbose: bool, terminal: TextIO) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = log_path.open("w", encoding="utf-8")
        self._verbose = verbose
        self._terminal = terminal
        self.ready: dict[str, asyncio.Event] = {name: asyncio.Event() for name in READY_MESSAGES}

    def write(self, text: str) -> int:
        """Take one prefixed line (``name | text``) from the supervisor."""
        self._file.write(text)
        name, _, line = text.partition("|")
        name, line = name.strip(), line.strip()
        record = _json_object(line)
        message = str(record.get("msg", line)) if record else line
        wanted = READY_MESSAGES.get(name)
        if wanted is not None and message.startswith(wanted):
            self.ready[name].set()
        level = str(record.get("level", "")) if record else ""
        if self._verbose or level in ("WARNING", "ERROR", "CRITICAL"):
            shown = f"{level.lower()}: {message}" if record else line
            self._terminal.write(f"  [{name}] {shown}\n")
        return len(text)

    def flush(self) -> None:
        """Flush the log file."""
        self._file.flush()

    def isatty(self) -> bool:
        """Never: no colours in the log file."""
        return False

    def close(self) -> None:
        """Close the log file."""
        self._file.close()


def _json_object(line: str) -> dict[str, object] | None:
    if not line.startswith("{"):
        return None
    with contextlib.suppress(ValueError):
        value = json.loads(line)
        return value if isinstance(value, dict) else None
    return None


def service_env(urls: Mapping[str, str], *, gateway_port: int) -> dict[str, str]:
    """What every service gets on top of this process' environment (vendor keys included)."""
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    return {
        **urls,
        "PARLEY_LOG_LEVEL": "INFO",
        "PARLEY_HTTP_PORT": str(gateway_port),
        "PARLEY_PUBLIC_BASE_URL": gateway_url,
        "PARLEY_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        # Free ports, so the demo runs beside a `parley up` on the default ones.
        "PARLEY_TOOLS_HTTP_PORT": str(free_port()),
        "PARLEY_BRAIN_HTTP_PORT": str(free_port()),
    }


def providers_in_use(environ: Mapping[str, str]) -> str:
    """Which vendor keys are set (the services pick those providers over the local ones)."""
    keyed = [name.removesuffix("_API_KEY").title() for name in PROVIDER_KEYS
             if environ.get(name) or environ.get(f"PARLEY_{name}")]
    if not keyed:
        return "offline providers: Whisper (STT), local responder (LLM), Piper (TTS)"
    return f"vendor providers from the environment: {', '.join(keyed)} (local ones as fallback)"


async def wait_ready(output: ServiceOutput, supervising: asyncio.Task[int], gateway_port: int,
                     limit_s: float) -> None:
    """Until every service has logged that it is ready and the gateway accepts connections."""
    from parley.devkit.infra import port_open

    deadline = time.monotonic() + limit_s
    for name, event in output.ready.items():
        while not event.is_set():
            if supervising.done():
                raise RuntimeError("the supervisor stopped before the services were ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not get ready within {limit_s:g} s "
                                   "(see the services log)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), 0.2)
    while not port_open(gateway_port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway is not listening on {gateway_port}")
        await asyncio.sleep(0.05)


async def place_call(gateway_url: str, utterances: Iterable[tuple[str, bytes]], wav: Path,
                     nats_url: str) -> tuple[object, LiveTranscript]:
    """The simulated inbound call with the live transcript; its result and the transcript."""
    from parley.devkit.telephony.call_script import CallScript, Utterance
    from parley.devkit.telephony.caller_simulator import CallerSimulator

    log = stopwatch()
    transcript = LiveTranscript(log)
    script = CallScript(
        utterances=tuple(Utterance(audio=audio, label=text) for text, audio in utterances),
        reply_timeout=20.0, hang_up_when_done=False, hangup_after=120.0)

    def simulator_log(_at: float, text: str) -> None:
        if text.startswith("caller says "):
            log(f"caller (speaking): {text.removeprefix('caller says ').split(' (')[0]}")

    simulator = CallerSimulator(
        gateway_url=gateway_url, auth_token=AUTH_TOKEN, from_number=clinic.CALLER_NUMBER,
        to_number=clinic.AGENT_NUMBER, script=script, wav_path=wav, log=simulator_log)

    async def on_stream(parameters: dict[str, str]) -> None:
        log(f"call {parameters.get('call_id')} connected: {clinic.CALLER_NUMBER} → "
            f"{clinic.AGENT_NUMBER} ({clinic.ORG_NAME})")
        await transcript.follow(nats_url, parameters["call_id"])

    simulator.on_stream = on_stream
    try:
        result = await simulator.run()
        with contextlib.suppress(TimeoutError):  # call.ended is on the bus right after
            await asyncio.wait_for(transcript.ended.wait(), 5)
    finally:
        await transcript.close()
    return result, transcript


async def show_stored_call(database_url: str, call_sid: str, root: Path) -> int:
    """Print the call's timeline and calls row from Postgres once the recorder has it."""
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    from parley.common.store import EventStore

    deadline = time.monotonic() + 30
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        while True:
            cursor = await conn.execute(
                "SELECT c.call_id, c.state, c.duration_s, c.turns, c.end_reason FROM calls c "
                "JOIN carrier_calls k ON k.call_id = c.call_id WHERE k.carrier_call_id = %s",
                (call_sid,))
            row = await cursor.fetchone()
            if row and row[1] in ("ended", "failed"):
                break
            if time.monotonic() > deadline:
                report("demo: the recorder did not store the end of the call within 30 s")
                return 1
            await asyncio.sleep(0.2)
    call_id = row[0]
    async with AsyncConnectionPool(database_url, min_size=1, max_size=1, open=False) as pool:
        stored = await EventStore(pool).read_aggregate("call", call_id)
    shown = [(s.position, s.event) for s in stored if s.event.type not in HIDDEN_IN_TIMELINE]
    print(f"\nEvent timeline of {call_id} from Postgres ({len(stored)} events, "
          f"{len(stored) - len(shown)} playback marks left out; all of them: "
          f"`parley events show {call_id} --dir {Path(root)}`):")
    print("\n".join(timeline(shown)))
    print(f"\ncalls projection: state={row[1]} duration={row[2]}s turns={row[3]} "
          f"end_reason={row[4]}")
    return 0


async def run_call(args: argparse.Namespace, urls: Mapping[str, str], output: ServiceOutput,
                   supervisor: Supervisor, booking: BookingEndpoint, gateway_port: int) -> int:
    """Everything between the services starting and stopping."""
    started = time.monotonic()
    supervising = asyncio.create_task(supervisor.run())
    try:
        texts = tuple(args.say or CALLER_SAYS)
        # Piper in this process while the services start (cached after the first run).
        audio = await speak(texts, args.dir / "demo" / "voices")
        await wait_ready(output, supervising, gateway_port, args.ready_timeout)
        report(f"demo: all services ready after {time.monotonic() - started:.1f} s; "
               f"{providers_in_use(os.environ)}")
        wav = (args.wav or args.dir / "demo" / "call.wav").absolute()
        print("\nLive transcript (from the bus; ⏱ = latency of the turn, see "
              "`pydoc parley.devkit.demo.transcript`):", flush=True)
        result, transcript = await place_call(f"http://127.0.0.1:{gateway_port}",
                                              zip(texts, audio, strict=True), wav,
                                              urls[NATS_URL_VAR])
        print(f"\nCall {result.call_sid} ended after {result.duration:.1f} s "
              f"({transcript.end_reason or result.stop_reason}).")
        print("Latency per turn (ms; platform = voice-to-voice − max(EOU, STT final) − LLM TTFT "
              "− TTS TTFB):")
        for line in transcript.summary() or ["(no answered turn)"]:
            print(f"  {line}")
        for booked in booking.bookings:
            print(f"Booked through the demo endpoint: {json.dumps(booked)}")
        print(f"Stereo recording (caller left, agent right): {result.wav_path}")
        return await show_stored_call(urls[DATABASE_URL_VAR], result.call_sid, args.dir)
    finally:
        supervisor.stop()
        await supervising


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; always stop the services, the endpoint and the servers it started."""
    args.dir = Path(args.dir)
    session = ensure_infra(args.dir, environ=os.environ, report=report, detach=False)
    gateway_port = free_port()
    output = ServiceOutput(args.dir / "demo" / "services.log", verbose=args.verbose,
                           terminal=sys.stderr)
    report(f"demo: service logs in {args.dir.absolute() / 'demo' / 'services.log'}")

    async def main() -> int:
        booking = BookingEndpoint(free_port())
        await booking.start()

        async def prepare(env: Mapping[str, str]) -> None:
            await prepare_platform(env)
            await clinic.set_up_clinic(env[DATABASE_URL_VAR], booking_url=booking.url)
            report(f"demo: {clinic.ORG_NAME} ready — agent {clinic.AGENT_ID} on "
                   f"{clinic.AGENT_NUMBER}, knowledge {clinic.KNOWLEDGE_FILE}, tool "
                   f"book_appointment → {booking.url}")

        supervisor = Supervisor(service_commands(SERVICES),
                                env=service_env(session.urls, gateway_port=gateway_port),
                                prepare=prepare, output=output, color=False)  # type: ignore[arg-type]
        try:
            return await run_call(args, session.urls, output, supervisor, booking, gateway_port)
        finally:
            await booking.stop()

    try:
        return asyncio.run(main())
    finally:
        output.close()
        session.stop_started(report)
