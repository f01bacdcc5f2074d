"""``parley call --outbound``: the agent calls a number; the Twilio emulator plays the callee.

The gateway dials through Twilio's REST API at ``PARLEY_TWILIO_API_BASE_URL``; ``parley up``
points that at a loopback port, and this command serves the Twilio emulator there for the length
of the call. The emulator rings, answers as a person (async AMD says ``human``), fetches the
gateway's TwiML and streams the script's utterances, exactly as the e2e tests do. The call is
placed with ``POST /v1/calls`` using a ``calls:write`` key: ``--api-key``, ``$PARLEY_API_KEY``,
or one issued in the local database for the agent's org (a development convenience).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from parley.devkit.demo.transcript import LiveTranscript

EMULATOR_HOSTS = ("127.0.0.1", "localhost")


async def place_outbound(args: argparse.Namespace) -> int:
    """Serve the emulator, have the agent dial ``args.outbound``, follow the call to its end."""
    from parley.devkit import call_cli
    from parley.devkit.telephony.emulated_call import Callee
    from parley.devkit.telephony.twilio_emulator import EMULATOR, create_emulator_app

    api_url = call_cli.setting(args, None, call_cli.TWILIO_API_VAR)
    parts = urlsplit(api_url or "")
    if not api_url or parts.hostname not in EMULATOR_HOSTS or not parts.port:
        print(f"parley call: --outbound needs the gateway's {call_cli.TWILIO_API_VAR} on a "
              "loopback port (as `parley up` sets it) to serve the Twilio emulator there",
              file=sys.stderr)
        return 2
    if not args.account_sid:
        print(f"parley call: --outbound needs ${call_cli.ACCOUNT_SID_VAR} (`parley up` sets it)",
              file=sys.stderr)
        return 2
    database_url = call_cli.setting(args, None, "PARLEY_DATABASE_URL")
    api_key = call_cli.setting(args, args.api_key, call_cli.API_KEY_VAR)
    org_id, from_number, issued = await _agent_line(database_url, args.agent, args.from_number,
                                                    need_key=not api_key)
    api_key = api_key or issued
    log = call_cli.logger(args.quiet)
    script = call_cli.script_for(args, await call_cli.utterances(args))
    app = create_emulator_app(
        gateway_url=args.gateway_url, public_url=args.public_url, auth_token=args.auth_token,
        account_sid=args.account_sid, emulator_url=api_url.rstrip("/"),
        default_callee=Callee(answered_by="human", script=script))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    transcript = LiveTranscript(lambda text: log(0.0, f"[bus] {text}"))
    try:
        await web.TCPSite(runner, parts.hostname, parts.port).start()
        log(0.0, f"Twilio emulator on {api_url}; {args.agent} ({from_number}) calls "
                 f"{args.outbound}")
        call_id = await _post_call(args, api_key, from_number)
        log(0.0, f"call {call_id} placed")
        await call_cli.follow_call(args, transcript, call_id, log)
        emulator = app[EMULATOR]
        deadline = time.monotonic() + 15
        while not emulator.calls:
            if time.monotonic() > deadline:
                print("parley call: the gateway never asked the emulator to dial",
                      file=sys.stderr)
                return 1
            await asyncio.sleep(0.05)
        call = await emulator.wait_for_call(next(iter(emulator.calls)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(transcript.ended.wait(), 5)
    finally:
        await transcript.close()
        await runner.cleanup()
    print(f"\ncall {call.sid} to {args.outbound}: {call.status} after {call.duration or 0} s, "
          f"answered by {call.answered_by or '?'}; org {org_id}")
    for error in call.errors:
        print(f"  emulator: {error}")
    if transcript.turns:
        print("  latency per turn (platform = voice-to-voice − max(EOU, STT final) − LLM TTFT − "
              "TTS TTFB):")
        for line in transcript.summary():
            print(f"    {line}")
    recording = emulator.recordings.get(call.recording.sid) if call.recording else None
    if recording:
        await asyncio.to_thread(Path(args.wav).write_bytes, recording)
        print(f"  recording: {args.wav} (the carrier's recording of the call)")
    return 0


async def _agent_line(database_url: str | None, agent_id: str, from_number: str | None, *,
                      need_key: bool) -> tuple[str, str, str]:
    """The agent's org, the number it calls from, and a new API key if one is needed."""
    if not database_url:
        raise SystemExit("parley call: PARLEY_DATABASE_URL is not set; run `parley up`")
    import psycopg

    from parley.common import configuration as cfg

    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        agent = await cfg.get_agent(conn, agent_id)
        if agent is None:
            raise SystemExit(f"parley call: no agent {agent_id!r} (run `parley demo` once, or "
                             "`parley agents add`)")
        if from_number is None:
            numbers = [n.number for n in await cfg.list_numbers(conn, agent.org_id)
                       if n.agent_id == agent_id]
            if not numbers:
                raise SystemExit(f"parley call: agent {agent_id} has no number to call from")
            from_number = numbers[0]
        key = ""
        if need_key:
            _, key = await cfg.create_api_key(conn, agent.org_id, name="parley call",
                                              scopes=["calls:write", "calls:read"], actor="cli")
    return agent.org_id, from_number, key


async def _post_call(args: argparse.Namespace, api_key: str, from_number: str) -> str:
    body: dict[str, Any] = {"agent_id": args.agent, "to": args.outbound, "from": from_number}
    async with aiohttp.ClientSession() as http, http.post(
            args.gateway_url.rstrip("/") + "/v1/calls", json=body,
            headers={"X-API-Key": api_key}) as response:
        answer = await response.json(content_type=None)
        if response.status != 201:
            raise SystemExit(f"parley call: POST /v1/calls → {response.status}: {answer}")
        return str(answer["call_id"])
