"""The ``parley`` command line.

Each command module exposes ``register(subparsers)``, which adds its parsers and sets
``handler=<function(args) -> int>`` as a parser default; :func:`main` parses, then calls the
handler. To add commands, write such a module and list it in ``COMMAND_MODULES``. A handler
reports what it expects to go wrong (bad input, a server it cannot reach) by raising
:class:`~parley.devkit.errors.CommandError` or :class:`~parley.devkit.infra.InfraError`:
:func:`main` prints ``parley: <message>`` and returns 1, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import psycopg

from parley.devkit import (
    call_cli,
    config_cli,
    demo_cli,
    events_cli,
    infra_cli,
    knowledge_cli,
    up_cli,
)
from parley.devkit.errors import CommandError
from parley.devkit.infra import InfraError

COMMAND_MODULES = (demo_cli, up_cli, infra_cli, events_cli, config_cli, knowledge_cli, call_cli)


def build_parser() -> argparse.ArgumentParser:
    """The ``parley`` parser with every command module registered."""
    parser = argparse.ArgumentParser(prog="parley", description="Parley developer tools")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``parley`` command and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args))
    except (CommandError, InfraError) as error:
        print(f"parley: {error}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as error:  # Postgres went away during the command
        print(f"parley: Postgres: {str(error).strip()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
