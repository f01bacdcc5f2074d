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
                                    "--pipeline", "managed", "--max-duration-s", "900")
    assert '"pipeline":"managed"' in added.stdout
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
    dup = await asyncio.to_thread(parley, "orgs", "add", "acme", "Again", env=env)
    assert dup.returncode == 1 and "already exists" in dup.stderr

    published = [e.type async for _, e in bus.replay("parley.ev.acme.>")]
    assert published == ["org.created", "agent.created", "number.assigned", "api_key.created"]
