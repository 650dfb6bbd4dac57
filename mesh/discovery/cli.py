"""``mesh register``, ``mesh unregister`` and ``mesh ls``: DNS by hand.

For deploy scripts and operators: register a service that is not a srvmesh
server (or before one starts), remove a record a killed server left behind
in BIND, and see what the zone holds.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType
from typing import Any

import dns.exception
import dns.name
import dns.query
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.SRV
import dns.tsig
import dns.zone

from mesh.config import Settings
from mesh.discovery.names import absolute_name, service_name
from mesh.discovery.resolve import Nameserver
from mesh.errors import ConfigError, DiscoveryTimeout, DiscoveryUnavailable

__all__ = ["add_commands", "list_services"]

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    from mesh.cli import add_settings_arguments

    register = sub.add_parser(
        "register",
        help="register one SRV record by hand",
        description=(
            "Add an SRV record and its target's addresses with a signed UPDATE. "
            "By default register once and exit (the bundled responder drops it "
            "when the lease ends); with --keep, renew until SIGTERM or Ctrl-C, "
            "then delete it."
        ),
    )
    _service_arguments(register)
    register.add_argument(
        "--address",
        action="append",
        required=True,
        help="advertised IP address of the target (repeat or comma-separate)",
    )
    register.add_argument("--priority", type=int, default=0, help="SRV priority (0)")
    register.add_argument("--weight", type=int, default=1, help="SRV weight (1)")
    register.add_argument("--ttl", type=int, help="record TTL, seconds (MESH_SRV_TTL)")
    register.add_argument("--lease", type=float, help="lease, seconds (MESH_LEASE)")
    register.add_argument(
        "--keep", action="store_true", help="renew until stopped, then delete"
    )
    add_settings_arguments(register)
    register.set_defaults(func=_register)

    unregister = sub.add_parser(
        "unregister",
        help="delete SRV records by hand",
        description="Delete the SRV records of SERVICE that point at NAME:PORT.",
    )
    _service_arguments(unregister)
    unregister.add_argument(
        "--address",
        action="append",
        default=[],
        help="also delete this address record of the target",
    )
    add_settings_arguments(unregister)
    unregister.set_defaults(func=_unregister)

    ls = sub.add_parser(
        "ls",
        help="list the zone's services with targets, weights and leases",
        description=(
            "List every SRV record in the zone with its targets, addresses, "
            "priorities, weights and TTLs, read by a zone transfer (AXFR) "
            "signed with the key file when there is one."
        ),
    )
    add_settings_arguments(ls)
    ls.set_defaults(func=_ls)


def _service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "service",
        metavar="SERVICE",
        help="service label ('orders' means _orders._tcp.<zone>) or a full SRV name",
    )
    parser.add_argument("port", metavar="PORT", type=int, help="the service's port")
    parser.add_argument(
        "--target",
        required=True,
        metavar="NAME",
        help="target host name (relative names are in the zone)",
    )


def _srv_name(service: str, zone: str) -> dns.name.Name:
    if "." in service.rstrip("."):
        return absolute_name(service, zone)
    return service_name(service, zone)


def _registrar(settings: Settings) -> Any:
    from mesh.discovery.register import Registrar
    from mesh.keyfile import load_key

    key = load_key(settings.resolved_key_file)
    return Registrar(settings.nameservers, settings.zone, key, lease=settings.lease)


def _register(args: argparse.Namespace) -> int:
    from mesh.cli import settings_from_args

    settings = settings_from_args(args, lease=args.lease, srv_ttl=args.ttl)
    addresses = [a.strip() for text in args.address for a in text.split(",") if a]
    registrar = _registrar(settings)
    srv = _srv_name(args.service, settings.zone)
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    # Before the UPDATE goes out: a SIGTERM that arrives once the records
    # are visible must delete them, not kill us with the default action.
    previous = signal.signal(signal.SIGTERM, on_signal) if args.keep else None
    try:
        registration = registrar.register(
            srv,
            args.target,
            args.port,
            addresses,
            priority=args.priority,
            weight=args.weight,
            ttl=settings.srv_ttl,
            renew=args.keep,
        )
    except BaseException:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        raise
    print(f"registered {registration.record.describe()} lease {registration.lease:g} s")
    if not args.keep:
        return 0
    try:
        # A timed wait, so Ctrl-C is seen promptly on every platform.
        while not stopped.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        registration.close()
    print(f"deleted {registration.record.describe()}")
    return 0


def _unregister(args: argparse.Namespace) -> int:
    from mesh.cli import settings_from_args

    settings = settings_from_args(args)
    registrar = _registrar(settings)
    srv = _srv_name(args.service, settings.zone)
    addresses = [a.strip() for text in args.address for a in text.split(",") if a]
    deleted = registrar.unregister(srv, args.target, args.port, addresses)
    print(f"deleted {deleted} SRV record(s) of {srv} at {args.target}:{args.port}")
    return 0


def list_services(
    nameservers: list[str],
    zone: str,
    key: dns.tsig.Key | None = None,
    timeout: float = 5.0,
) -> list[dict[str, Any]]:
    """Every SRV record of ``zone``, read by AXFR from the first answering server.

    Each row has ``service``, ``target``, ``port``, ``priority``, ``weight``,
    ``ttl`` and ``addresses``. The bundled responder does not publish the
    remaining lease, so the TTL is what can be shown.
    """
    origin = dns.name.from_text(zone)
    errors: list[str] = []
    for text in nameservers:
        nameserver = Nameserver.parse(text)
        try:
            transfer = dns.query.xfr(
                nameserver.host,
                origin,
                port=nameserver.port,
                timeout=timeout,
                lifetime=timeout,
                relativize=False,
                keyring={key.name: key} if key else None,
                keyname=key.name if key else None,
                keyalgorithm=key.algorithm if key else dns.tsig.default_algorithm,
            )
            transferred = dns.zone.from_xfr(transfer, relativize=False)
        except (OSError, EOFError, dns.exception.DNSException) as exc:
            errors.append(f"{nameserver} {type(exc).__name__}: {exc}")
            continue
        return _rows(transferred)
    kind = DiscoveryTimeout if errors else DiscoveryUnavailable
    raise kind(
        f"cannot transfer zone {origin}: " + "; ".join(errors), str(origin), nameservers
    )


def _rows(zone: dns.zone.Zone) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, rdataset in zone.iterate_rdatasets(dns.rdatatype.SRV):
        for rd in rdataset:
            if not isinstance(rd, dns.rdtypes.IN.SRV.SRV):
                continue
            addresses: list[str] = []
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                found = zone.get_rdataset(rd.target, rdtype)
                if found is not None:
                    addresses.extend(r.address for r in found)
            rows.append(
                {
                    "service": name.to_text(),
                    "target": rd.target.to_text(),
                    "port": rd.port,
                    "priority": rd.priority,
                    "weight": rd.weight,
                    "ttl": rdataset.ttl,
                    "addresses": addresses,
                }
            )
    rows.sort(key=lambda r: (r["service"], r["priority"], -r["weight"], r["target"]))
    return rows


def _ls(args: argparse.Namespace) -> int:
    from mesh.cli import settings_from_args
    from mesh.keyfile import load_key

    settings = settings_from_args(args)
    key: dns.tsig.Key | None
    try:
        key = load_key(settings.resolved_key_file)
    except ConfigError as exc:
        # Unsigned transfers still work from loopback to the bundled responder.
        log.info("zone transfer unsigned: %s", exc)
        key = None
    rows = list_services(settings.nameservers, settings.zone, key)
    # Imported here: mesh.status builds on this module.
    from mesh.status import journal_leases, lease_text, srv_key

    leases = journal_leases(settings.state_dir)
    header = ("SERVICE", "PRI", "WEIGHT", "PORT", "TARGET", "TTL", "LEASE", "ADDRESSES")
    table = [header] + [
        (
            r["service"],
            str(r["priority"]),
            str(r["weight"]),
            str(r["port"]),
            r["target"],
            str(r["ttl"]),
            lease_text(
                leases.get(
                    srv_key(
                        r["service"], r["priority"], r["weight"], r["port"], r["target"]
                    )
                )
            ),
            ",".join(r["addresses"]) or "-",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1])
    return 0
