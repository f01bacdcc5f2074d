"""`parley demo` as a newcomer runs it, and the pieces `parley call` shares with it.

The demo test runs the real command in a fresh interpreter with a fresh ``--dir``: embedded NATS
and Postgres, every service as its own process, Piper speaking for the caller, Whisper, the local
responder. Afterwards no process it started may be left.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from parley.devkit.call_cli import _say
from parley.devkit.demo.transcript import TurnLatency
from parley.devkit.local_infra import DATABASE_URL_VAR, NATS_URL_VAR


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Outside pytest's temp tree: another session re-tightens it to 0700, locking postgres out.
    base = Path(tempfile.mkdtemp(prefix="parley-demo-test-"))
    yield base / ".parley"
    shutil.rmtree(base, ignore_errors=True)


def processes_marked(marker: str, path: Path) -> list[str]:
    """Processes whose environment carries ``marker`` or whose command line names ``path``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = b""
            try:
                environ = (proc / "environ").read_bytes()
            except PermissionError:
                pass
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if marker.encode() in environ or str(path) in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.timeout(150)
def test_the_demo_places_a_real_call_and_leaves_nothing_running(state_dir: Path) -> None:
    marker = f"PARLEY_DEMO_TEST_{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items()
           if k not in (NATS_URL_VAR, DATABASE_URL_VAR, "ANTHROPIC_API_KEY", "DEEPGRAM_API_KEY",
                        "CARTESIA_API_KEY")}
    done = subprocess.run([sys.executable, "-m", "parley.devkit.cli", "demo", "--dir",
                           str(state_dir)], env={**env, marker: "1"}, capture_output=True,
                          text=True, timeout=140)
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    caller = re.findall(r"caller: (.+)", out)
    assert len(caller) == 3, out
    assert "cleaning" in caller[0].lower() and "friday" in caller[1].lower(), caller
    assert "goodbye" in caller[2].lower(), caller
    assert re.search(r"agent: +A teeth cleaning costs \$95\.", out), out
    assert "tool book_appointment(day='Friday'" in out, out
    assert "call ended: agent_hangup" in out, out
    latency = re.findall(r"⏱ t\d: EOU \d+ ms · STT final \d+ ms · LLM TTFT \d+ ms · "
                         r"TTS TTFB \d+ ms · voice-to-voice \d+ ms · platform \d+ ms", out)
    assert len(latency) == 3, out
    wav = re.search(r"Stereo recording \(caller left, agent right\): (\S+)", out)
    assert wav and Path(wav[1]).stat().st_size > 100_000, out
    assert "turn.user_ended" in out and "call.ended" in out  # the timeline from Postgres
    assert "calls projection: state=ended" in out and "end_reason=agent_hangup" in out, out
    assert processes_marked(marker, state_dir) == []


def test_say_takes_text_or_a_wav_with_an_optional_start(tmp_path: Path) -> None:
    wav = tmp_path / "hello@2.wav"
    wav.write_bytes(b"")
    text = _say("How much is a cleaning?")
    assert (text.what, text.is_text, text.at) == ("How much is a cleaning?", True, None)
    assert _say("Wait, stop@agent+1.5").over_agent_after == 1.5
    assert _say("mail me at bob@example.com").what == "mail me at bob@example.com"
    assert _say(f"{wav}").is_text is False  # an '@' in an existing file's name is kept
    timed = _say(f"{wav}@3")
    assert (timed.what, timed.is_text, timed.at) == (str(wav), False, 3.0)
    with pytest.raises(argparse.ArgumentTypeError):
        _say(str(tmp_path / "missing.wav"))


def test_platform_overhead_counts_overlapping_recognition_once() -> None:
    turn = TurnLatency("t1", eou_delay_ms=800, stt_final_ms=600, ttft_ms=300, tts_ttfb_ms=150,
                       voice_to_voice_ms=1300)
    assert turn.platform_ms == 50  # 1300 - (max(800, 600) + 300 + 150)
    assert TurnLatency("t2", eou_delay_ms=900, stt_final_ms=0, ttft_ms=300, tts_ttfb_ms=200,
                       voice_to_voice_ms=1200).platform_ms == 0  # floored
    assert TurnLatency("t3", eou_delay_ms=900).platform_ms is None
    assert "platform ?" in TurnLatency("t3").describe()


async def test_the_live_transcript_shows_a_turn_of_keys() -> None:
    from parley.common.events import AgentSay, CallDtmf, TurnUserEnded
    from parley.devkit.demo.transcript import LiveTranscript

    lines: list[str] = []
    transcript = LiveTranscript(lines.append)
    await transcript.on_event(CallDtmf(org_id="o", call_id="c", digit="4"))
    await transcript.on_event(TurnUserEnded(org_id="o", call_id="c", turn_id="k1", text="42#",
                                            reason="dtmf"))
    await transcript.on_event(TurnUserEnded(org_id="o", call_id="c", turn_id="t1", text="Hi."))
    await transcript.on_event(AgentSay(org_id="o", call_id="c", turn_id="k1", seq=0,
                                       text="One moment.", filler_after_ms=1500))
    assert lines == ["caller pressed 4", "caller typed: 42#",
                     "-- ready if the tools are slow: 'One moment.'"]
    assert transcript.turns["k1"].caller_text == "42#"
