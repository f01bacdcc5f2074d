import asyncio
import json
import os
import subprocess
import sys

from parley.common import events as ev
from parley.common.bus import Bus
from parley.common.metrics import Metrics
from parley.recorder.projections import AuditLogProjection, CallsProjection
from parley.recorder.worker import Recorder


def parley(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "parley.devkit.cli", *args], text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=60)


async def record_all(bus: Bus, database_url: str, count: int) -> None:
    import psycopg

    recorder = Recorder(bus, database_url, [CallsProjection(), AuditLogProjection()],
                        metrics=Metrics("recorder"))
    stop = asyncio.Event()
    task = asyncio.create_task(recorder.run(stop))
    for _ in range(500):
        with psycopg.connect(database_url) as conn:
            row = conn.execute("SELECT position FROM checkpoints").fetchone()
        if row and row[0] >= count:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await task


async def test_show_prints_a_calls_timeline_from_postgres_and_the_stream(
        bus: Bus, database_url: str, nats_url: str) -> None:
    script = [
        ev.CallRequested(org_id="o1", call_id="c42", direction="inbound", agent_id="a1",
                         from_number="+15550001", to_number="+15550002"),
        ev.TranscriptFinal(org_id="o1", call_id="c42", text="what are your hours"),
        ev.AgentSay(org_id="o1", call_id="c42", turn_id="t1", seq=0, text="Nine to five.",
                    last=True),
        ev.CallEnded(org_id="o1", call_id="c42", reason="caller_hangup", duration_s=9.0),
    ]
    for event in script:
        await bus.publish(event)
    await bus.publish(ev.CallRinging(org_id="o1", call_id="other"))
    await record_all(bus, database_url, 5)
    env = {"PARLEY_DATABASE_URL": database_url, "PARLEY_NATS_URL": nats_url}

    shown = await asyncio.to_thread(parley, "events", "show", "c42", env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "4 events" in lines[0]
    assert [line.split()[3 if i else 2] for i, line in enumerate(lines[1:])] == \
        ["call.requested", "transcript.final", "agent.say", "call.ended"]
    assert "text='what are your hours'" in shown.stdout
    assert "ms" in lines[2]  # time since the previous step

    streamed = await asyncio.to_thread(parley, "events", "show", "c42", "--from-stream",
                                       "--json", env=env)
    assert [ev.decode(line) for line in streamed.stdout.splitlines()] == script

    other_org = await asyncio.to_thread(parley, "events", "show", "c42", "--org", "o2", env=env)
    assert other_org.returncode == 1 and "no events" in other_org.stderr


async def test_show_from_postgres_lists_the_calls_dead_letters_in_place(
        bus: Bus, database_url: str) -> None:
    # At 3 a.m. a timeline that silently skips the caller's words (an event the recorder could
    # not store) reads as if they were never said.
    await bus.publish(ev.CallRequested(org_id="o1", call_id="c42", direction="inbound",
                                        agent_id="a1", from_number="+15550001",
                                        to_number="+15550002"))
    await bus.js.publish("parley.ev.o1.call.c42.transcript.final", b"{not json")
    await bus.js.publish("parley.ev.o1.call.c43.transcript.final", b"{not json")
    await bus.publish(ev.CallEnded(org_id="o1", call_id="c42", reason="caller_hangup"))
    await record_all(bus, database_url, 4)
    env = {"PARLEY_DATABASE_URL": database_url}

    shown = await asyncio.to_thread(parley, "events", "show", "c42", env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "2 events, 1 dead letter" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "4"]
    assert "dead letter" in lines[2] and "undecodable" in lines[2]
    assert "call.ended" in lines[3]

    as_json = await asyncio.to_thread(parley, "events", "show", "c42", "--json", env=env)
    assert [ev.decode(line).type for line in as_json.stdout.splitlines()] == \
        ["call.requested", "call.ended"]
    assert "position 2" in as_json.stderr and "undecodable" in as_json.stderr

    other_org = await asyncio.to_thread(parley, "events", "show", "c42", "--org", "o2", env=env)
    assert other_org.returncode == 1 and "no events" in other_org.stderr


async def test_show_is_a_calls_timeline_only_not_an_agents_or_an_orgs(
        bus: Bus, database_url: str, nats_url: str) -> None:
    # An agent's or an org's id is no call's: Postgres agrees with the stream, which reads
    # only a call's subjects.
    await bus.publish(ev.AgentCreated(org_id="o1", agent_id="a1", name="Reception"))
    await bus.publish(ev.ApiKeyCreated(org_id="o1", key_id="k1", actor="user:ann"))
    await bus.publish(ev.CallRinging(org_id="o1", call_id="a1"))  # a call with the same id
    await record_all(bus, database_url, 3)
    env = {"PARLEY_DATABASE_URL": database_url, "PARLEY_NATS_URL": nats_url}

    for source in ((), ("--from-stream",)):
        org = await asyncio.to_thread(parley, "events", "show", "o1", *source, env=env)
        assert org.returncode == 1 and "no events for call o1" in org.stderr, org.stdout
        call = await asyncio.to_thread(parley, "events", "show", "a1", "--json", *source,
                                       env=env)
        assert [ev.decode(line).type for line in call.stdout.splitlines()] == ["call.ringing"]


async def test_tail_follows_live_events_filtered_by_type(bus: Bus, nats_url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "parley.devkit.cli", "events", "tail", "--type", "call.ended",
        "--limit", "2", env={**os.environ, "PARLEY_NATS_URL": nats_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    await asyncio.wait_for(proc.stderr.readline(), 30)  # "following ..." once subscribed
    for i in range(3):
        await bus.publish(ev.CallRinging(org_id="o1", call_id=f"c{i}"))
        await bus.publish(ev.CallEnded(org_id="o1", call_id=f"c{i}", reason="busy"))
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    lines = out.decode().splitlines()
    assert len(lines) == 2 and all("call.ended" in line and "busy" in line for line in lines)


async def test_tail_json_shows_an_event_whose_payload_is_not_utf8(
        bus: Bus, nats_url: str) -> None:
    # It decodes (the bytes are in a field this version skips unread) and counts to --limit:
    # its line must not go missing.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "parley.devkit.cli", "events", "tail", "--json", "--limit", "2",
        env={**os.environ, "PARLEY_NATS_URL": nats_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    await asyncio.wait_for(proc.stderr.readline(), 30)  # "following ..." once subscribed
    ringing = ev.encode(ev.CallRinging(org_id="o1", call_id="c1"))
    await bus.js.publish("parley.ev.o1.call.c1.call.ringing", ringing[:-1] + b',"note":"caf\xe9"}')
    await bus.publish(ev.CallEnded(org_id="o1", call_id="c1"))
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    lines = out.decode().splitlines()
    assert [ev.decode(line).type for line in lines] == ["call.ringing", "call.ended"]
    assert json.loads(lines[0])["note"] == "caf\ufffd"
    assert "not valid UTF-8" in err.decode()


async def test_rebuild_command(bus: Bus, database_url: str) -> None:
    for i in range(5):
        await bus.publish(ev.CallEnded(org_id="o1", call_id=f"c{i}"))
    await record_all(bus, database_url, 5)
    env = {"PARLEY_DATABASE_URL": database_url}
    done = await asyncio.to_thread(parley, "events", "rebuild", "calls", env=env)
    assert done.returncode == 0, done.stderr
    assert "rebuilt calls from 5 events up to position 5" in done.stdout
    unknown = await asyncio.to_thread(parley, "events", "rebuild", "nope", env=env)
    assert unknown.returncode == 2 and "audit_log" in unknown.stderr


def test_schema_export(tmp_path) -> None:
    out = parley("events", "schema", "--json", str(tmp_path / "s.json"), "--markdown",
                 str(tmp_path / "e.md"), env={})
    assert out.returncode == 0, out.stderr
    assert '"transcript.final"' in (tmp_path / "s.json").read_text()
    assert (tmp_path / "e.md").read_text().startswith("# Event reference")


def test_a_server_that_cannot_be_reached_is_a_message_and_exit_1() -> None:
    # tail and show --from-stream used to retry an unreachable NATS for ever, and show a 30 s
    # PoolTimeout traceback when Postgres was down.
    from parley.devkit.infra import free_port

    nats_port, postgres_port = free_port(), free_port()
    env = {**os.environ, "PARLEY_NATS_URL": f"nats://127.0.0.1:{nats_port}",
           "PARLEY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{postgres_port}/parley"}
    commands = {("events", "tail"): f"cannot reach NATS at 127.0.0.1:{nats_port}",
                ("events", "show", "c1", "--from-stream"):
                    f"cannot reach NATS at 127.0.0.1:{nats_port}",
                ("events", "show", "c1"): f"cannot reach Postgres at 127.0.0.1:{postgres_port}"}
    running = {args: subprocess.Popen([sys.executable, "-m", "parley.devkit.cli", *args],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
               for args in commands}
    for args, proc in running.items():
        try:
            _, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"parley {' '.join(args)} still waiting after 20 s") from None
        assert proc.returncode == 1, (args, stderr)
        assert f"parley: {commands[args]}" in stderr and "Traceback" not in stderr, stderr


def test_bad_ids_and_event_types_are_a_message_and_exit_1(
        nats_url: str, monkeypatch, capsys) -> None:
    # Each of these used to end in a traceback (SubjectError, nats BadSubjectError).
    from parley.devkit.cli import main

    monkeypatch.setenv("PARLEY_NATS_URL", nats_url)
    for argv, message in [
        (["events", "show", "a.b", "--from-stream"], "call id 'a.b' is not a valid id"),
        (["events", "show", "c1", "--org", "a b"], "org id 'a b' is not a valid id"),
        (["events", "tail", "--org", "a.b"], "org id 'a.b' is not a valid id"),
        (["events", "tail", "--type", "a b"], "unknown event type 'a b'"),
        (["events", "tail", "--type", "transcript.finall"],
         "did you mean transcript.final"),
    ]:
        assert main([*argv]) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("parley: ") and message in err, err
