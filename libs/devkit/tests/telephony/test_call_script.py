import argparse
import asyncio
import wave

from parley.devkit import call_cli
from parley.devkit.telephony.audio_codec import wav_bytes
from parley.devkit.telephony.call_script import (
    SILENCE_FRAME,
    CallScript,
    KeyPress,
    Speaker,
    Utterance,
)

from .conftest import AUTH_TOKEN, PUBLIC_URL, StandInGateway, tone

HELLO = Utterance(audio=b"\x10" * 320, label="hello", pause=0.1)  # two frames


def run(speaker: Speaker, start: float, stop: float) -> list[tuple[float, str]]:
    """(time, what) for every frame that starts or ends an utterance."""
    happened, frame = [], round(start / 0.02)
    while frame * 0.02 < stop:
        now = round(frame * 0.02, 2)
        step = speaker.frame(now)
        if step.started:
            happened.append((now, f"start {step.started.label}"))
        if step.ended:
            happened.append((now, f"end {step.ended.label}"))
        frame += 1
    return happened


def test_a_caller_waits_for_the_agents_greeting_then_a_pause() -> None:
    speaker = Speaker(CallScript(utterances=(HELLO,)))
    speaker.agent_started(0.0)
    assert run(speaker, 0.0, 0.5) == []
    speaker.agent_stopped(0.5)
    assert run(speaker, 0.5, 0.7) == [(0.6, "start hello"), (0.62, "end hello")]
    assert not speaker.finished(0.64)  # waiting for the answer
    speaker.agent_started(0.9)
    speaker.agent_stopped(1.2)
    assert speaker.finished(1.2)


def test_without_an_answer_the_caller_speaks_after_the_reply_timeout() -> None:
    speaker = Speaker(CallScript(utterances=(HELLO, HELLO), reply_timeout=1.0))
    assert run(speaker, 0.0, 2.2) == [(1.0, "start hello"), (1.02, "end hello"),
                                      (2.02, "start hello"), (2.04, "end hello")]
    assert speaker.frame(2.06).audio == SILENCE_FRAME


def test_speaking_over_the_agent_at_a_time_or_after_it_starts_answering() -> None:
    over = Utterance(audio=b"\x10" * 160, label="over", over_agent_after=0.3)
    fixed = Utterance(audio=b"\x10" * 160, label="fixed", at=2.0)
    speaker = Speaker(CallScript(utterances=(HELLO, over, fixed), reply_timeout=60))
    speaker.agent_started(0.0)
    speaker.agent_stopped(0.2)
    assert run(speaker, 0.0, 0.4) == [(0.3, "start hello"), (0.32, "end hello")]
    speaker.agent_started(0.5)  # answering; the caller cuts in 0.3 s later
    assert run(speaker, 0.4, 3.0) == [(0.8, "start over"), (0.8, "end over"),
                                      (2.0, "start fixed"), (2.0, "end fixed")]


def test_key_presses_come_due_in_time_order() -> None:
    speaker = Speaker(CallScript(key_presses=(KeyPress(digit="2", at=1.0),
                                              KeyPress(digit="1", at=0.5))))
    assert speaker.key_presses_due(0.4) == []
    assert [press.digit for press in speaker.key_presses_due(1.0)] == ["1", "2"]


async def test_parley_call_prints_a_live_log_and_latency(
        gateway: tuple[StandInGateway, str], tmp_path, capsys) -> None:
    stand_in, url = gateway
    (tmp_path / "q.wav").write_bytes(wav_bytes([tone(300, 0.2, rate=16000)], rate=16000))
    parser = argparse.ArgumentParser()
    call_cli.register(parser.add_subparsers())
    args = parser.parse_args([
        "call", url, "--public-url", PUBLIC_URL, "--auth-token", AUTH_TOKEN,
        "--say", str(tmp_path / "q.wav"), "--dtmf", "12@0.1", "--pause", "0.1",
        "--wav", str(tmp_path / "out.wav")])
    assert await asyncio.to_thread(args.handler, args) == 0
    out = capsys.readouterr().out
    assert "caller says q.wav" in out and "mark 'greeting' echoed" in out
    assert "turn 1 q.wav:" in out and " ms" in out and "script_ended" in out
    assert [m["dtmf"]["digit"] for _, m in stand_in.messages if m["event"] == "dtmf"] == \
        ["1", "2"]
    with wave.open(str(tmp_path / "out.wav")) as wav:
        assert wav.getnchannels() == 2
