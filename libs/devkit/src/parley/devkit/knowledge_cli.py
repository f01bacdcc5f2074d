"""``parley knowledge add|search|list``: an agent's knowledge from the command line.

The agent's org is looked up from the agents table. ``add --org-wide`` stores documents for
every agent of that org. A document is named by its file name, as an upload through the API is:
adding a file of a name already stored in that scope replaces that document, so two different
files of one name (``en/faq.md``, ``es/faq.md``) in one ``add`` are refused before anything is
stored. Each file is its own transaction with its ``knowledge.ingested`` outbox row, published
straight away when NATS is reachable (as ``parley agents add`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg

from parley.common import configuration as cfg
from parley.devkit.config_cli import _publish_outbox
from parley.devkit.events_cli import server_url
from parley.devkit.infra import InfraError

Action = Callable[[psycopg.AsyncConnection[Any], argparse.Namespace, str], Awaitable[int]]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``knowledge add|search|list``."""
    parser = subparsers.add_parser("knowledge", help="manage an agent's knowledge (RAG)")
    parser.add_argument("--dir", type=Path, default=Path(".parley"))
    group = parser.add_subparsers(title="knowledge commands", metavar="COMMAND", required=True)

    add = _command(group, "add", "ingest TXT/MD/PDF/DOCX/HTML files", _add)
    add.add_argument("agent_id")
    add.add_argument("files", nargs="+", type=Path, help=(
        "each stored under its file name (not its folder), replacing a document of that name "
        "already there; two different files of one name are refused"))
    add.add_argument("--org-wide", action="store_true",
                     help="visible to every agent of the agent's org")

    search = _command(group, "search", "show the chunks retrieved for a question", _search)
    search.add_argument("agent_id")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=4, help="how many chunks (default 4)")

    listing = _command(group, "list", "list the documents an agent sees", _list)
    listing.add_argument("agent_id")


def _command(group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_: str,
             action: Action) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help_)
    parser.set_defaults(handler=lambda args: asyncio.run(_run(action, args)))
    return parser


async def _run(action: Action, args: argparse.Namespace) -> int:
    from parley.common.store import apply_migrations

    url = server_url(args.dir, "PARLEY_DATABASE_URL")
    await apply_migrations(url)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        agent = await cfg.get_agent(conn, args.agent_id)
        if agent is None:
            print(f"parley: unknown agent {args.agent_id!r}", file=sys.stderr)
            return 1
        code = await action(conn, args, agent.org_id)
        await _publish_outbox(conn, args.dir)
    return code


def _knowledge() -> ModuleType:
    # The devkit does not depend on the brain; the workspace installs both.
    try:
        from parley.brain import knowledge
    except ImportError as exc:
        raise InfraError("parley knowledge needs the parley-brain package installed") from exc
    return knowledge


async def _add(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace, org_id: str) -> int:
    knowledge = _knowledge()
    agent_id = None if args.org_wide else args.agent_id
    scope = f"org {org_id} (all agents)" if agent_id is None else f"agent {agent_id}"
    named: dict[str, Path] = {}
    for path in args.files:
        first = named.setdefault(path.name, path)
        if first.resolve() != path.resolve():
            print(f"parley: {first} and {path} would both be stored as {path.name!r} (a "
                  "document is named by its file name, so the second would replace the "
                  "first): rename one; nothing was added", file=sys.stderr)
            return 1
    failed = 0
    for path in args.files:
        try:
            result = await knowledge.ingest(conn, org_id, agent_id, path, actor="cli")
        except (knowledge.ExtractionError, knowledge.KnowledgeError) as exc:
            print(f"parley: {exc}", file=sys.stderr)
            failed += 1
            continue
        verb = ("unchanged" if result.unchanged else "replaced" if result.replaced
                else "added")
        print(f"{verb} {result.source}: {result.chunks} chunks for {scope} "
              f"(document {result.document_id})")
    return 1 if failed else 0


async def _search(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace,
                  org_id: str) -> int:
    chunks = await _knowledge().retrieve(conn, org_id, args.agent_id, args.query, k=args.k)
    if not chunks:
        print("(no relevant chunks)", file=sys.stderr)
    for chunk in chunks:
        print(f"{chunk.score:.3f}  {chunk.source}  #{chunk.id}")
        for line in chunk.text.splitlines():
            print(f"    {line}")
    return 0


async def _list(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace, org_id: str) -> int:
    for document in await _knowledge().list_documents(conn, org_id, args.agent_id):
        scope = "org-wide" if document.agent_id is None else document.agent_id
        print(f"{document.source:<32} {scope:<16} {document.chunks:>5} chunks "
              f"{document.chars:>8} chars  {document.document_id}")
    return 0
