"""`vitops` commands of the engine stage group."""

from __future__ import annotations

import argparse

USER_ERRORS: tuple[type[BaseException], ...] = ()


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's subcommands to the `vitops` parser."""
