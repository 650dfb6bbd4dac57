"""``mesh broadcast`` and ``mesh pool-member``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from mesh.pool.tracker import BroadcastResult

__all__ = ["add_commands", "format_result"]


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    from mesh.cli import add_settings_arguments

    bcast = sub.add_parser(
        "broadcast",
        help="send one broadcast to a pool and print every member's outcome",
    )
    bcast.add_argument("--pool", required=True, help="pool name")
    bcast.add_argument(
        "--host", default="127.0.0.1", help="this host's address (default 127.0.0.1)"
    )
    bcast.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait (default 10)"
    )
    bcast.add_argument("--quorum", type=int, help="return after this many replies")
    bcast.add_argument("--no-dns", action="store_true", help="this host only")
    bcast.add_argument(
        "--directory-dir", help="shared directory of masters instead of DNS"
    )
    bcast.add_argument("payload", help="the request, sent as UTF-8")
    add_settings_arguments(bcast)
    bcast.set_defaults(func=_broadcast, log_default=logging.WARNING)

    run = sub.add_parser(
        "pool-member", help="run one demo pool member until SIGTERM/SIGINT"
    )
    from mesh.pool.member import add_member_arguments

    add_member_arguments(run)
    add_settings_arguments(run)
    run.set_defaults(func=_pool_member)


def _broadcast(args: argparse.Namespace) -> int:
    from mesh.cli import settings_from_args
    from mesh.pool.member import PoolMember, directory_from_args

    settings = settings_from_args(args)

    def refuse(payload: bytes) -> bytes:
        raise RuntimeError("a temporary broadcast member does not serve requests")

    # The temporary member may still become master when its host has none:
    # it must, or the broadcast could not leave the host.
    member = PoolMember(
        args.pool,
        settings,
        refuse,
        args.host,
        directory=directory_from_args(args),
    )
    with member:
        result = member.broadcast(
            args.payload.encode(),
            timeout=args.timeout,
            include_self=False,
            quorum=args.quorum,
        )
    sys.stdout.write(format_result(result))
    return 0 if result.complete and not result.unreachable_hosts else 2


def _pool_member(args: argparse.Namespace) -> int:
    from mesh.cli import settings_from_args
    from mesh.pool.member import run_member, settings_overrides

    return run_member(args, settings_from_args(args, **settings_overrides(args)))


def format_result(result: BroadcastResult) -> str:
    """A plain-text table: one row per member, then the unreachable hosts."""
    rows = [("MEMBER", "HOST", "PID", "OUTCOME", "DETAIL")]
    for m in result.members:
        detail = m.reply.decode(errors="replace") if m.reply is not None else m.reason
        rows.append(
            (m.member.id, m.member.host, str(m.member.pid), m.outcome.value, detail)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4]))
        + "  "
        + row[4]
        for row in rows
    ]
    for host in result.unreachable_hosts:
        lines.append(f"unreachable host {host.host}: {host.reason}")
    counts = ", ".join(f"{n} {o.value}" for o, n in result.counts.items() if n)
    state = "complete" if result.complete else "incomplete"
    lines.append(f"broadcast {result.broadcast_id}: {state}; {counts or 'no members'}")
    return "\n".join(lines) + "\n"
