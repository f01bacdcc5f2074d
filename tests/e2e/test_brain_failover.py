"""A brain process killed mid-turn: another instance completes the turn, no clause twice."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from parley.common.events import CallRequested, CallStreamStarted, TurnUserEnded
from parley.devkit.emulators.anthropic import AnthropicEmulator, ScriptedReply

from .conftest import ORG, Platform, stored_call

pytestmark = pytest.mark.timeout(120)

REPLY = " ".join(f"This is sentence number {n} of a long and careful answer." for n in
                 ("one", "two", "three", "four", "five", "six"))


async def wait_ready(platform: Platform, name: str, proc) -> None:
    log = platform.logs / f"{name}.log"
    deadline = time.monotonic() + 30
    while "brain ready" not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        await asyncio.sleep(0.05)


async def test_a_killed_brain_is_replaced_and_no_clause_is_said_twice(
        platform: Platform, bus) -> None:
    emulator = AnthropicEmulator(api_key="sk-e2e", tokens_per_second=25)
    url = await emulator.start()
    emulator.script(ScriptedReply(text=REPLY), ScriptedReply(text=REPLY))
    env = {"PARLEY_ANTHROPIC_API_KEY": "sk-e2e", "PARLEY_ANTHROPIC_URL": url,
           "PARLEY_LLM_CHAIN": "anthropic"}
    try:
        first = platform.spawn("brain", "brain-a", PARLEY_INSTANCE_ID="brain-a", **env)
        await wait_ready(platform, "brain-a", first)
        call = "brainkill1"
        await bus.publish(CallRequested(org_id=ORG, call_id=call, direction="inbound",
                                        agent_id="reception", from_number="+14155550123",
                                        to_number="+14155550100"))
        await bus.publish(CallStreamStarted(org_id=ORG, call_id=call, stream_id="MZ1",
                                            gateway_instance="gw", agent_id="reception"))
        await bus.publish(TurnUserEnded(org_id=ORG, call_id=call, turn_id="t1",
                                        text="Tell me everything."))
        deadline = time.monotonic() + 20
        while True:  # the first instance is mid-turn: a couple of clauses are out
            says = [e for e in await bus.replay_call(call)
                    if e.type == "agent.say" and e.turn_id == "t1"]
            if len(says) >= 2:
                break
            assert time.monotonic() < deadline, "the turn never started speaking"
            await asyncio.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        second = platform.spawn("brain", "brain-b", PARLEY_INSTANCE_ID="brain-b", **env)
        await wait_ready(platform, "brain-b", second)

        types, _ = await stored_call(platform.database_url, call, until="turn.completed",
                                     timeout=40, require_end=False)
        events = await bus.replay_call(call)
        says = [e for e in events if e.type == "agent.say" and e.turn_id == "t1"]
        assert [s.seq for s in says] == list(range(len(says))), [s.seq for s in says]
        assert says[-1].last and sum(s.last for s in says) == 1
        assert " ".join(s.text for s in says if s.text) == REPLY
        assert types.count("agent.say") == len(says) + 1  # + the greeting
        completed = [e for e in events if e.type == "turn.completed"]
        assert len(completed) == 1 and not completed[0].cancelled
        assert len(emulator.requests) >= 2  # the second instance really re-ran the turn
        # ... going on from what the first had said: the said clauses were its prefill.
        prefill = emulator.requests[-1]["messages"][-1]["content"][-1]["text"]
        assert prefill.startswith(says[0].text) and REPLY.startswith(prefill)
    finally:
        await emulator.stop()
