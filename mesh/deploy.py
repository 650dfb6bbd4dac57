"""`mesh up`: a manifest of responder + servers, started locally."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    return None
