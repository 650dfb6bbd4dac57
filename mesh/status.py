"""`mesh status`: every service and pool of the zone, as DNS and the masters see it.

Services come from a zone transfer (the same AXFR as ``mesh ls``). The
remaining lease of each record is not in DNS (RFC 9664 gives it only to the
registering client), so it is read from the bundled responder's journal when
that is readable here (``MESH_STATE_DIR``); otherwise the column shows ``-``.

Pools are the ``_master._tcp.<pool>.<zone>`` names of the same transfer. Each
target is one host's master; it is asked for its status on the endpoint DNS
gives (see :func:`mesh.pool.master.query_status`), which names its epoch,
its pid and its members. A master that does not answer in time is shown as
such: its record may be left over from a master that was killed, and will
go when its lease ends.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import IO, Any

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.SRV
import dns.tsig

from mesh.config import Settings
from mesh.curve import Curve
from mesh.errors import ConfigError

__all__ = [
    "PoolHost",
    "Status",
    "add_commands",
    "collect",
    "journal_leases",
    "lease_text",
    "srv_key",
]

log = logging.getLogger(__name__)

_MASTER_PREFIX = "_master._tcp."

# (SRV owner, priority, weight, port, target), all names lower case.
_SrvKey = tuple[str, int, int, int, str]


def srv_key(
    service: str, priority: int, weight: int, port: int, target: str
) -> _SrvKey:
    return (service.lower(), priority, weight, port, target.lower())


def journal_leases(
    state_dir: Path, wall_now: float | None = None
) -> dict[_SrvKey, float]:
    """Seconds of lease left per SRV record, from the responder's journal.

    The journal stores expiry on the wall clock, the only clock two processes
    share; this is for display only and never decides anything.
    """
    path = state_dir / "journal.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.info("no leases shown: cannot read %s: %s", path, exc)
        return {}
    wall_now = time.time() if wall_now is None else wall_now
    leases: dict[_SrvKey, float] = {}
    for entry in doc.get("records", []):
        try:
            if entry["type"] != "SRV" or entry.get("expires_at") is None:
                continue
            rd = dns.rdata.from_text(
                dns.rdataclass.IN, dns.rdatatype.SRV, entry["rdata"]
            )
            assert isinstance(rd, dns.rdtypes.IN.SRV.SRV)
            key = srv_key(
                dns.name.from_text(entry["name"]).to_text(),
                rd.priority,
                rd.weight,
                rd.port,
                rd.target.to_text(),
            )
            leases[key] = max(0.0, float(entry["expires_at"]) - wall_now)
        except (KeyError, TypeError, ValueError, dns.exception.DNSException):
            continue
    return leases


@dataclasses.dataclass
class PoolHost:
    """One master of a pool as DNS lists it, with what it said (None: silent)."""

    address: str
    port: int
    target: str
    answer: dict[str, Any] | None


@dataclasses.dataclass
class Status:
    zone: str
    nameserver: str
    services: list[dict[str, Any]]
    pools: dict[str, list[PoolHost]]

    def to_json(self) -> dict[str, Any]:
        return {
            "zone": self.zone,
            "nameserver": self.nameserver,
            "services": self.services,
            "pools": {
                pool: [dataclasses.asdict(h) for h in hosts]
                for pool, hosts in self.pools.items()
            },
        }


def collect(settings: Settings, timeout: float = 2.0) -> Status:
    """Read the zone, then ask every pool master in it, all within ``timeout`` each."""
    import zmq

    from mesh.discovery.cli import list_services
    from mesh.keyfile import load_key
    from mesh.pool.directory import zmq_endpoint
    from mesh.pool.master import query_status

    key: dns.tsig.Key | None
    try:
        key = load_key(settings.resolved_key_file)
    except ConfigError as exc:
        # Unsigned transfers still work from loopback to the bundled responder.
        log.info("zone transfer unsigned: %s", exc)
        key = None
    rows = list_services(settings.nameservers, settings.zone, key, timeout=timeout)
    leases = journal_leases(settings.state_dir)
    zone_suffix = "." + settings.zone.lower()
    services: list[dict[str, Any]] = []
    masters: list[tuple[str, dict[str, Any]]] = []
    for row in rows:
        name = str(row["service"])
        if name.lower().startswith(_MASTER_PREFIX) and name.lower().endswith(
            zone_suffix
        ):
            pool = name[len(_MASTER_PREFIX) : -len(zone_suffix)]
            masters.append((pool, row))
            continue
        key_ = srv_key(name, row["priority"], row["weight"], row["port"], row["target"])
        services.append({**row, "lease": leases.get(key_)})

    pools: dict[str, list[PoolHost]] = {}
    curve = Curve.from_settings(settings)
    context: zmq.Context[Any] = zmq.Context()
    try:
        jobs = []
        for pool, row in masters:
            for address in row["addresses"] or ["?"]:
                jobs.append((pool, row, address))

        def ask(job: tuple[str, dict[str, Any], str]) -> dict[str, Any] | None:
            _, row, address = job
            if address == "?":
                return None
            return query_status(
                context, zmq_endpoint(address, row["port"]), timeout, curve
            )

        # In parallel, so silent masters cost one timeout, not one each; each
        # query makes and closes its own socket on its worker thread.
        with concurrent.futures.ThreadPoolExecutor(max(1, min(16, len(jobs)))) as ex:
            answers = list(ex.map(ask, jobs))
    finally:
        context.term()
    for (pool, row, address), answer in zip(jobs, answers, strict=True):
        pools.setdefault(pool, []).append(
            PoolHost(address, int(row["port"]), str(row["target"]), answer)
        )
    for hosts in pools.values():
        hosts.sort(key=lambda h: (h.address, h.port))
    return Status(
        settings.zone,
        ",".join(settings.nameservers),
        services,
        dict(sorted(pools.items())),
    )


def lease_text(lease: float | None) -> str:
    return "-" if lease is None else f"{lease:.0f}s"


def _table(rows: list[tuple[str, ...]], out: IO[str], indent: str) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        out.write(indent + "  ".join([*cells, row[-1]]).rstrip() + "\n")


def format_status(status: Status, out: IO[str]) -> None:
    out.write(f"zone {status.zone} at {status.nameserver}\n\nservices:\n")
    if status.services:
        rows: list[tuple[str, ...]] = [
            ("SERVICE", "TARGET", "ADDRESS", "PORT", "PRI", "WEIGHT", "TTL", "LEASE")
        ]
        for s in status.services:
            rows.append(
                (
                    s["service"],
                    s["target"],
                    ",".join(s["addresses"]) or "-",
                    str(s["port"]),
                    str(s["priority"]),
                    str(s["weight"]),
                    str(s["ttl"]),
                    lease_text(s["lease"]),
                )
            )
        _table(rows, out, "  ")
    else:
        out.write("  none\n")
    out.write("\npools:\n")
    if not status.pools:
        out.write("  none\n")
    for pool, hosts in status.pools.items():
        out.write(f"  {pool}:\n")
        for host in hosts:
            where = f"{host.address}:{host.port}"
            answer = host.answer
            if answer is None:
                out.write(
                    f"    host {host.address}: master at {where} did not answer "
                    "(a record left by a stopped master lasts until its lease ends)\n"
                )
                continue
            record = answer.get("record", {})
            members = answer.get("members", [])
            out.write(
                f"    host {host.address}: master pid {record.get('pid')} "
                f"(member {record.get('member_id')}), epoch {record.get('epoch')}, "
                f"{len(members)} member(s)\n"
            )
            for m in members:
                out.write(
                    f"      {m['id']}  pid {m['pid']}  heard {m['heard_ago']:.1f}s ago\n"
                )


def _cmd_status(args: argparse.Namespace) -> int:
    from mesh.cli import settings_from_args

    settings = settings_from_args(args)
    status = collect(settings, timeout=args.timeout)
    if args.json:
        json.dump(status.to_json(), sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
    else:
        format_status(status, sys.stdout)
    silent = [h for hosts in status.pools.values() for h in hosts if h.answer is None]
    return 2 if silent else 0


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    from mesh.cli import add_settings_arguments

    p = sub.add_parser(
        "status",
        help="every service with its targets and leases, every pool with its masters",
        description="Read the zone by AXFR (as 'mesh ls'), show each service's "
        "targets with the remaining lease (from the responder's journal in "
        "MESH_STATE_DIR when readable), and ask each pool's master per host for "
        "its epoch and members. Exits 2 when a master listed in DNS did not answer.",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        help="seconds to wait for DNS and for each master (2)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_settings_arguments(p)
    p.set_defaults(func=_cmd_status)
