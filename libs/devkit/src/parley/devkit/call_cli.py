r"""``parley call``: place a simulated inbound Twilio call against a running gateway.

Example::

    parley call http://127.0.0.1:8080 --from +15550100 --to +15550199 \
        --say hello.wav --say question.wav --say interrupt.wav@agent+1.2 \
        --dtmf 12@8.5 --hangup-after 60 --wav call.wav

``--say FILE`` waits for the agent to answer and go quiet; ``FILE@12.5`` starts 12.5 s into the
call and ``FILE@agent+1.2`` 1.2 s after the agent starts answering — both speak over the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

from parley.devkit.local_infra import read_env_file
from parley.devkit.telephony.call_script import CallScript, KeyPress, Utterance
from parley.devkit.telephony.caller_simulator import CallerSimulator, CallResult
from parley.devkit.telephony.media_stream_client import StreamError
from parley.devkit.telephony.twiml_reader import TwimlError
from parley.devkit.telephony.webhook_client import WebhookError

GATEWAY_URL_VAR = "PARLEY_GATEWAY_URL"
AUTH_TOKEN_VAR = "PARLEY_TWILIO_AUTH_TOKEN"
PUBLIC_URL_VAR = "PARLEY_PUBLIC_BASE_URL"
DIGIT_SPACING = 0.25  # seconds between the digits of one --dtmf


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``call`` to the ``parley`` parser."""
    call = subparsers.add_parser(
        "call", help="simulate an inbound Twilio call against a gateway",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    call.add_argument("gateway_url", nargs="?",
                      default=os.environ.get(GATEWAY_URL_VAR, "http://127.0.0.1:8080"),
                      help=f"where the gateway listens (default ${GATEWAY_URL_VAR} or "
                           "http://127.0.0.1:8080)")
    call.add_argument("--from", dest="from_number", default="+15550100", help="caller number")
    call.add_argument("--to", dest="to_number", default="+15550199", help="number called")
    call.add_argument("--auth-token", default=os.environ.get(AUTH_TOKEN_VAR),
                      help=f"Twilio auth token the gateway checks (default ${AUTH_TOKEN_VAR})")
    call.add_argument("--account-sid", help="AccountSid to send (default: a random AC…)")
    call.add_argument("--public-url", default=os.environ.get(PUBLIC_URL_VAR),
                      help="public base URL the gateway signs and puts in TwiML, if different "
                           f"(default ${PUBLIC_URL_VAR})")
    call.add_argument("--say", action="append", default=[], type=_utterance,
                      metavar="WAV[@SECONDS|@agent+SECONDS]", help="an utterance (repeatable)")
    call.add_argument("--dtmf", action="append", default=[], type=_key_presses,
                      metavar="DIGITS@SECONDS", help="press keys at a time (repeatable)")
    call.add_argument("--pause", type=float, default=0.5,
                      help="quiet after the agent's answer before the next utterance (s)")
    call.add_argument("--reply-timeout", type=float, default=10.0,
                      help="speak anyway if the agent has not answered after this long (s)")
    call.add_argument("--hangup-after", type=float, help="hang up this long into the call (s)")
    call.add_argument("--stay", action="store_true",
                      help="do not hang up when the script ends (use --hangup-after or ^C)")
    call.add_argument("--wav", default="parley-call.wav",
                      help="stereo recording to write: caller left, agent right")
    call.set_defaults(handler=run_call)


def _utterance(value: str) -> Utterance:
    path, at_sign, spec = value.rpartition("@")
    options: dict[str, float] = {}
    if at_sign and not os.path.exists(value):  # an '@' may also be part of a file name
        key = "over_agent_after" if spec.startswith("agent+") else "at"
        try:
            options[key] = float(spec.removeprefix("agent+"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r}: expected WAV, WAV@SECONDS or "
                                             "WAV@agent+SECONDS") from None
    else:
        path = value
    try:
        return Utterance.from_wav(path, **options)
    except (OSError, EOFError, wave.Error, ValueError) as error:
        raise argparse.ArgumentTypeError(f"{path}: {error}") from error


def _key_presses(value: str) -> list[KeyPress]:
    digits, _, at = value.partition("@")
    try:
        start = float(at)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected DIGITS@SECONDS") from None
    if not digits or any(digit not in "0123456789*#" for digit in digits):
        raise argparse.ArgumentTypeError(f"{value!r}: digits are 0-9, * and #")
    return [KeyPress(digit=digit, at=start + index * DIGIT_SPACING)
            for index, digit in enumerate(digits)]


def run_call(args: argparse.Namespace) -> int:
    """Place the call, print a live log and a per-turn latency summary."""
    if not args.auth_token:
        print(f"parley call: --auth-token or ${AUTH_TOKEN_VAR} is required", file=sys.stderr)
        return 2
    script = CallScript(
        utterances=tuple(
            Utterance(audio=u.audio, label=u.label, at=u.at,
                      over_agent_after=u.over_agent_after, pause=args.pause)
            for u in args.say),
        key_presses=tuple(press for presses in args.dtmf for press in presses),
        hangup_after=args.hangup_after, hang_up_when_done=not args.stay,
        reply_timeout=args.reply_timeout)
    started = time.monotonic()

    def log(at: float, text: str) -> None:
        print(f"{time.monotonic() - started:8.2f}s  {text}", flush=True)

    simulator = CallerSimulator(
        gateway_url=args.gateway_url, auth_token=args.auth_token,
        from_number=args.from_number, to_number=args.to_number, script=script,
        public_url=args.public_url, account_sid=args.account_sid, wav_path=args.wav, log=log)
    follower = TranscriptFollower(log)
    simulator.on_stream = follower.follow

    async def place() -> CallResult:
        try:
            return await simulator.run()
        finally:
            await follower.close()

    try:
        result = asyncio.run(place())
    except (WebhookError, TwimlError, StreamError) as error:
        print(f"parley call: {error}", file=sys.stderr)
        return 1
    print_summary(result)
    return 0


def print_summary(result: CallResult) -> None:
    """Turns with their latency, marks, the stop reason and the WAV."""
    print(f"\ncall {result.call_sid} ended after {result.duration:.1f} s: {result.stop_reason}")
    for turn in result.turns:
        latency = f"{turn.latency_ms:.0f} ms" if turn.latency_ms is not None else "no answer"
        print(f"  turn {turn.index} {turn.label}: {latency}")
    print(f"  marks echoed: {len(result.marks_echoed)}")
    for error in result.protocol_errors:
        print(f"  protocol error: {error}")
    if result.wav_path:
        print(f"  recording: {result.wav_path} (caller left, agent right)")


class TranscriptFollower:
    """Prints the call's transcript and agent clauses live from the bus, when NATS is known.

    The NATS URL comes from ``PARLEY_NATS_URL`` or ``.parley/env`` (what ``parley up`` uses);
    without one the call runs as before, audio only.
    """

    SHOWN = ("transcript.final", "turn.user_ended", "agent.say", "turn.completed",
             "agent.speech.interrupted", "call.dtmf", "call.ended")

    def __init__(self, log: Callable[[float, str], None]) -> None:
        self._log = log
        self._bus: Any = None

    async def follow(self, parameters: dict[str, str]) -> None:
        """Subscribe to the call's events (best effort: the call goes on without it)."""
        url = os.environ.get("PARLEY_NATS_URL") or read_env_file(Path(".parley")).get(
            "PARLEY_NATS_URL")
        call_id = parameters.get("call_id")
        if not url or not call_id:
            return
        from parley.common.bus import Bus

        try:
            self._bus = await asyncio.wait_for(
                Bus.connect(url, name="parley-call", max_reconnect_attempts=0), 2)
            await self._bus.subscribe_call(call_id, self._show)
        except Exception as exc:  # noqa: BLE001 - no transcript, but the call still runs
            self._log(0.0, f"(no live transcript: {exc})")

    async def _show(self, event: Any) -> None:
        if event.type not in self.SHOWN:
            return
        match event.type:
            case "transcript.final":
                text = f"[bus] caller: {event.text}"
            case "turn.user_ended":
                text = f"-- end of caller turn ({event.reason}, EOU {event.eou_delay_ms:.0f} ms)"
            case "agent.say":
                text = f"[bus] agent:  {event.text}"
            case "turn.completed":
                text = f"-- agent turn done (LLM first token {event.ttft_ms:.0f} ms)"
            case "agent.speech.interrupted":
                text = f"-- agent interrupted; caller heard: {event.played_text!r}"
            case "call.dtmf":
                text = f"[bus] caller pressed {event.digit}"
            case _:
                text = f"[bus] call ended: {event.reason}"
        self._log(0.0, text)

    async def close(self) -> None:
        """Drain the bus connection."""
        if self._bus is not None:
            await self._bus.close()
