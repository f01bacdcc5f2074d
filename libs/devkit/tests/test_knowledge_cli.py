import asyncio
import os
import subprocess
import sys
from pathlib import Path

import psycopg

from parley.common import configuration as cfg
from parley.common.bus import Bus


def parley(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "parley.devkit.cli", *args], text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=60, cwd=cwd)


async def test_add_search_and_list_knowledge_from_the_command_line(
        database_url: str, nats_url: str, bus: Bus, tmp_path: Path) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await cfg.create_org(conn, "acme", "Acme Dental")
        await cfg.create_agent(conn, "acme", "Reception", agent_id="rx")
        await cfg.create_agent(conn, "acme", "Billing", agent_id="billing")
    (tmp_path / "prices.md").write_text("# Prices\n\nTeeth cleaning costs $95.\n")
    (tmp_path / "parking.html").write_text(
        "<html><body><p>Free parking behind the building.</p><script>x()</script></body></html>")
    (tmp_path / "slides.pptx").write_bytes(b"nope")
    env = {"PARLEY_DATABASE_URL": database_url, "PARLEY_NATS_URL": nats_url}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return parley("knowledge", *args, env=env, cwd=tmp_path)

    added = await asyncio.to_thread(run, "add", "rx", "prices.md", "--org-wide")
    assert added.returncode == 0, added.stderr
    assert "added prices.md: 1 chunks for org acme (all agents)" in added.stdout
    added = await asyncio.to_thread(run, "add", "rx", "parking.html")
    assert added.returncode == 0 and "for agent rx" in added.stdout, added.stderr
    again = await asyncio.to_thread(run, "add", "rx", "parking.html")
    assert again.stdout.startswith("unchanged parking.html: 1 chunks"), again.stdout
    (tmp_path / "parking.html").write_text("<p>Free parking behind the building, 2 hours.</p>")
    again = await asyncio.to_thread(run, "add", "rx", "parking.html")
    assert again.stdout.startswith("replaced parking.html"), again.stdout

    found = await asyncio.to_thread(run, "search", "billing", "how much is a cleaning?")
    assert found.returncode == 0, found.stderr
    first, *text = found.stdout.splitlines()
    assert first.split()[1] == "prices.md" and 0 < float(first.split()[0]) <= 1
    assert [line.strip() for line in text] == ["Prices", "", "Teeth cleaning costs $95."]
    private = await asyncio.to_thread(run, "search", "billing", "where can I park?")
    assert private.stdout == "" and "no relevant chunks" in private.stderr

    listed = await asyncio.to_thread(run, "list", "rx")
    rows = [line.split()[:3] for line in listed.stdout.splitlines()]
    assert rows == [["prices.md", "org-wide", "1"], ["parking.html", "rx", "1"]]

    unknown = await asyncio.to_thread(run, "add", "ghost", "prices.md")
    assert unknown.returncode == 1 and "unknown agent 'ghost'" in unknown.stderr
    bad = await asyncio.to_thread(run, "add", "rx", "missing.txt", "slides.pptx", "prices.md")
    assert bad.returncode == 1
    assert "missing.txt: cannot read file" in bad.stderr
    assert "slides.pptx: unsupported file type '.pptx'" in bad.stderr
    assert "added prices.md" in bad.stdout  # good files still go in

    # Documents are named by file name: two files of one name would be one document.
    for language, text in (("en", "A cleaning costs $95."), ("es", "Una limpieza: 95 USD.")):
        (tmp_path / language).mkdir()
        (tmp_path / language / "faq.md").write_text(text)
    clash = await asyncio.to_thread(run, "add", "rx", "en/faq.md", "prices.md", "es/faq.md")
    assert clash.returncode == 1 and clash.stdout == ""
    assert "en/faq.md and es/faq.md would both be stored as 'faq.md'" in clash.stderr
    listed = await asyncio.to_thread(run, "list", "rx")
    assert "faq.md" not in listed.stdout  # nothing was added

    published = [(e.type, e.agent_id) async for _, e in bus.replay("parley.ev.acme.>")
                 if e.type == "knowledge.ingested"]
    assert published == [("knowledge.ingested", "_org"), ("knowledge.ingested", "rx"),
                         ("knowledge.ingested", "rx"), ("knowledge.ingested", "rx")]
