"""Subcommands of this part (filled in by the part's owner)."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    return None
