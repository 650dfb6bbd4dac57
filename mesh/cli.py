"""The ``mesh`` command: one argparse front over every part.

Each part adds its own subcommands through an ``add_commands(subparsers)``
function in its ``cli`` module, so this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from mesh.config import Settings
from mesh.errors import MeshError

__all__ = ["add_settings_arguments", "log_level", "main", "settings_from_args"]

# Modules whose add_commands() contributes subcommands, in help order.
_COMMAND_MODULES = (
    "mesh.responder.cli",
    "mesh.discovery.cli",
    "mesh.hit.cli",
    "mesh.pool.cli",
    "mesh.deploy",
    "mesh.status",
    "mesh.workload",
    "mesh.curve",
)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every subcommand shares; each overrides one setting."""
    group = parser.add_argument_group("settings (override MESH_* and --config)")
    group.add_argument("--config", help="TOML settings file (MESH_CONFIG)")
    group.add_argument("--zone", help="zone services live in (MESH_ZONE)")
    group.add_argument(
        "--nameservers",
        help="comma-separated host:port list to ask (MESH_NAMESERVERS)",
    )
    group.add_argument("--key-file", help="TSIG key in BIND format (MESH_KEY_FILE)")
    group.add_argument("--state-dir", help="journal and keys (MESH_STATE_DIR)")
    group.add_argument("--runtime-dir", help="locks and votes (MESH_RUNTIME_DIR)")
    group.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging"
    )


def settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from the shared flags plus any subcommand-specific ``extra``."""
    return Settings.load(
        args.config,
        zone=args.zone,
        nameservers=args.nameservers,
        key_file=args.key_file,
        state_dir=args.state_dir,
        runtime_dir=args.runtime_dir,
        **extra,
    )


def log_level(
    verbose: int, env: Mapping[str, str] | None = None, default: int = logging.INFO
) -> int:
    """``default`` (INFO), or ``MESH_LOG_LEVEL`` when set; each ``-v`` is one
    level more. Commands that print a report of their own (``mesh workload``,
    ``mesh broadcast``) default to WARNING, so the report is not buried.

    ``mesh up`` sets ``MESH_LOG_LEVEL=WARNING`` for the processes it starts,
    so a demo's terminal shows problems rather than every Hit.
    """
    text = (os.environ if env is None else env).get("MESH_LOG_LEVEL", "")
    base = logging.getLevelName(text.strip().upper()) if text.strip() else None
    if not isinstance(base, int):
        base = default
    return max(logging.DEBUG, base - 10 * verbose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh",
        description="srvmesh: a ZeroMQ service mesh with DNS as its directory",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = log_level(
        getattr(args, "verbose", 0), default=getattr(args, "log_default", logging.INFO)
    )
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        result = args.func(args)
    except MeshError as exc:
        print(f"mesh {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(result or 0)
