"""``parley events ...`` (placeholder: the real commands are being written separately)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``events`` commands to the ``parley`` parser (none yet)."""
