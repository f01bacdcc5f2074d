import asyncio
import os
import subprocess
import sys

from parley.common.bus import Bus


def parley(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "parley.devkit.cli", *args], text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=60)


async def test_orgs_agents_numbers_keys_from_the_command_line(
        database_url: str, nats_url: str, bus: Bus) -> None:
    env = {"PARLEY_DATABASE_URL": database_url, "PARLEY_NATS_URL": nats_url}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = parley(*args, env=env)
        assert done.returncode == 0, done.stderr
        return done

    await asyncio.to_thread(run, "orgs", "add", "acme", "Acme Dental")
    added = await asyncio.to_thread(run, "agents", "add", "acme", "Reception", "--id", "rx",
                                    "--pipeline", "managed", "--max-duration-s", "900",
                                    "--transfer-number", "+14155550199",
                                    "--callback-prefix", "+1415",
                                    "--idle-prompt", "Still with me?",
                                    "--filler-after-ms", "800")
    assert '"pipeline":"managed"' in added.stdout
    assert '"filler_after_ms":800' in added.stdout
    assert '"idle_prompt":"Still with me?"' in added.stdout
    assert '"transfer_numbers":["+14155550199"]' in added.stdout
    assert '"callback_number_prefixes":["+1415"]' in added.stdout
    await asyncio.to_thread(run, "numbers", "add", "acme", "+1 415 555 0100", "rx")
    listed = await asyncio.to_thread(run, "numbers", "list", "acme")
    assert listed.stdout.split() == ["+14155550100", "twilio", "rx"]
    agents = await asyncio.to_thread(run, "agents", "list", "acme")
    assert "rx" in agents.stdout and "max 900s" in agents.stdout
    key = await asyncio.to_thread(run, "keys", "add", "acme", "--name", "ci")
    assert key.stdout.startswith("pk_") and "only time" in key.stderr

    bad = await asyncio.to_thread(parley, "agents", "add", "acme", "X", "--pipeline", "telepathy",
                                  env=env)
    assert bad.returncode == 1 and "pipeline" in bad.stderr
    bad = await asyncio.to_thread(parley, "agents", "add", "acme", "X", "--filler-after-ms",
                                  "60000", env=env)
    assert bad.returncode == 1 and "filler_after_ms" in bad.stderr
    dup = await asyncio.to_thread(parley, "orgs", "add", "acme", "Again", env=env)
    assert dup.returncode == 1 and "already exists" in dup.stderr

    published = [e.type async for _, e in bus.replay("parley.ev.acme.>")]
    assert published == ["org.created", "agent.created", "number.assigned", "api_key.created"]


def test_bad_settings_and_an_unreachable_postgres_are_a_message_and_exit_1(
        database_url: str, monkeypatch, capsys) -> None:
    # --settings '{bad' ended in a msgspec.DecodeError traceback, and any command with
    # Postgres down in a psycopg.OperationalError one.
    from parley.devkit.cli import main
    from parley.devkit.infra import free_port

    monkeypatch.setenv("PARLEY_DATABASE_URL", database_url)
    monkeypatch.delenv("PARLEY_NATS_URL", raising=False)
    for settings in ("{bad", "[1]"):
        assert main(["agents", "add", "o1", "A", "--settings", settings]) == 1
        assert "parley: --settings is not a JSON object" in capsys.readouterr().err
    port = free_port()
    monkeypatch.setenv("PARLEY_DATABASE_URL", f"postgresql://postgres@127.0.0.1:{port}/parley")
    assert main(["orgs", "add", "acme", "Acme"]) == 1
    assert f"parley: cannot reach Postgres at 127.0.0.1:{port}" in capsys.readouterr().err
