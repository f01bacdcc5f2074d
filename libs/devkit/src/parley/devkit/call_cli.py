r"""``parley call``: talk to an agent by script, on a call through a running gateway.

Inbound (the default): plays Twilio placing a call to the agent's number::

    parley call --to +14155550100 --say "How much is a teeth cleaning?" \
        --say question.wav --say "Actually, wait@agent+1.2" --dtmf 12@8.5 --wav call.wav

Outbound: has the agent call a number; the Twilio emulator (served by this command where the
gateway's ``PARLEY_TWILIO_API_BASE_URL`` points, as ``parley up`` sets it) answers as a person
who speaks the script::

    parley call --outbound +14155550177 --agent receptionist --say "Hello, who is this?"

``--say`` takes text (spoken by Piper) or a WAV file. By default an utterance waits for the
agent to answer and go quiet; ``…@12.5`` starts it 12.5 s into the call and ``…@agent+1.2``
1.2 s after the agent starts answering — both speak over the agent. The gateway URL, the Twilio
credentials and the NATS URL (for the live transcript with per-turn latency) come from the
options, else the environment, else ``.parley/env`` as ``parley up`` writes it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parley.devkit.demo.transcript import LiveTranscript
from parley.devkit.demo.voice import speak
from parley.devkit.infra_cli import add_dir_argument
from parley.devkit.local_infra import read_env_file
from parley.devkit.telephony.audio_codec import read_wav_as_ulaw
from parley.devkit.telephony.call_script import CallScript, KeyPress, Utterance
from parley.devkit.telephony.caller_simulator import CallerSimulator, CallResult
from parley.devkit.telephony.media_stream_client import StreamError
from parley.devkit.telephony.twiml_reader import TwimlError
from parley.devkit.telephony.webhook_client import WebhookError

GATEWAY_URL_VAR = "PARLEY_GATEWAY_URL"
AUTH_TOKEN_VAR = "PARLEY_TWILIO_AUTH_TOKEN"
ACCOUNT_SID_VAR = "PARLEY_TWILIO_ACCOUNT_SID"
TWILIO_API_VAR = "PARLEY_TWILIO_API_BASE_URL"
PUBLIC_URL_VAR = "PARLEY_PUBLIC_BASE_URL"
API_KEY_VAR = "PARLEY_API_KEY"
DIGIT_SPACING = 0.25  # seconds between the digits of one --dtmf
_TIMING = re.compile(r"^(?P<what>.*)@(?P<agent>agent\+)?(?P<seconds>\d+(?:\.\d+)?)$", re.DOTALL)


@dataclass(frozen=True)
class Say:
    """One ``--say``: text to speak or a WAV file, and when."""

    what: str
    is_text: bool
    at: float | None = None
    over_agent_after: float | None = None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``call`` to the ``parley`` parser."""
    call = subparsers.add_parser(
        "call", help="talk to an agent by script (inbound, or --outbound through the emulator)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dir_argument(call)
    call.add_argument("gateway_url", nargs="?",
                      help=f"where the gateway listens (default ${GATEWAY_URL_VAR}, .parley/env "
                           "or http://127.0.0.1:8080)")
    call.add_argument("--from", dest="from_number",
                      help="caller number (outbound: the agent's number; default its first)")
    call.add_argument("--to", dest="to_number", default="+14155550100",
                      help="number called (inbound; default the demo agent's)")
    call.add_argument("--outbound", metavar="NUMBER",
                      help="have the agent call NUMBER; the emulated callee speaks the script")
    call.add_argument("--agent", default="receptionist",
                      help="the agent placing an --outbound call (default receptionist)")
    call.add_argument("--api-key", help=f"calls:write key for --outbound (default ${API_KEY_VAR};"
                      " else one is issued for the agent's org in the local database)")
    call.add_argument("--auth-token", help=f"Twilio auth token the gateway checks (default "
                      f"${AUTH_TOKEN_VAR} or .parley/env)")
    call.add_argument("--account-sid", help="AccountSid to send (default "
                      f"${ACCOUNT_SID_VAR}, .parley/env or a random AC…)")
    call.add_argument("--public-url", default=os.environ.get(PUBLIC_URL_VAR),
                      help="public base URL the gateway signs and puts in TwiML, if different "
                           f"(default ${PUBLIC_URL_VAR})")
    call.add_argument("--say", action="append", default=[], type=_say,
                      metavar="TEXT|WAV[@SECONDS|@agent+SECONDS]",
                      help="an utterance: text spoken by Piper or a WAV file (repeatable)")
    call.add_argument("--dtmf", action="append", default=[], type=_key_presses,
                      metavar="DIGITS@SECONDS", help="press keys at a time (repeatable)")
    call.add_argument("--pause", type=float, default=0.5,
                      help="quiet after the agent's answer before the next utterance (s)")
    call.add_argument("--reply-timeout", type=float, default=15.0,
                      help="speak anyway if the agent has not answered after this long (s)")
    call.add_argument("--hangup-after", type=float, help="hang up this long into the call (s)")
    call.add_argument("--stay", action="store_true",
                      help="do not hang up when the script ends (the agent may; or --hangup-after"
                           " or ^C)")
    call.add_argument("--wav", default="parley-call.wav",
                      help="stereo recording to write: caller left, agent right")
    call.add_argument("--quiet", action="store_true",
                      help="leave out marks and agent audio start/stop from the live log")
    call.set_defaults(handler=run_call)


def _say(value: str) -> Say:
    match = _TIMING.match(value)
    what = value
    timing: dict[str, float] = {}
    if match and not os.path.exists(value):  # an '@' may also be part of a file name
        what = match["what"]
        key = "over_agent_after" if match["agent"] else "at"
        timing[key] = float(match["seconds"])
    if what.lower().endswith(".wav") or os.path.isfile(what):
        if not os.path.isfile(what):
            raise argparse.ArgumentTypeError(f"{what}: no such WAV file")
        return Say(what, is_text=False, **timing)
    if not what.strip():
        raise argparse.ArgumentTypeError("--say needs text or a WAV file")
    return Say(what, is_text=True, **timing)


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


def setting(args: argparse.Namespace, option: str | None, variable: str,
            default: str | None = None) -> str | None:
    """An option, else the environment variable, else ``.parley/env``, else ``default``."""
    return (option or os.environ.get(variable) or read_env_file(Path(args.dir)).get(variable)
            or default)


async def utterances(args: argparse.Namespace) -> tuple[Utterance, ...]:
    """The ``--say`` list as audio: text through Piper (cached under ``<dir>/voices``)."""
    texts = [say.what for say in args.say if say.is_text]
    spoken = iter(await speak(texts, Path(args.dir) / "voices") if texts else [])
    result = []
    for say in args.say:
        try:
            audio = next(spoken) if say.is_text else read_wav_as_ulaw(say.what)
        except (OSError, EOFError, wave.Error, ValueError) as error:
            raise SystemExit(f"parley call: {say.what}: {error}") from error
        label = say.what if say.is_text else Path(say.what).name
        result.append(Utterance(audio=audio, label=label, at=say.at,
                                over_agent_after=say.over_agent_after, pause=args.pause))
    return tuple(result)


def run_call(args: argparse.Namespace) -> int:
    """Place the call, print a live transcript and a per-turn latency summary."""
    args.gateway_url = setting(args, args.gateway_url, GATEWAY_URL_VAR, "http://127.0.0.1:8080")
    args.auth_token = setting(args, args.auth_token, AUTH_TOKEN_VAR)
    args.account_sid = setting(args, args.account_sid, ACCOUNT_SID_VAR)
    if not args.auth_token:
        print(f"parley call: --auth-token, ${AUTH_TOKEN_VAR} or `parley up` is required",
              file=sys.stderr)
        return 2
    if args.outbound:
        from parley.devkit.demo.outbound import place_outbound

        return asyncio.run(place_outbound(args))
    try:
        return asyncio.run(_inbound(args))
    except (WebhookError, TwimlError, StreamError) as error:
        print(f"parley call: {error}", file=sys.stderr)
        return 1


def script_for(args: argparse.Namespace, said: tuple[Utterance, ...]) -> CallScript:
    """The call script from the options."""
    return CallScript(
        utterances=said, key_presses=tuple(p for presses in args.dtmf for p in presses),
        hangup_after=args.hangup_after, hang_up_when_done=not args.stay,
        reply_timeout=args.reply_timeout)


def logger(quiet: bool) -> Any:  # noqa: ANN401 - (at, text) -> None
    """The simulator's log: timestamped lines; without marks and agent audio when quiet."""
    started = time.monotonic()
    noisy = ("mark ", "agent audio started", "agent audio stopped", "stream ")

    def log(_at: float, text: str) -> None:
        if not quiet or not text.startswith(noisy):
            print(f"{time.monotonic() - started:8.2f}s  {text}", flush=True)

    return log


async def _inbound(args: argparse.Namespace) -> int:
    log = logger(args.quiet)
    simulator = CallerSimulator(
        gateway_url=args.gateway_url, auth_token=args.auth_token,
        from_number=args.from_number or "+14155550123", to_number=args.to_number,
        script=script_for(args, await utterances(args)), public_url=args.public_url,
        account_sid=args.account_sid, wav_path=args.wav, log=log)
    transcript = LiveTranscript(lambda text: log(0.0, f"[bus] {text}"))

    async def follow(parameters: dict[str, str]) -> None:
        await follow_call(args, transcript, parameters.get("call_id", ""), log)

    simulator.on_stream = follow
    try:
        result = await simulator.run()
        if transcript.following:
            try:
                await asyncio.wait_for(transcript.ended.wait(), 3)
            except TimeoutError:
                pass  # hung up by us: call.ended follows, but the summary need not wait
    finally:
        await transcript.close()
    print_summary(result, transcript)
    return 0


async def follow_call(args: argparse.Namespace, transcript: LiveTranscript, call_id: str,
                      log: Any) -> None:  # noqa: ANN401
    """Follow the call on the bus when NATS is known (best effort: the call goes on without)."""
    url = setting(args, None, "PARLEY_NATS_URL")
    if not url or not call_id:
        return
    try:
        await transcript.follow(url, call_id)
    except Exception as exc:  # noqa: BLE001 - no transcript, but the call still runs
        log(0.0, f"(no live transcript: {exc})")


def print_summary(result: CallResult, transcript: LiveTranscript) -> None:
    """Turns with their latency, marks, the stop reason and the WAV."""
    print(f"\ncall {result.call_sid} ended after {result.duration:.1f} s: {result.stop_reason}")
    for turn in result.turns:
        latency = f"{turn.latency_ms:.0f} ms" if turn.latency_ms is not None else "no answer"
        print(f"  turn {turn.index} {turn.label}: {latency} (end of utterance → agent audio)")
    if transcript.turns:
        print("  latency per turn (platform = voice-to-voice − max(EOU, STT final) − LLM TTFT − "
              "TTS TTFB):")
        for line in transcript.summary():
            print(f"    {line}")
    print(f"  marks echoed: {len(result.marks_echoed)}")
    for error in result.protocol_errors:
        print(f"  protocol error: {error}")
    if result.wav_path:
        print(f"  recording: {result.wav_path} (caller left, agent right)")
